"""Positions: where each token sits, for RoPE and for the ``fixed`` router.

* :func:`positions_in_document`: a token's index inside its document of a packed row
  (1D RoPE), continuing across incremental-decoding calls;
* :func:`segment_positions`: its index inside its forced segment (document and
  modality runs), which the ``fixed`` router spaces boundaries by;
* :func:`image_positions_2d`: (row, column) positions of image patches (2D RoPE).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from .decoding_state import Previous


def segment_positions(forced_BL: torch.Tensor, prev_pos_B: torch.Tensor | None = None) -> torch.Tensor:
    """Index of each token inside its forced segment (0 at every forced boundary).

    Tokens before the chunk's first forced boundary continue ``prev_pos + 1``.
    """
    L = forced_BL.shape[1]
    if L == 1 and prev_pos_B is not None:  # a decode step: 0 at a forced boundary, else one on
        return torch.where(forced_BL, 0, prev_pos_B[:, None] + 1)
    t = torch.arange(L, device=forced_BL.device).expand_as(forced_BL)
    last_start = torch.where(forced_BL, t, torch.zeros_like(t)).cummax(dim=1).values
    pos = t - last_start
    if prev_pos_B is not None:
        continuing = torch.cumsum(forced_BL.long(), 1) == 0
        pos = pos + continuing * (prev_pos_B[:, None] + 1)
    return pos


def positions_in_document(doc_BL: torch.Tensor, valid_BL: torch.Tensor, prev: "Previous") -> torch.Tensor:
    """RoPE position of each token: its index inside its document of the packed row.

    Tokens continuing ``prev``'s document (incremental decoding) carry on from its position.
    """
    first = torch.where(prev.valid, prev.doc, torch.full_like(prev.doc, -(2**31)))[:, None]
    starts = (doc_BL != torch.cat([first, doc_BL[:, :-1]], 1)) | ~valid_BL
    return segment_positions(starts, prev.pos)


def image_positions_2d(pos_BL: torch.Tensor, is_image_BL: torch.Tensor, patch_order: torch.Tensor,
                       cols: int) -> torch.Tensor:
    """``[B, L, 2]`` positions: (t, t) for text, (start + row, start + col) for patches.

    ``patch_order[k]``: the raster index of the patch at slot k of an image block;
    ``cols``: patches per grid row.
    """
    is_img = is_image_BL
    # k-th patch of its image block: count of image tokens since the block started.
    k = torch.cumsum(is_img.long(), 1)
    block_start = torch.where(is_img & ~F.pad(is_img, (1, 0))[:, :-1], k, 0).cummax(1).values
    k = k - block_start  # 0-based slot within the block
    raster = patch_order.to(pos_BL.device)[k.clamp(0, patch_order.numel() - 1)]
    start = pos_BL - k  # position of the first patch
    row = torch.where(is_img, start + raster // cols, pos_BL)
    col = torch.where(is_img, start + raster % cols, pos_BL)
    return torch.stack([row, col], -1)
