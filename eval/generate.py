"""Greedy generation and the batching helpers every evaluator shares.

The model contract (DESIGN.md §6): ``model(input_ids[B, L], doc_ids[B, L] | None,
images[N, 3, H, W] | None).logits -> [B, L, V]``. Rows of different lengths are padded
on the *right* with ``doc_ids = -1`` on padding (``0`` on real tokens); logits at real
positions do not depend on the padding.

``greedy_generate`` re-runs the full forward every step. It has the signature of
:data:`GenerateFn`, so a cached generator (the inference issue) replaces it by being
passed as ``generate_fn=`` to the runners, with no other change.
"""
from __future__ import annotations

from typing import Callable, Optional, Protocol, Sequence, Union

import torch

StopFn = Callable[[int, list[int]], bool]
"""``stop(row, generated_ids) -> bool``: True ends that row (checked after each step)."""


class GenerateFn(Protocol):
    """What the runners call to generate; ``greedy_generate`` is the default."""

    def __call__(
        self,
        model: torch.nn.Module,
        prompts: Sequence[Sequence[int]],
        *,
        max_new_tokens: Union[int, Sequence[int]],
        eos_id: Optional[int],
        pad_id: int,
        images: Optional[Sequence[Optional[torch.Tensor]]] = None,
        stop: Optional[StopFn] = None,
    ) -> list[list[int]]: ...


def model_device(model: torch.nn.Module) -> torch.device:
    """Device of the model's first parameter (CPU for parameter-free stand-ins)."""
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def pad_batch(
    seqs: Sequence[Sequence[int]], pad_id: int, device: Union[torch.device, str] = "cpu"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-pad ``seqs`` -> ``(input_ids[B, L], doc_ids[B, L], lengths[B])``.

    ``doc_ids`` is 0 on real tokens and -1 on padding (the model's padding convention).
    """
    lengths = torch.tensor([len(s) for s in seqs], dtype=torch.long)
    L = int(lengths.max()) if len(seqs) else 0
    ids_BL = torch.full((len(seqs), L), pad_id, dtype=torch.long)
    doc_BL = torch.full((len(seqs), L), -1, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids_BL[i, : len(s)] = torch.as_tensor(list(s), dtype=torch.long)
        doc_BL[i, : len(s)] = 0
    return ids_BL.to(device), doc_BL.to(device), lengths


def concat_images(images: Optional[Sequence[Optional[torch.Tensor]]], rows: Sequence[int]
                  ) -> Optional[torch.Tensor]:
    """The images of ``rows`` in row order as one ``[N, 3, H, W]`` tensor (or None).

    Each row owns a ``[n_i, 3, H, W]`` tensor (or a single ``[3, H, W]`` image, or None);
    the model consumes them in the order its image tokens appear, row by row.
    """
    if images is None:
        return None
    parts = []
    for r in rows:
        im = images[r]
        if im is None:
            continue
        parts.append(im.unsqueeze(0) if im.dim() == 3 else im)
    return torch.cat(parts, 0) if parts else None


def forward_logits(model: torch.nn.Module, seqs: Sequence[Sequence[int]], pad_id: int,
                   images: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One padded forward pass -> ``(logits[B, L, V] float32 on CPU, lengths[B])``."""
    device = model_device(model)
    ids_BL, doc_BL, lengths = pad_batch(seqs, pad_id, device)
    kwargs = {"doc_ids": doc_BL}
    if images is not None:
        kwargs["images"] = images.to(device)
    logits_BLV = model(ids_BL, **kwargs).logits
    return logits_BLV.float().cpu(), lengths


@torch.no_grad()
def greedy_generate(
    model: torch.nn.Module,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: Union[int, Sequence[int]],
    eos_id: Optional[int],
    pad_id: int,
    images: Optional[Sequence[Optional[torch.Tensor]]] = None,
    stop: Optional[StopFn] = None,
) -> list[list[int]]:
    """Greedy decoding of a batch of prompts by re-running the full forward each step.

    Returns the generated ids per prompt (the eos token, if produced, is dropped).
    A row ends at eos, at its ``max_new_tokens`` (an int, or one per row) or when
    ``stop(row, generated)`` is true; finished rows leave the batch.
    """
    n = len(prompts)
    limits = [max_new_tokens] * n if isinstance(max_new_tokens, int) else list(max_new_tokens)
    out: list[list[int]] = [[] for _ in range(n)]
    active = [i for i in range(n) if limits[i] > 0]
    while active:
        seqs = [list(prompts[i]) + out[i] for i in active]
        logits_BLV, lengths = forward_logits(model, seqs, pad_id, concat_images(images, active))
        last_BV = logits_BLV[torch.arange(len(active)), lengths - 1]
        next_B = last_BV.argmax(-1).tolist()
        still = []
        for i, tok in zip(active, next_B):
            if eos_id is not None and tok == eos_id:
                continue
            out[i].append(tok)
            if len(out[i]) >= limits[i] or (stop is not None and stop(i, out[i])):
                continue
            still.append(i)
        active = still
    return out


def batches(indices: Sequence[int], batch_size: int) -> list[list[int]]:
    """Consecutive chunks of ``indices`` of at most ``batch_size``."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    return [list(indices[i:i + batch_size]) for i in range(0, len(indices), batch_size)]
