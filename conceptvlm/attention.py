"""Causal self-attention: RoPE, grouped-query heads, document masking, KV cache, joint decoding.

Attention runs through ``F.scaled_dot_product_attention`` so the fused CPU / flash
kernels are chosen by PyTorch at run time. Masks are built from *sequence order*
(causal), *document ids* (packed documents never see each other) and *validity*
(padding is never attended to).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import packed_attention
from .config import QKNorm
from .decoding_state import CacheIndex, KVCache, Slots
from .packed_attention import Segments, segment_attention
from .precision import compute_dtype, upcast


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # One fused op (a decode step runs ~3 norms per layer, so op count matters).
        # Half precision normalises in float32 for stability, then scales in its dtype.
        if x.dtype in (torch.float32, torch.float64):
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        y = F.rms_norm(x.float(), (x.shape[-1],), None, self.eps)
        return y.to(x.dtype) * self.weight


def rope_rotation(positions: torch.Tensor, head_dim: int, base: float, scaling: float = 1.0,
                  dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Unit complex rotations ``exp(i * angle)``, ``[B, 1, L, head_dim/2]``, for integer positions.

    ``positions`` is ``[B, L]`` (1D RoPE) or ``[B, L, 2]`` (2D: frequency ``i`` follows
    axis ``i % 2``, rows and columns interleaved; with both equal this is exactly 1D RoPE).
    Interleaving, not halves: the frequencies fall geometrically, so the second half holds
    only the slowest ones, and a column axis given them could hardly tell 8 columns apart
    (the imbalance Qwen3-VL's interleaved MRoPE removes). ``scaling > 1`` is linear position
    interpolation (positions / scaling): a model trained at length T then reads up to
    about ``T * scaling`` positions.
    """
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, device=positions.device,
                                            dtype=torch.float64) / head_dim))
    pos = positions.to(torch.float64) / scaling
    if pos.dim() == 3:  # per-frequency position: even frequencies the row, odd the column
        axis = torch.arange(inv_freq.numel(), device=pos.device) % 2
        angles = pos[..., axis] * inv_freq
    else:
        angles = pos[..., None] * inv_freq  # [B, L, hd/2]
    # Angles stay float64 until here: large positions keep their precision.
    return torch.polar(torch.ones_like(angles), angles).to(compute_dtype(dtype).to_complex())[:, None]


