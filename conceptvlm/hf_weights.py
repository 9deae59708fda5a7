"""transformers MoE weights -> ConceptMoE weights, one layer at a time.

Layouts differ in four ways, each undone here:

* RoPE: transformers rotates the pair ``(x[j], x[j + d/2])`` of a head ("rotate half"),
  ConceptMoE the pair ``(x[2i], x[2i + 1])``. Permuting each query / key head's output
  rows (and the matching bias and QK-norm entries) by ``[0, d/2, 1, d/2 + 1, ...]``
  makes one the other; attention scores are unchanged because queries and keys move
  together, and an RMSNorm over the whole projection does not see the order.
* q / k / v are stacked into the fused ``wqkv`` (rows: queries, keys, values).
* experts are stacked per layer, stored ``[E, in, out]`` (the transpose of ``nn.Linear``).
  Hub checkpoints hold one matrix per expert; a fused ``gate_up_proj [E, 2H, D]`` /
  ``down_proj [E, D, H]`` (transformers' in-memory layout) is read too.
* names: ``model.layers.{i}`` becomes the i-th layer of the encoder / concept /
  decoder split (:func:`conceptvlm.convert.block_prefixes`).
"""
from __future__ import annotations

from typing import Optional

import torch

from .config import ModelConfig
from .safetensors_stream import CheckpointError, ShardedReader


