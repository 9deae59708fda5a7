"""Atomic DeepSpeed checkpoints with the trainer's own per-rank state (data position, RNG).

Layout under ``CKPT``::

    CKPT/latest                  -> "step_00000040" (replaced atomically, last)
    CKPT/step_00000040/          DeepSpeed's files (model, ZeRO shards, per-expert files)
                       trainer_rank00000.pt   step, data-loader state, RNG states, counters

A save goes to ``CKPT/.tmp-step_...`` first; only when every rank has finished writing
is the directory renamed and ``latest`` replaced (write temp file, fsync, ``os.replace``).
A crash at any point leaves ``latest`` naming the previous complete checkpoint.
"""
from __future__ import annotations

import os
import random
import shutil
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.distributed as dist

LATEST = "latest"


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def latest_tag(ckpt_dir: str | Path) -> Optional[str]:
    """The tag ``latest`` names, if it points at an existing directory."""
    p = Path(ckpt_dir) / LATEST
    if not p.is_file():
        return None
    tag = p.read_text().strip()
    return tag if tag and (Path(ckpt_dir) / tag).is_dir() else None


def save_checkpoint(engine, ckpt_dir: str | Path, step: int, trainer_state: dict[str, Any],
                    keep_last: int = 0) -> Path:
    """Collective: every rank calls it. Returns the final checkpoint directory."""
    ckpt_dir = Path(ckpt_dir)
    tag = tag_for(step)
    tmp_tag = f".tmp-{tag}"
    tmp, final = ckpt_dir / tmp_tag, ckpt_dir / tag
    if _rank() == 0:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # debris of a crashed save
    _barrier()
    engine.save_checkpoint(str(ckpt_dir), tag=tmp_tag, client_state={"step": step}, save_latest=False)
    state = dict(trainer_state, rng=rng_state(), step=step)
    torch.save(state, tmp / f"trainer_rank{_rank():05d}.pt")
    _barrier()
    if _rank() == 0:
        if final.exists():  # re-saving the same step (e.g. after a resume): replace it
            old = ckpt_dir / f".old-{tag}"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        _write_atomic(ckpt_dir / LATEST, tag)
        if keep_last:
            tags = sorted(p.name for p in ckpt_dir.glob("step_*") if p.is_dir())
            for old in tags[:-keep_last]:
                if old != tag:
                    shutil.rmtree(ckpt_dir / old, ignore_errors=True)
    _barrier()
    return final


def load_checkpoint(engine, ckpt_dir: str | Path, tag: Optional[str] = None) -> Optional[dict[str, Any]]:
    """Restore engine (model, optimizer, LR schedule) and this rank's trainer state; RNG
    states are set. Returns the trainer state, or None when there is no checkpoint."""
    tag = tag or latest_tag(ckpt_dir)
    if tag is None:
        return None
    path, _ = engine.load_checkpoint(str(ckpt_dir), tag=tag)
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load checkpoint {ckpt_dir}/{tag}")
    f = Path(ckpt_dir) / tag / f"trainer_rank{_rank():05d}.pt"
    if not f.is_file():
        raise RuntimeError(f"{f} is missing: the checkpoint was written with a different number of ranks")
    state = torch.load(f, map_location="cpu", weights_only=False)
    set_rng_state(state["rng"])
    return state
