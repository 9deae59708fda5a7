"""ConceptVLM: vision tower + projector + ConceptMoE, over interleaved image-text rows.

The data pipeline writes each image as ``image_start, image * n, image_end`` in the
token row (``n = tokens_per_image``). Here the ``image`` placeholders' embeddings are
replaced, in row-major order, by the projected patches of ``images``; a modality mask
(text / image patch / marker) goes to the chunk module, which keeps a separate ratio
loss per modality and forces boundaries at markers and modality changes, so no concept
spans text and image. Labels are never computed on image positions or markers.

Options beyond the paper (its first open question: 1D merging of flattened patches
breaks spatial structure):

* ``image_positions="2d"``: patches get (row, column) rotary positions (M-RoPE style,
  interleaved: even rotary frequencies follow the row, odd ones the column, so both
  axes get fast and slow frequencies; text keeps ``(t, t)``, which is exactly 1D RoPE).
* ``image_order="hilbert"``: an image's patches enter the sequence along a Hilbert
  curve, so consecutive tokens are grid neighbours and every run the chunker merges is
  a compact 2D region instead of a strip of a raster row.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn as nn

from .chunk import IMAGE, MARKER, TEXT, RatioTargets
from .config import VLMConfig
from .decoding_state import InferenceState
from .model import IGNORE_INDEX, ConceptMoE, ModelOutput
from .positions import image_positions_2d

def hilbert_index(rows: int, cols: int) -> torch.Tensor:
    """Distance of each raster cell ``r * cols + c`` along a Hilbert curve over the grid.

    Uses the smallest enclosing power-of-two square; on non-square grids the order
    still visits compact blocks, only with occasional jumps.
    """
    n = 1
    while n < max(rows, cols):
        n *= 2
    r = torch.arange(rows).repeat_interleave(cols)
    c = torch.arange(cols).repeat(rows)
    x, y, d = c.clone(), r.clone(), torch.zeros_like(r)
    s = n // 2
    while s > 0:  # classic xy -> d conversion, vectorised over cells (loop is over bits)
        rx = (x & s) > 0
        ry = (y & s) > 0
        d += s * s * ((3 * rx.long()) ^ ry.long())
        swap = ~ry
        flip = swap & rx
        x = torch.where(flip, n - 1 - x, x)
        y = torch.where(flip, n - 1 - y, y)
        x, y = torch.where(swap, y, x), torch.where(swap, x, y)
        s //= 2
    return d


class ConceptVLM(nn.Module):
    """Vision tower + projector + :class:`ConceptMoE`."""

    def __init__(self, config: VLMConfig):
        super().__init__()
        self.config = config
        self.lm = ConceptMoE(config.model)
        self.tower = self.projector = self.image_processor = None
        self.tokens_per_image, self.image_grid = 0, (0, 0)
        if config.vision is not None:
            from .vision import ImageProcessor, Projector, VisionTower

            self.tower = VisionTower(config.vision)
            self.projector = Projector.for_tower(self.tower, config.model.d_model)
            self.image_processor = ImageProcessor.from_tower(self.tower)
            self.tokens_per_image = self.projector.tokens_per_image
            self.image_grid = tuple(self.projector.output_grid)
        # Raster index of the patch placed at each sequence slot of an image block.
        self.register_buffer("patch_order", self.default_patch_order(), persistent=False)

    def default_patch_order(self) -> torch.Tensor:
        """The ``patch_order`` buffer's value (derived from the config, so never saved)."""
        rows, cols = self.image_grid
        if self.config.image_order == "hilbert" and rows:
            return torch.argsort(hilbert_index(rows, cols))
        return torch.arange(rows * cols)

    def generate(self, tokenizer: Any, prompts: str | list[str], images: Optional[list] = None,
                 **options: Any) -> str | list[str]:
        """Answer a prompt (or a list of prompts, batched) about images: ``images`` is a list of
        paths / URLs / PIL images for one prompt, or one such list per prompt. ``options``:
        ``max_new_tokens``, ``temperature`` (0 = greedy), ``top_p``, ``stop``, ``seed``
        (:class:`conceptvlm.ask.GenerationOptions`). The same loop as ``conceptvlm generate``."""
        from .ask import GenerationOptions, generate_texts

        single = isinstance(prompts, str)
        answers = generate_texts(self, tokenizer, [prompts] if single else prompts,
                                 [images] if single else images, GenerationOptions(**options))
        return answers[0] if single else answers

    def modality(self, input_ids: torch.Tensor) -> torch.Tensor:
        c = self.config
        mod = torch.full_like(input_ids, TEXT)
        mod = torch.where(input_ids == c.image_token_id, torch.full_like(mod, IMAGE), mod)
        is_marker = (input_ids == c.image_start_id) | (input_ids == c.image_end_id)
        return torch.where(is_marker, torch.full_like(mod, MARKER), mod)

    def embed_images(self, images: torch.Tensor) -> torch.Tensor:
        """``[N, 3, H, W]`` -> ``[N, tokens_per_image, D]`` in sequence order."""
        if self.tower is None:
            raise ValueError("this ConceptVLM has no vision tower (config.vision is None) but got images")
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be [N, 3, H, W], got {list(images.shape)}")
        tokens = self.projector(self.tower(images))
        if self.config.image_order != "raster":
            tokens = tokens[:, self.patch_order]
        return tokens

    def image_positions(self, pos_BL: torch.Tensor, modality_BL: torch.Tensor) -> torch.Tensor:
        """``[B, L, 2]`` positions: (t, t) for text, (start + row, start + col) for patches."""
        return image_positions_2d(pos_BL, modality_BL == IMAGE, self.patch_order, self.image_grid[1])

    def forward(self, input_ids: torch.Tensor, labels: Optional[torch.Tensor] = None,
                doc_ids: Optional[torch.Tensor] = None, images: Optional[torch.Tensor] = None,
                use_cache: bool = False, state: Optional[InferenceState] = None,
                ratio_targets: Optional[RatioTargets] = None) -> ModelOutput:
        """Interleaved rows ``input_ids [B, L]`` with ``images [N, 3, H, W]`` in row-major order.

        ``use_cache`` / ``state`` work as in :meth:`ConceptMoE.forward` (a prompt with its
        images as the prefill, then text tokens one at a time); ``ratio_targets`` as there.
        """
        mod = self.modality(input_ids)
        is_img = mod == IMAGE
        n_slots = int(is_img.sum())
        n_images = 0 if images is None else images.shape[0]
        if n_slots != n_images * self.tokens_per_image:
            raise ValueError(f"batch has {n_slots} image tokens but {n_images} images x {self.tokens_per_image} "
                             f"tokens per image = {n_images * self.tokens_per_image}")
        if input_ids.numel() and int(input_ids.max()) >= self.config.model.vocab_size:
            raise ValueError(f"token id {int(input_ids.max())} >= vocab_size={self.config.model.vocab_size}: "
                             "the tokenizer and the model config disagree")
        emb = self.lm.embed(input_ids)
        spread = None
        if n_images:
            tokens = self.embed_images(images.to(emb.device, emb.dtype))
            if self.training and tokens.shape[1] > 1:  # a spread needs two patches
                from .vision.projector import patch_spread

                spread = patch_spread(tokens.detach())
            emb = emb.index_put((is_img,), tokens.reshape(-1, emb.shape[-1]).to(emb.dtype))
        if labels is not None:
            labels = torch.where(mod == TEXT, labels, torch.full_like(labels, IGNORE_INDEX))
        dev = input_ids.device
        doc = torch.zeros_like(input_ids) if doc_ids is None else doc_ids.to(dev)
        pos = None
        if self.config.image_positions == "2d" and self.tower is not None:
            pos1d = self.lm.token_positions(doc, doc >= 0, state)
            pos = self.image_positions(pos1d, mod)
        out = self.lm(labels=labels, doc_ids=doc_ids, modality=mod, positions=pos, inputs_embeds=emb,
                      use_cache=use_cache, state=state, ratio_targets=ratio_targets)
        out.patch_spread = spread
        return out