def apply_rope(x_BHLd: torch.Tensor, rot: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x[2i], x[2i+1]) by the position angle.

    The pair is read as one complex number, so the rotation is a single complex
    multiply (three ops instead of the ten of the cos/sin form: decode steps are
    op-bound). Half precision rotates in float32 (there is no bf16 complex type).
    """
    xc = torch.view_as_complex(upcast(x_BHLd).unflatten(-1, (-1, 2)))
    return torch.view_as_real(xc * rot).flatten(-2).to(x_BHLd.dtype)


def attention_mask(doc_q_BL: torch.Tensor, doc_k_BS: torch.Tensor, valid_k_BS: torch.Tensor,
                   q_offset: int = 0) -> torch.Tensor:
    """Boolean mask ``[B, 1, L, S]``: True where query i may attend to key j.

    Keys are the cached ``S - L`` entries followed by the ``L`` new ones; query ``i``
    sits at key index ``q_offset + i``. A query attends to earlier-or-same keys of its
    own document that are valid. Every query keeps at least its own key so padding
    rows never produce NaN (their outputs are ignored downstream).
    """
    L, S = doc_q_BL.shape[1], doc_k_BS.shape[1]
    qi = torch.arange(L, device=doc_q_BL.device)[:, None] + q_offset
    kj = torch.arange(S, device=doc_q_BL.device)[None, :]
    causal = kj <= qi  # [L, S]
    same_doc = doc_q_BL[:, :, None] == doc_k_BS[:, None, :]  # [B, L, S]
    mask = causal & same_doc & valid_k_BS[:, None, :]
    mask = mask | (kj == qi)
    return mask[:, None]


@dataclass
class Visibility:
    """Who may attend to whom in one call of a layer stack; built once, shared by its layers.

    A *fresh* call (no keys cached before it) attends over its own tokens: ``segments``
    (long packed rows: each document its own causal sequence, :mod:`.packed_attention`,
    no ``L x S`` mask), ``causal`` (the fused causal kernel: one document, no padding)
    or a dense ``mask``. A call over a cache attends over every cached key plus its own:
    no mask when each row holds the same number of keys, all of the query's document
    (one new token per row: the common decode step), else ``mask [B, 1, L, S]``.
    ``slots`` says where the caches put the new keys; with ``rows`` (a decode step of
    the concept model on the rows that start a concept) each row reads its own keys.
    """

    doc: torch.Tensor  # [B, L] of the new tokens
    valid: torch.Tensor  # [B, L]
    mask: Optional[torch.Tensor]
    causal: bool
    all_valid: bool  # no padding among the new tokens (MoE can skip the gather)
    segments: Optional[Segments] = None
    slots: Optional[Slots] = None  # None: nothing is cached
    fresh: bool = True
    rows: Optional[list[tuple[int, int]]] = None  # sub-batch: (cache row, its key count) per query row
    row_masks: Optional[torch.Tensor] = None  # [len(rows), S] keys of the query's document
    # Flat indices (b * L + t) of the valid tokens, None when all are valid: the MoE routes
    # only these. Found here, once per stack and outside any compiled block, because the
    # count is data-dependent (torch.compile then sees it as an input's size).
    valid_flat: Optional[torch.Tensor] = None

    def __post_init__(self) -> None:
        if not self.all_valid and self.valid_flat is None:
            self.valid_flat = torch.nonzero(self.valid.flatten()).flatten()

    @classmethod
    def build(cls, doc_BL: torch.Tensor, valid_BL: torch.Tensor, index: Optional[CacheIndex] = None,
              min_segment_row: Optional[int] = None, rows: Optional[torch.Tensor] = None,
              known_doc: Optional[int] = None) -> "Visibility":
        """``index``: the stack's caches (None: nothing cached); ``rows``: the cache rows
        these ``[len(rows), 1]`` tokens belong to; ``known_doc``: the caller knows every
        token is valid and of this document (no host sync to check it). ``min_segment_row``: rows at least this
        long use per-document attention instead of a dense mask (default
        ``packed_attention.MIN_SEGMENT_ROW``; 0: always where possible, which tests use
        to compare the two)."""
        if min_segment_row is None:
            min_segment_row = packed_attention.MIN_SEGMENT_ROW
        all_valid = known_doc is not None or bool(valid_BL.all())
        L = doc_BL.shape[1]
        if index is None or index.length == 0:
            slots = index.plan(doc_BL, valid_BL, all_valid, known_doc=known_doc) if index is not None else None
            if all_valid and (known_doc is not None or bool((doc_BL == doc_BL[:, :1]).all())):
                return cls(doc_BL, valid_BL, None, True, all_valid, slots=slots)
            segments = Segments.build(doc_BL, valid_BL) if L >= min_segment_row else None
            mask = None if segments is not None else attention_mask(doc_BL, doc_BL, valid_BL)
            return cls(doc_BL, valid_BL, mask, True, all_valid, segments, slots)
        slots = index.plan(doc_BL, valid_BL, all_valid, rows, known_doc)
        if rows is not None:
            masks = None if index.uniform else index.docs()[rows] == doc_BL[:, :1]
            row_keys = torch.stack([rows, slots.lengths[rows]], 1).tolist()  # one sync: each row's key count
            return cls(doc_BL, valid_BL, None, False, all_valid, slots=slots, fresh=False,
                       rows=[tuple(r) for r in row_keys], row_masks=masks)
        if L == 1 and index.even and index.uniform:
            return cls(doc_BL, valid_BL, None, False, all_valid, slots=slots, fresh=False)
        # Each row's valid keys sit compact at the front; a new key at slot s sees the
        # keys up to s of its document (padding keys sit past the row's valid ones and
        # see only themselves and this call's other padding: never NaN, never read).
        key = torch.arange(slots.length, device=doc_BL.device)
        mask = (key <= slots.index_BL[:, :, None]) & (index.docs()[:, None, :] == doc_BL[:, :, None])
        return cls(doc_BL, valid_BL, mask[:, None], False, all_valid, slots=slots, fresh=False)


class Attention(nn.Module):
    """Multi-head causal attention with GQA and RoPE.

    Queries, keys and values come from one fused projection ``wqkv`` (rows: the query
    heads, then the key heads, then the value heads): one matmul instead of three,
    which matters for decoding, where every op is a fixed cost. With ``joint=True``
    (decoder layers) the projections also read the token's dechunked concept signal
    ``z``: ``[Q K V] = Wqkv x + Uqkv z``, with ``Uqkv`` zero-initialised so a freshly
    converted model computes exactly the baseline's attention.
    """

    def __init__(self, d_model: int, n_heads: int, n_kv_heads: int, joint: bool = False,
                 head_dim: Optional[int] = None, qkv_bias: bool = False, out_bias: bool = False,
                 qk_norm: QKNorm = "none", eps: float = 1e-6):
        super().__init__()
        self.n_heads, self.n_kv_heads = n_heads, n_kv_heads
        self.head_dim = head_dim or d_model // n_heads
        self.split = (n_heads * self.head_dim, n_kv_heads * self.head_dim, n_kv_heads * self.head_dim)
        self.wqkv = nn.Linear(d_model, sum(self.split), bias=qkv_bias)
        self.wo = nn.Linear(n_heads * self.head_dim, d_model, bias=out_bias)
        # QK-norm (pretrained checkpoints): "full" normalises the whole query / key
        # projection (OLMoE), "head" each head separately (Qwen3); before RoPE either way.
        self.qk_norm = qk_norm
        if qk_norm != "none":
            qd, kd = (self.split[0], self.split[1]) if qk_norm == "full" else (self.head_dim, self.head_dim)
            self.q_norm, self.k_norm = RMSNorm(qd, eps), RMSNorm(kd, eps)
        self.joint = joint
        if joint:
            self.uqkv = nn.Linear(d_model, sum(self.split), bias=False)
            self.uqkv.is_zero_init = True  # read by the model's init: keep it at exactly 0

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Checkpoints written before the projections were fused hold separate
        # wq/wk/wv (uq/uk/uv) matrices: stack them into the fused layout.
        for fused, parts in (("wqkv", ("wq", "wk", "wv")), ("uqkv", ("uq", "uk", "uv"))):
            keys = [f"{prefix}{p}.weight" for p in parts]
            if all(k in state_dict for k in keys) and f"{prefix}{fused}.weight" not in state_dict:
                state_dict[f"{prefix}{fused}.weight"] = torch.cat([state_dict.pop(k) for k in keys], 0)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, x_BLD: torch.Tensor, rope: torch.Tensor, vis: Visibility,
                z_BLD: Optional[torch.Tensor] = None, cache: Optional[KVCache] = None) -> torch.Tensor:
        """``rope``: the rotations of :func:`rope_rotation` for these positions."""
        B, L, _ = x_BLD.shape
        qkv = self.wqkv(x_BLD)
        if self.joint and z_BLD is not None:
            qkv = qkv + self.uqkv(z_BLD)
        q, k, v = qkv.split(self.split, dim=-1)
        if self.qk_norm == "full":
            q, k = self.q_norm(q), self.k_norm(k)
        q = q.view(B, L, self.n_heads, self.head_dim)
        k = k.view(B, L, self.n_kv_heads, self.head_dim)
        if self.qk_norm == "head":
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        v = v.view(B, L, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, rope), apply_rope(k, rope)
        if cache is not None:
            k_all, v_all = cache.append(k, v, vis.slots)
            if not vis.fresh:
                k, v = k_all, v_all
        if vis.segments is not None:
            return self.wo(segment_attention(q, k, v, vis.segments))
        gqa = self.n_heads != self.n_kv_heads
        if vis.rows is not None:
            out = rows_attention(q, cache, vis)
        elif not vis.fresh and L == 1:
            out = single_query_attention(q, k, v, None if vis.mask is None else vis.mask[:, 0, 0])
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=vis.mask,
                                                 is_causal=vis.mask is None and vis.causal, enable_gqa=gqa)
        return self.wo(out.transpose(1, 2).reshape(B, L, -1))


def single_query_attention(q_BH1d: torch.Tensor, k_BGSd: torch.Tensor, v_BGSd: torch.Tensor,
                           mask_BS: Optional[torch.Tensor] = None) -> torch.Tensor:
    """One query per row over the cached keys (decode): plain matmuls, grouped heads.

    Faster than the fused kernel for a single query on CPU (measured ~35% at 4k-16k
    keys). ``mask_BS``: the keys each row may see (default: all).
    """
    B, H, _, d = q_BH1d.shape
    G = k_BGSd.shape[1]
    q = q_BH1d.reshape(B, G, H // G, d)  # heads grouped by their kv head
    scores = torch.matmul(q, k_BGSd.transpose(-1, -2)) * (d ** -0.5)  # [B, G, H/G, S]
    if mask_BS is not None:
        scores = scores.masked_fill(~mask_BS[:, None, None, :], float("-inf"))
    out = torch.matmul(scores.softmax(-1), v_BGSd)  # [B, G, H/G, d]
    return out.reshape(B, H, 1, d)


def rows_attention(q_RH1d: torch.Tensor, cache: KVCache, vis: Visibility) -> torch.Tensor:
    """Decode queries of a sub-batch of rows, each over its own cached keys.

    The rows that start a concept at a decode step differ from row to row; each reads
    a view of its own keys (no copy), so the other rows' concept caches are not read at
    all. A batched kernel over gathered rows would first copy every selected row's
    cache (more bytes than reading the whole batch); PyTorch has no gathered-batch
    attention, so this loops over the selected rows, one fused op group each.
    """
    outs = []
    for i, (row, n) in enumerate(vis.rows):
        k, v = cache.row(row, n)
        mask = None if vis.row_masks is None else vis.row_masks[i:i + 1, :n]
        outs.append(single_query_attention(q_RH1d[i:i + 1], k, v, mask))
    return torch.cat(outs, 0)
