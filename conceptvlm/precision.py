"""Where half precision is not enough: the dtype sensitive computations run in.

Router positions, cross-entropy, MoE routing and RoPE need more than bf16's 8 mantissa
bits (bf16 holds integers exactly only up to 256). They run in float32, or in float64
when the model itself is float64: a plain ``.float()`` would cast a float64 model's values
*down*, so a float64 check against a reference would silently compare float32 results.
"""
from __future__ import annotations

import torch


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; every other floating dtype computes in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def upcast(x: torch.Tensor) -> torch.Tensor:
    """``x`` in :func:`compute_dtype` of its dtype (a no-op for float32 and float64)."""
    return x.to(compute_dtype(x.dtype))
