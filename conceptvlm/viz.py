"""Pictures of where the chunker put its boundaries: on an image's patch grid and on text."""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import torch

from .chunk import IMAGE, TEXT


def _palette(n: int):
    import matplotlib

    cmap = matplotlib.colormaps["tab20"]
    return [cmap(i % 20) for i in range(max(n, 1))]


def image_concept_grid(boundary_P: torch.Tensor, patch_order: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Concept id of every grid cell ``[rows, cols]`` from one image block's boundaries.

    ``boundary_P`` is in sequence order; ``patch_order[k]`` is the raster cell at slot k.
    """
    rows, cols = grid
    concept_of_slot = torch.cumsum(boundary_P.long(), 0) - 1
    cells = torch.empty(rows * cols, dtype=torch.long)
    cells[patch_order.cpu()] = concept_of_slot.cpu()
    return cells.view(rows, cols)


def draw_image_concepts(ax, image_3HW: Optional[torch.Tensor], concept_grid: torch.Tensor, title: str = "") -> None:
    """The image (if given) with each concept region tinted and its borders outlined."""
    import numpy as np

    rows, cols = concept_grid.shape
    ids = concept_grid.numpy()
    colors = np.array(_palette(int(ids.max()) + 1))[:, :3]
    overlay = colors[ids]  # [rows, cols, 3]
    if image_3HW is not None:
        img = image_3HW.detach().float().cpu()
        img = (img - img.min()) / (img.max() - img.min() + 1e-8)
        ax.imshow(img.permute(1, 2, 0).numpy(), extent=(0, cols, rows, 0))
        ax.imshow(overlay, alpha=0.45, extent=(0, cols, rows, 0), interpolation="nearest")
    else:
        ax.imshow(overlay, extent=(0, cols, rows, 0), interpolation="nearest")
    for r in range(rows):  # borders between cells of different concepts
        for c in range(cols):
            if c + 1 < cols and ids[r, c] != ids[r, c + 1]:
                ax.plot([c + 1, c + 1], [r, r + 1], color="k", lw=1.2)
            if r + 1 < rows and ids[r, c] != ids[r + 1, c]:
                ax.plot([c, c + 1], [r + 1, r + 1], color="k", lw=1.2)
    ax.set_xticks([])
    ax.set_yticks([])
    n = int(ids.max()) + 1
    ax.set_title(f"{title}\n{rows * cols} patches -> {n} concepts", fontsize=9)


def text_with_boundaries(pieces: Sequence[str], boundary: Sequence[bool]) -> str:
    """``"the |cat |sat"``-style rendering: a bar before every token that starts a concept."""
    return "".join(("|" if b and i else "") + p for i, (p, b) in enumerate(zip(pieces, boundary)))


def draw_text_concepts(ax, pieces: Sequence[str], boundary: Sequence[bool], title: str = "",
                       width: int = 60) -> None:
    """Text with alternating colours per concept, wrapped at ``width`` characters."""
    colors = ["#1f77b4", "#d62728"]
    ax.axis("off")
    x = y = 0
    concept = -1
    for p, b in zip(pieces, boundary):
        if b:
            concept += 1
        for ch in p.replace("\n", " "):
            if x >= width:
                x, y = 0, y + 1
            ax.text(x, -y, ch, color=colors[concept % 2], family="monospace", fontsize=9,
                    fontweight="bold" if concept % 2 else "normal")
            x += 1
    ax.set_xlim(-1, width + 1)
    ax.set_ylim(-y - 1.5, 1.5)
    n_tok = len(pieces)
    ax.set_title(f"{title}  ({n_tok} tokens -> {max(concept + 1, 0)} concepts; colour changes at boundaries)",
                 fontsize=9)


@torch.no_grad()
def boundary_figure(vlms: dict, input_ids: torch.Tensor, images: Optional[torch.Tensor], decode_piece,
                    path: str | Path) -> Path:
    """One row per model: its concept regions on each image of the sample and on its text.

    ``vlms`` maps a label to a ConceptVLM; ``input_ids [1, L]`` is one interleaved row,
    ``decode_piece(id) -> str`` renders one text token.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n_img = 0 if images is None else images.shape[0]
    fig, axes = plt.subplots(len(vlms), n_img + 1, figsize=(3 * n_img + 7, 2.8 * len(vlms)), squeeze=False,
                             gridspec_kw={"width_ratios": [1] * n_img + [2.5]})
    for row, (label, vlm) in enumerate(vlms.items()):
        was_training = vlm.training
        vlm.eval()
        out = vlm(input_ids, images=images)
        vlm.train(was_training)
        mod = vlm.modality(input_ids)[0]
        b = out.boundary[0].cpu()
        starts = torch.nonzero((mod == IMAGE) & ~torch.nn.functional.pad(mod == IMAGE, (1, 0))[:-1]).flatten()
        for k, s in enumerate(starts.tolist()[:n_img]):
            block = b[s:s + vlm.tokens_per_image]
            grid = image_concept_grid(block, vlm.patch_order, vlm.image_grid)
            draw_image_concepts(axes[row, k], images[k], grid, f"{label}: image {k}")
        text_idx = torch.nonzero(mod == TEXT).flatten().tolist()
        pieces = [decode_piece(int(input_ids[0, i])) for i in text_idx]
        draw_text_concepts(axes[row, -1], pieces, [bool(b[i]) for i in text_idx], f"{label}: text")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
