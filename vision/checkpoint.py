"""Reading vision-tower weights from a local file, with errors that name the file.

Handles the layouts towers are shipped in: a bare state dict (``.safetensors``,
``.pt``/``.pth``/``.bin``), one wrapped in ``{"state_dict": ...}`` / ``{"model": ...}``,
DDP's ``module.`` prefix, and full CLIP checkpoints where the tower sits under
``visual.`` next to the text tower.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping

import torch
from torch import nn

# Container prefixes a tower may sit under; pairs ("module.visual.") are tried too.
_WRAPPER_PREFIXES = ("module.", "visual.", "vision_tower.", "model.")
_WRAPPER_KEYS = ("state_dict", "model", "module")
_MAX_LISTED = 8


class CheckpointError(ValueError):
    """A weights file cannot be read or does not fit the tower; the message names the file."""


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Load the tensors of a local checkpoint file onto the CPU, unwrapping common containers."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"vision checkpoint not found: {path}")
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            obj: object = load_file(path, device="cpu")
        else:
            # weights_only: a checkpoint is data; never run pickled code from it.
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any reader failure means "not a readable checkpoint"
        raise CheckpointError(f"cannot read vision checkpoint {path}: {type(err).__name__}: {err}") from err

    while isinstance(obj, Mapping):
        inner = next((obj[k] for k in _WRAPPER_KEYS if isinstance(obj.get(k), Mapping)), None)
        if inner is None:
            break
        obj = inner
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"vision checkpoint {path} holds a {type(obj).__name__}, not a state dict")
    state = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not state:
        raise CheckpointError(f"vision checkpoint {path} contains no tensors")
    return state


def select_module_keys(state: Mapping[str, torch.Tensor], expected: Iterable[str]) -> dict[str, torch.Tensor]:
    """Pick the wrapper prefix (none, ``module.``, ``visual.``, ``module.visual.``, ...) whose
    keys cover most of ``expected``, and strip it.

    Keys outside that prefix (a CLIP text tower, say) are dropped. Best coverage wins, not
    the first match, because a CLIP text tower has keys (``transformer.resblocks.0...``)
    that look like a vision tower's.
    """
    expected = set(expected)
    prefixes = [""] + [a + b for a in ("",) + _WRAPPER_PREFIXES for b in _WRAPPER_PREFIXES if a != b]

    def stripped(prefix: str) -> dict[str, torch.Tensor]:
        return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}

    best = max(prefixes, key=lambda p: (len(expected & stripped(p).keys()), -len(p)))
    return stripped(best)


def load_module_weights(
    module: nn.Module,
    state: Mapping[str, torch.Tensor],
    path: str,
    ignore_prefixes: tuple[str, ...] = (),
) -> None:
    """Copy ``state`` into ``module`` strictly; mismatches raise `CheckpointError` naming ``path``.

    Args:
        ignore_prefixes: checkpoint keys under these prefixes that the module lacks are
            dropped silently (e.g. a classifier head the tower was built without).
    """
    own = module.state_dict()
    state = {
        k: v for k, v in state.items() if k in own or not any(k.startswith(p) for p in ignore_prefixes)
    }
    missing = sorted(own.keys() - state.keys())
    unexpected = sorted(state.keys() - own.keys())
    wrong_shape = [
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in sorted(own.keys() & state.keys())
        if state[k].shape != own[k].shape
    ]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing key(s): {_head(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected key(s): {_head(unexpected)}")
    if wrong_shape:
        problems.append(f"{len(wrong_shape)} shape mismatch(es): {_head(wrong_shape)}")
    if problems:
        raise CheckpointError(
            f"vision checkpoint {path} does not fit {type(module).__name__} "
            f"({len(own)} tensors): " + "; ".join(problems)
            + ". Check VisionConfig.name/image_size/model_kwargs against the file."
        )
    module.load_state_dict(state, strict=True)


def _head(items: list[str]) -> str:
    shown = ", ".join(items[:_MAX_LISTED])
    return shown + (f", ... (+{len(items) - _MAX_LISTED} more)" if len(items) > _MAX_LISTED else "")
