"""Attention over packed documents without an ``L x S`` mask.

A packed training row holds several documents, and a token may only see earlier
tokens of its own document. A dense boolean mask ``[B, 1, L, L]`` says so at O(L^2)
memory per row (32k tokens x batch 8 = 8 GB) and, on GPU, rules out the flash kernels.
Here every document becomes its own sequence instead: documents are gathered into a
few padded batches (one per length bucket, lengths within 2x of each other) and each
batch runs plain causal ``scaled_dot_product_attention`` (fused kernel, no mask), then
the outputs are scattered back. Memory is linear in L; wasted compute is bounded by
the bucket padding. Padding slots come after each document's real tokens, so the
causal kernel never lets a real query see them.

Rows qualify when document ids never decrease along their valid tokens (what the
packer writes); anything else keeps the dense mask (``Visibility.build``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

# Below this many tokens per row the dense mask is cheaper than gathering documents.
MIN_SEGMENT_ROW = 512


@dataclass
class Segments:
    """Where each document of a batch of packed rows goes in the per-bucket batches."""

    # (gather [n, T], flat index into n * T of the real slots, flat row index of each real slot)
    buckets: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
    pad_flat: torch.Tensor  # flat indices (b * L + t) of padding tokens
    B: int
    L: int

    @classmethod
    def build(cls, doc_BL: torch.Tensor, valid_BL: torch.Tensor) -> Optional["Segments"]:
        """Segments of valid tokens with the same document id (a row boundary always splits).

        None when a row's document ids decrease somewhere (a document would be split in
        two runs that may see each other): the caller then uses the dense mask.
        """
        B, L = doc_BL.shape
        flat = torch.arange(B * L, device=doc_BL.device).view(B, L)
        idx = flat[valid_BL]  # valid tokens in row-major order
        if idx.numel() == 0:
            return None
        doc = doc_BL[valid_BL]
        row = idx // L
        same_row = row[1:] == row[:-1]
        if bool((same_row & (doc[1:] < doc[:-1])).any()):
            return None
        new = torch.ones_like(idx, dtype=torch.bool)
        new[1:] = (doc[1:] != doc[:-1]) | ~same_row
        starts = torch.nonzero(new).flatten()  # index into idx of each segment's first token
        lengths = torch.diff(starts, append=starts.new_tensor([idx.numel()]))
        bucket_of = torch.ceil(torch.log2(lengths.double())).long()  # lengths within 2x share a bucket
        buckets = []
        for b in torch.unique(bucket_of).tolist():  # a handful of buckets (log2 L at most)
            sel = torch.nonzero(bucket_of == b).flatten()
            T = int(lengths[sel].max())
            offs = torch.arange(T, device=idx.device)
            real = offs[None, :] < lengths[sel, None]  # [n, T]
            src = (starts[sel, None] + offs[None, :]).clamp_max(idx.numel() - 1)
            src = torch.where(real, src, starts[sel, None])  # padded slots repeat a real token (never seen)
            # Index tensors, not boolean masks: a mask's selection has a data-dependent size
            # inside the (possibly compiled) attention; an index tensor's size is its own.
            buckets.append((idx[src], torch.nonzero(real.flatten()).flatten(), idx[src][real]))
        return cls(buckets, flat[~valid_BL], B, L)


def segment_attention(q_BHLd: torch.Tensor, k_BGLd: torch.Tensor, v_BGLd: torch.Tensor,
                      seg: Segments) -> torch.Tensor:
    """Causal attention within each document; returns ``[B, L, H * d]``.

    Equal to masked attention with the document + causal + padding mask; a padding
    query, like there, sees only its own key (its output is its own value).
    """
    B, H, L, d = q_BHLd.shape
    G = k_BGLd.shape[1]
    q = q_BHLd.transpose(1, 2).reshape(B * L, H, d)
    k = k_BGLd.transpose(1, 2).reshape(B * L, G, d)
    v = v_BGLd.transpose(1, 2).reshape(B * L, G, d)
    out = q.new_empty(B * L, H, d)
    for gather_nT, real, dest in seg.buckets:
        n, T = gather_nT.shape
        pick = lambda x: x[gather_nT.flatten()].view(n, T, -1, d).transpose(1, 2)  # noqa: E731
        o = F.scaled_dot_product_attention(pick(q), pick(k), pick(v), is_causal=True, enable_gqa=G != H)
        out[dest] = o.transpose(1, 2).reshape(n * T, H, d)[real]
    if seg.pad_flat.numel():
        out[seg.pad_flat] = v[seg.pad_flat].repeat_interleave(H // G, dim=1)
    return out.view(B, L, H * d)