def rope_pair_order(head_dim: int) -> torch.Tensor:
    """Index ``p`` with ``new[j] = old[p[j]]``: rotate-half pairs -> adjacent pairs."""
    return torch.arange(head_dim).view(2, head_dim // 2).t().reshape(-1)


def _per_head(x: torch.Tensor, n_heads: int, head_dim: int) -> torch.Tensor:
    """Reorder rows (dim 0) inside each of ``n_heads`` heads for our RoPE pairing."""
    order = rope_pair_order(head_dim)
    return x.reshape(n_heads, head_dim, *x.shape[1:])[:, order].reshape(x.shape)


class LayerMapper:
    """Reads checkpoint tensors and returns them under ConceptMoE names (within a layer
    prefix, or the model-level ones)."""

    def __init__(self, reader: ShardedReader, family: str, cfg: ModelConfig):
        self.r, self.family, self.cfg = reader, family, cfg

    def _get(self, keys: list[str], shapes: list[tuple[int, ...]]) -> list[torch.Tensor]:
        got = self.r.read(keys)
        for k, shape in zip(keys, shapes):
            if tuple(got[k].shape) != tuple(shape):
                raise CheckpointError(f"tensor {k} has shape {list(got[k].shape)}, the config says {list(shape)}")
        return [got[k] for k in keys]  # the checkpoint's dtype: the writer casts once, at the end

    # ------------------------------------------------------------ attention
    def attention(self, src: str) -> dict[str, torch.Tensor]:
        c = self.cfg
        H, G, hd, D = c.n_heads, c.n_kv_heads, c.attn_head_dim, c.d_model
        a = f"{src}self_attn."
        q, k, v, o = self._get([f"{a}q_proj.weight", f"{a}k_proj.weight", f"{a}v_proj.weight", f"{a}o_proj.weight"],
                               [(H * hd, D), (G * hd, D), (G * hd, D), (D, H * hd)])
        out = {"attn.wqkv.weight": torch.cat([_per_head(q, H, hd), _per_head(k, G, hd), v]), "attn.wo.weight": o}
        if c.qkv_bias:
            qb, kb, vb = self._get([f"{a}q_proj.bias", f"{a}k_proj.bias", f"{a}v_proj.bias"],
                                   [(H * hd,), (G * hd,), (G * hd,)])
            out["attn.wqkv.bias"] = torch.cat([_per_head(qb, H, hd), _per_head(kb, G, hd), vb])
        if c.attn_out_bias:
            out["attn.wo.bias"], = self._get([f"{a}o_proj.bias"], [(D,)])
        if c.qk_norm != "none":
            full = c.qk_norm == "full"
            qn, kn = self._get([f"{a}q_norm.weight", f"{a}k_norm.weight"],
                               [(H * hd,), (G * hd,)] if full else [(hd,), (hd,)])
            out["attn.q_norm.weight"] = _per_head(qn, H if full else 1, hd)
            out["attn.k_norm.weight"] = _per_head(kn, G if full else 1, hd)
        return out

    # ------------------------------------------------------------ experts
    def moe(self, src: str) -> dict[str, torch.Tensor]:
        c, m = self.cfg, self.cfg.moe
        E, D, Hx = m.n_experts, c.d_model, m.expert_hidden
        mlp = f"{src}block_sparse_moe." if self.family == "mixtral" else f"{src}mlp."
        out = {"moe.router.weight": self._get([f"{mlp}gate.weight"], [(E, D)])[0]}
        if f"{mlp}experts.gate_up_proj" in self.r:  # fused layout
            gu, dn = self._get([f"{mlp}experts.gate_up_proj", f"{mlp}experts.down_proj"], [(E, 2 * Hx, D), (E, D, Hx)])
            out["moe.experts.w1_EDH"] = gu[:, :Hx].transpose(1, 2)
            out["moe.experts.w3_EDH"] = gu[:, Hx:].transpose(1, 2)
            out["moe.experts.w2_EHD"] = dn.transpose(1, 2)
        else:
            names = ("w1", "w3", "w2") if self.family == "mixtral" else ("gate_proj", "up_proj", "down_proj")
            for ours, theirs, shape in zip(("w1_EDH", "w3_EDH", "w2_EHD"), names, ((Hx, D), (Hx, D), (D, Hx))):
                per = self._get([f"{mlp}experts.{e}.{theirs}.weight" for e in range(E)], [shape] * E)
                out[f"moe.experts.{ours}"] = torch.stack([w.t() for w in per])
                del per
        if m.n_shared_experts:
            S = m.shared_expert_hidden or Hx * m.n_shared_experts
            s = f"{mlp}shared_expert."
            w1, w3, w2 = self._get([f"{s}gate_proj.weight", f"{s}up_proj.weight", f"{s}down_proj.weight"],
                                   [(S, D), (S, D), (D, S)])
            out.update({"moe.shared.w1.weight": w1, "moe.shared.w3.weight": w3, "moe.shared.w2.weight": w2})
            if m.shared_expert_gate:
                out["moe.shared_gate.weight"], = self._get([f"{mlp}shared_expert_gate.weight"], [(1, D)])
        return out

    def layer(self, i: int) -> dict[str, torch.Tensor]:
        """Layer ``i`` of the checkpoint, names relative to a block prefix."""
        src = f"model.layers.{i}."
        D = self.cfg.d_model
        n1, n2 = self._get([f"{src}input_layernorm.weight", f"{src}post_attention_layernorm.weight"], [(D,), (D,)])
        return {"attn_norm.weight": n1, "ffn_norm.weight": n2, **self.attention(src), **self.moe(src)}

    # ------------------------------------------------------------ model level
    def embeddings(self, hf_vocab: int, vocab: int, mean_rows: list[int]) -> dict[str, torch.Tensor]:
        """Embedding, final norm and head (``lm.``-relative names). Rows past the
        checkpoint's vocabulary and ``mean_rows`` (tokens added to its tokenizer) start
        as the mean of the checkpoint's rows."""
        D = self.cfg.d_model
        keys, shapes = ["model.embed_tokens.weight", "model.norm.weight"], [(hf_vocab, D), (D,)]
        if not self.cfg.tie_embeddings:
            keys.append("lm_head.weight")
            shapes.append((hf_vocab, D))
        got = self._get(keys, shapes)
        out = {"embed.weight": _grown(got[0], vocab, mean_rows), "norm.weight": got[1]}
        out["lm_head.weight"] = out["embed.weight"] if self.cfg.tie_embeddings else _grown(got[2], vocab, mean_rows)
        return out


def _grown(w: torch.Tensor, rows: int, mean_rows: Optional[list[int]]) -> torch.Tensor:
    """``w`` with ``rows`` rows; new ones and ``mean_rows`` set to the mean of ``w``'s rows
    (in place when no row is added: ``w`` is this module's own copy)."""
    # float64 sums over blocks of rows: a float64 copy of a 50k-row embedding would be 4x its size
    total = sum(w[i:i + 4096].double().sum(0) for i in range(0, w.shape[0], 4096))
    mean = (total / w.shape[0]).to(w.dtype)
    out = w
    if rows > w.shape[0]:
        out = torch.empty(rows, w.shape[1], dtype=w.dtype)
        out[:w.shape[0]] = w
        out[w.shape[0]:] = mean
    for r in mean_rows or []:
        out[r] = mean
    return out
