"""``torch.load`` that never runs code from a file, for DeepSpeed's checkpoint files too.

DeepSpeed 0.19 reads every checkpoint file (model states, ZeRO optimizer partitions,
per-expert files) through ``engine.checkpoint_engine.load``, whose torch engine calls
``torch.load(weights_only=False)``: a crafted ``*.pt`` file would run its pickled code
on resume. :func:`safe_deepspeed_loading` swaps that method for :func:`safe_torch_load`
(``weights_only=True``) while a checkpoint loads.

``weights_only`` admits tensors, containers and scalars; besides those, DeepSpeed's files
hold exactly these classes (found by listing the pickle globals of ZeRO 0-3 checkpoints):
its loss scaler, the ZeRO stage enum and ``fragment_address`` (flat-parameter slices).
They are allowed by name; anything else refuses the file.
"""
from __future__ import annotations

import pickle
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, damaged, unverifiable or unsafe (one-line message)."""


def deepspeed_safe_globals() -> list:
    """The non-tensor classes DeepSpeed writes into its checkpoint files."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def _refusal(e: Exception) -> str:
    """The line of torch's long weights-only message that says what was refused."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    for line in lines:
        if "GLOBAL" in line or "Unsupported" in line or "WeightsUnpickler error" in line:
            return line.split("WeightsUnpickler error:")[-1].strip().rstrip(".")
    return lines[-1] if lines else type(e).__name__


def safe_torch_load(path: str | Path, map_location: Any = None, extra_globals: Any = ()) -> Any:
    """``torch.load`` with ``weights_only=True`` and DeepSpeed's classes allowed.

    Raises :class:`CheckpointError` naming the file when it holds anything else (the
    pickle's code does not run) or cannot be read at all.
    """
    try:
        with torch.serialization.safe_globals(deepspeed_safe_globals() + list(extra_globals)):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"{path}: refused to load: {_refusal(e)} (pickled code is never run)") from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(f"{path}: cannot be read: {first}") from None


@contextmanager
def safe_deepspeed_loading(engine) -> Iterator[None]:
    """While active, DeepSpeed's ``engine.load_checkpoint`` reads files with :func:`safe_torch_load`."""
    ce = engine.checkpoint_engine
    had_own = "load" in vars(ce)
    original = ce.load
    ce.load = lambda path, map_location=None: safe_torch_load(path, map_location)
    try:
        yield
    finally:
        if had_own:
            ce.load = original
        else:
            del ce.load
