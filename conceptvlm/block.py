"""One pre-norm transformer layer: attention then a MoE feed-forward, both residual.

A block is also the unit ``torch.compile`` works on (:meth:`Block.compile_forward`,
``train.compile``). Everything with a data-dependent size is decided before a block
runs, so a compiled block has no graph break and no unbacked size: the valid tokens'
indices and the per-document attention buckets (``Visibility.build``, once per layer
stack), the concepts' positions (``chunk.locate_concepts``, between the stacks). Their
sizes reach the block as input shapes, which the compiler treats as dynamic after the
first change, instead of being found by ``nonzero`` inside it.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn as nn

from .attention import Attention, RMSNorm, Visibility
from .config import QKNorm
from .decoding_state import KVCache
from .moe import MoE, MoEOutput


class Block(nn.Module):
    def __init__(self, d_model: int, n_heads: int, n_kv_heads: int, n_experts: int, top_k: int,
                 expert_hidden: int, n_shared: int = 0, joint: bool = False, eps: float = 1e-6,
                 head_dim: Optional[int] = None, qkv_bias: bool = False, out_bias: bool = False,
                 qk_norm: QKNorm = "none", norm_topk: Optional[bool] = None, shared_hidden: Optional[int] = None,
                 shared_gate: bool = False):
        """The keywords after ``eps`` are :meth:`ModelConfig.layer_options` (pretrained-checkpoint specifics)."""
        super().__init__()
        self.attn_norm = RMSNorm(d_model, eps)
        self.attn = Attention(d_model, n_heads, n_kv_heads, joint=joint, head_dim=head_dim, qkv_bias=qkv_bias,
                              out_bias=out_bias, qk_norm=qk_norm, eps=eps)
        # Joint decoding reads the concept signal through its own norm: the residual
        # stream and the EMA'd update live on different scales.
        self.z_norm = RMSNorm(d_model, eps) if joint else None
        self.ffn_norm = RMSNorm(d_model, eps)
        self.moe = MoE(d_model, n_experts, top_k, expert_hidden, n_shared, norm_topk, shared_hidden, shared_gate)

        self.compiled: Optional[Callable] = None  # set by compile_forward

    def compile_forward(self) -> None:
        """Compile this block's forward as one graph (``fullgraph=True``: a graph break
        raises instead of silently splitting). Only calls without a KV cache (training,
        scoring) take it; decoding keeps the eager forward, whose cache appends and
        per-step shapes would only recompile. The module is not wrapped, so parameter
        and state-dict names do not change.

        ``dynamic=True``: every size is symbolic from the first call. Token and concept
        counts change with every batch, and specialising on the first sizes would cost
        one more compile per input (rope, mask, valid indices) as each first changes.
        """
        # One code object serves every block, so its cache holds every variant: kinds of
        # block x attention path (causal / mask / per-document buckets, one per bucket
        # count) x padding or not. The default limit (8) would send the rest to eager.
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        self.compiled = torch.compile(self._forward, fullgraph=True, dynamic=True)

    def forward(self, x_BLD: torch.Tensor, rope: torch.Tensor, vis: Visibility, z_BLD: Optional[torch.Tensor] = None,
                cache: Optional[KVCache] = None) -> tuple[torch.Tensor, MoEOutput]:
        if self.compiled is not None and cache is None:
            return self.compiled(x_BLD, rope, vis, z_BLD)
        return self._forward(x_BLD, rope, vis, z_BLD, cache)

    def _forward(self, x_BLD: torch.Tensor, rope: torch.Tensor, vis: Visibility, z_BLD: Optional[torch.Tensor] = None,
                 cache: Optional[KVCache] = None) -> tuple[torch.Tensor, MoEOutput]:
        z = self.z_norm(z_BLD) if (self.z_norm is not None and z_BLD is not None) else None
        x_BLD = x_BLD + self.attn(self.attn_norm(x_BLD), rope, vis, z, cache)
        h = self.ffn_norm(x_BLD)
        if vis.all_valid:
            out = self.moe(h.reshape(-1, h.shape[-1]))
            ffn = out.y.view_as(h)
        else:  # route only real tokens: padding neither costs compute nor skews the balance loss
            h_ND = h.reshape(-1, h.shape[-1])
            out = self.moe(h_ND[vis.valid_flat])
            ffn = torch.zeros_like(h_ND).index_copy(0, vis.valid_flat, out.y).view_as(h)
        return x_BLD + ffn, out


def compile_blocks(model: nn.Module) -> int:
    """:meth:`Block.compile_forward` for every block of ``model``; returns how many.

    Blocks of the same shape share their compiled graphs (parameters are graph inputs),
    so a model compiles one graph per kind of block (encoder, concept, joint decoder).
    """
    blocks = [m for m in model.modules() if isinstance(m, Block)]
    for b in blocks:
        b.compile_forward()
    return len(blocks)
