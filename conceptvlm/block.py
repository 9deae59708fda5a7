"""One pre-norm transformer layer: attention then a MoE feed-forward, both residual."""
from __future__ import annotations

from typing import Optional

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

    def forward(self, x_BLD: torch.Tensor, rope: torch.Tensor, vis: Visibility, z_BLD: Optional[torch.Tensor] = None,
                cache: Optional[KVCache] = None) -> tuple[torch.Tensor, MoEOutput]:
        z = self.z_norm(z_BLD) if (self.z_norm is not None and z_BLD is not None) else None
        x_BLD = x_BLD + self.attn(self.attn_norm(x_BLD), rope, vis, z, cache)
        h = self.ffn_norm(x_BLD)
        valid_BL = vis.valid
        if vis.all_valid:
            out = self.moe(h.reshape(-1, h.shape[-1]))
            ffn = out.y.view_as(h)
        else:  # route only real tokens: padding neither costs compute nor skews the balance loss
            out = self.moe(h[valid_BL])
            ffn = torch.zeros_like(h).index_put((valid_BL,), out.y)
        return x_BLD + ffn, out
