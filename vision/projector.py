"""`Projector`: vision features -> LM embeddings, with optional patch reduction.

Reduction sets how many image tokens enter the LM (and so how much the chunker has to
compress): pixel-shuffle keeps every feature by stacking an r x r neighbourhood into the
channels (InternVL / Idefics3 style); average pooling discards detail but keeps width.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from .config import PROJECTORS, REDUCTIONS

if TYPE_CHECKING:
    from .towers import VisionTower

# Patch vectors of one image spread less than this (see patch_spread): nearly one vector,
# so the language model cannot see where anything is. A random tiny tower gives ~0.33,
# towers that localise ~1, the collapsed ones measured in grounding_cells 0.04-0.07.
COLLAPSED_BELOW = 0.15


def patch_spread(tokens_NPD: torch.Tensor) -> torch.Tensor:
    """How far apart the patch vectors of an image are, as a 0-dim tensor: the std across
    the patches of one image, per feature, times sqrt(width), over the mean patch norm
    (dimensionless: 0 for one vector everywhere, ~1 for independent features).

    A tower or projector that drifts to one output for every patch leaves a grounding
    model at the answer prior however long it trains, so training logs this number."""
    x = tokens_NPD.float()
    within = x.std(1).mean()
    return within * x.shape[-1] ** 0.5 / x.norm(dim=-1).mean().clamp_min(1e-12)


class Projector(nn.Module):
    """``[N, prefix + rows*cols, vision_width]`` -> ``[N, tokens_per_image, lm_width]``.

    Args:
        vision_width: Dv, the tower's feature size.
        lm_width: D, the language model's embedding size.
        grid: (rows, cols) of the tower's patch grid (tokens are row-major).
        kind: ``'mlp'`` (Linear-GELU-Linear, LLaVA-1.5) or ``'linear'``.
        reduction: ``'none'``, ``'pixel_shuffle'`` or ``'avg_pool'``.
        factor: r, the side of the reduced r x r neighbourhood (1 for ``'none'``).
        prefix_tokens: leading non-grid tokens (a kept class token), projected unreduced.

    Attributes:
        output_grid: (rows // r, cols // r).
        tokens_per_image: prefix_tokens + output rows * output cols.
    """

    def __init__(
        self,
        vision_width: int,
        lm_width: int,
        grid: tuple[int, int],
        kind: str = "mlp",
        reduction: str = "none",
        factor: int = 1,
        prefix_tokens: int = 0,
    ) -> None:
        super().__init__()
        if vision_width < 1 or lm_width < 1:
            raise ValueError(f"Projector widths must be positive, got vision {vision_width}, lm {lm_width}")
        if kind not in PROJECTORS:
            raise ValueError(f"Projector kind must be one of {PROJECTORS}, got {kind!r}")
        if reduction not in REDUCTIONS:
            raise ValueError(f"Projector reduction must be one of {REDUCTIONS}, got {reduction!r}")
        if (reduction == "none") != (factor == 1) or factor < 1:
            needed = "1" if reduction == "none" else ">= 2"
            raise ValueError(f"reduction={reduction!r} needs factor {needed}, got {factor}")
        rows, cols = grid
        if rows % factor or cols % factor:
            raise ValueError(
                f"patch grid {rows}x{cols} is not divisible by reduction factor {factor} ({reduction}); "
                f"choose a factor that divides both, or an image_size giving such a grid"
            )
        if prefix_tokens and reduction != "none":
            raise ValueError("a class token cannot be reduced with the patch grid; use reduction='none'")
        self.vision_width = vision_width
        self.lm_width = lm_width
        self.grid = (rows, cols)
        self.kind = kind
        self.reduction = reduction
        self.factor = factor
        self.prefix_tokens = prefix_tokens
        self.output_grid = (rows // factor, cols // factor)
        self.tokens_per_image = prefix_tokens + self.output_grid[0] * self.output_grid[1]

        in_width = vision_width * factor * factor if reduction == "pixel_shuffle" else vision_width
        if kind == "mlp":
            self.proj: nn.Module = nn.Sequential(
                nn.Linear(in_width, lm_width), nn.GELU(), nn.Linear(lm_width, lm_width)
            )
        else:
            self.proj = nn.Linear(in_width, lm_width)

    @classmethod
    def for_tower(cls, tower: VisionTower, lm_width: int) -> Projector:
        """The projector `tower.config` asks for (kind, reduction, factor), sized to ``tower``."""
        cfg = tower.config
        return cls(
            tower.width, lm_width, tower.grid, kind=cfg.projector, reduction=cfg.reduction,
            factor=cfg.reduction_factor, prefix_tokens=int(cfg.keep_cls_token),
        )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """``features [N, P, Dv]`` -> ``[N, tokens_per_image, lm_width]``."""
        n, p, dv = features.shape
        rows, cols = self.grid
        if p != self.prefix_tokens + rows * cols or dv != self.vision_width:
            raise ValueError(
                f"Projector expects [N, {self.prefix_tokens + rows * cols}, {self.vision_width}] "
                f"({self.prefix_tokens} prefix + {rows}x{cols} patches), got {list(features.shape)}"
            )
        if self.reduction == "none":
            return self.proj(features)  # a kept class token is projected like a patch
        r = self.factor  # no prefix tokens here (checked in __init__)
        x = features.reshape(n, rows // r, r, cols // r, r, dv)  # [N, R', r, C', r, Dv]
        if self.reduction == "pixel_shuffle":
            # Channels ordered (dy, dx, Dv): the r x r neighbours side by side.
            x = x.permute(0, 1, 3, 2, 4, 5)  # [N, R', C', r, r, Dv]
            x_NPD = x.reshape(n, (rows // r) * (cols // r), r * r * dv)
        else:
            x_NPD = x.mean(dim=(2, 4)).reshape(n, (rows // r) * (cols // r), dv)
        return self.proj(x_NPD)

    def extra_repr(self) -> str:
        return (
            f"grid={self.grid}, reduction={self.reduction!r}, factor={self.factor}, "
            f"output_grid={self.output_grid}, tokens_per_image={self.tokens_per_image}"
        )
