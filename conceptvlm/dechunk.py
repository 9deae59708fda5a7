"""Dechunk: bring the concept model's result back to every token.

``z_j = P_j u_j + (1 - P_j) z_{j-1}`` smooths the concept model's *update*
``u_j = chat_j - c_j`` across concepts (``P_j`` = the boundary probability of concept
j's first token), every token of chunk j receives ``z_j``, and the decoder input is
``h_t + z_{j(t)} * STE(conf_t)``. Smoothing the update rather than the output means
that with every token a boundary the decoder sees exactly ``h_t + u_t``: the baseline
MoE's residual stream, which is what makes conversion from a plain MoE lossless.
"""
from __future__ import annotations

import torch

from .chunk import Chunks, gather_rows


def ema_scan(x: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """``z_j = p_j x_j + (1 - p_j) z_{j-1}``, ``z_{-1} = 0``, along dim 1 of ``x [B, M, D]``.

    A Hillis-Steele parallel scan over the affine maps ``z -> a z + b`` with
    ``a = 1 - p``, ``b = p x``: ``ceil(log2 M)`` vectorised steps, each composing every
    element with the one ``s`` places earlier. Only products and sums are used, so it
    is exact at ``p = 0`` and ``p = 1`` (a log-space cumsum would take ``log(0)``) and
    differentiable everywhere.
    """
    if x.dim() != 3 or p.shape != x.shape[:2]:
        raise ValueError(f"ema_scan expects x [B, M, D] and p [B, M], got {tuple(x.shape)} and {tuple(p.shape)}")
    a = (1.0 - p).unsqueeze(-1).to(x.dtype)  # [B, M, 1]
    b = p.unsqueeze(-1).to(x.dtype) * x  # [B, M, D]
    M, s = x.shape[1], 1
    while s < M:
        # Compose (a_j, b_j) after (a_{j-s}, b_{j-s}): z = a_j (a_{j-s} z + b_{j-s}) + b_j.
        b = torch.cat([b[:, :s], b[:, s:] + a[:, s:] * b[:, :-s]], dim=1)
        a = torch.cat([a[:, :s], a[:, s:] * a[:, :-s]], dim=1)
        s *= 2
    return b


def straight_through_one(conf: torch.Tensor) -> torch.Tensor:
    """1 in the forward pass; the gradient of ``conf`` in the backward pass."""
    return 1.0 + conf - conf.detach()


def dechunk(update_BMD: torch.Tensor, chunks: Chunks) -> torch.Tensor:
    """Smooth concept updates with the EMA and hand ``z_{j(t)} * STE(conf_t)`` to each token."""
    P_BM = gather_rows(chunks.prob_BL, chunks.pos_BM)
    # Padded concept slots come after the real ones, so their value never flows back;
    # P = 1 keeps the scan free of whatever they hold.
    P_BM = torch.where(chunks.valid_BM, P_BM, torch.ones_like(P_BM))
    z_BMD = ema_scan(update_BMD, P_BM)
    z_BLD = gather_rows(z_BMD, chunks.concept_of_BL)
    p = chunks.prob_BL
    conf_BL = torch.where(chunks.boundary_BL, p, 1.0 - p)
    return z_BLD * straight_through_one(conf_BL).unsqueeze(-1).to(z_BLD.dtype)
