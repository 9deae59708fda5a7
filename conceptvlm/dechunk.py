"""Dechunk: bring the concept model's result back to every token.

``z_j = P_j u_j + (1 - P_j) z_{j-1}`` smooths the concept model's *update*
``u_j = chat_j - c_j`` across concepts (``P_j`` = the boundary probability of concept
j's first token), every token of chunk j receives ``z_j``, and the decoder input is
``h_t + z_{j(t)} * STE(conf_t)``. Smoothing the update rather than the output means
that with every token a boundary the decoder sees exactly ``h_t + u_t``: the baseline
MoE's residual stream, which is what makes conversion from a plain MoE lossless.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

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


def dechunk(update_BMD: torch.Tensor, chunks: Chunks,
            z0_BD: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Smooth concept updates with the EMA and hand ``z_{j(t)} * STE(conf_t)`` to each token.

    ``z0`` is the EMA state carried in from earlier tokens (incremental decoding); tokens
    of the chunk that come before its first boundary still belong to that concept.
    Returns the decoder's concept signal ``[B, L, D]`` and each row's final EMA state.
    """
    B, M, D = update_BMD.shape
    P_BM = gather_rows(chunks.prob_BL, chunks.pos_BM)
    # Padded concept slots come after the real ones, so their value never flows back;
    # P = 1 keeps the scan free of whatever they hold.
    P_BM = torch.where(chunks.valid_BM, P_BM, torch.ones_like(P_BM))
    # Slot 0 holds the carried state: with p = 1 the scan starts exactly from it.
    z0 = update_BMD.new_zeros(B, 1, D) if z0_BD is None else z0_BD[:, None].to(update_BMD.dtype)
    z_BMD = ema_scan(torch.cat([z0, update_BMD], 1), F.pad(P_BM, (1, 0), value=1.0))
    concept_of = torch.cumsum(chunks.boundary_BL.long(), 1)  # 0 = the carried concept
    z_BLD = gather_rows(z_BMD, concept_of)
    last = torch.gather(z_BMD, 1, chunks.valid_BM.sum(1).view(B, 1, 1).expand(B, 1, D)).squeeze(1)
    p = chunks.prob_BL
    conf_BL = torch.where(chunks.boundary_BL, p, 1.0 - p)
    return z_BLD * straight_through_one(conf_BL).unsqueeze(-1).to(z_BLD.dtype), last
