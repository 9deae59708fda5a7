"""Verified, atomic DeepSpeed checkpoints whose loading runs no code.

Layout under ``CKPT``::

    CKPT/latest                      -> "step_00000040" (replaced atomically, after the folder)
    CKPT/step_00000040/              DeepSpeed's files (model, ZeRO shards, per-expert files)
        trainer_rank00000.json       step, data-loader state, counters, RNG scalars
        trainer_rank00000.safetensors  RNG state arrays (torch, numpy, python, cuda)
        config.yaml                  the resolved train config of the run that wrote it
        manifest.json                sizes + sha256 of all of the above, written last
    CKPT/step_00000040.1/            the same step saved again (a rerun): a new name

Saving writes ``CKPT/.tmp-NAME`` (every rank), then rank 0 writes the manifest, renames
the folder to ``NAME`` (a name not in use) and only then points ``latest`` at it; older
folders of the same step are removed after that. A crash at any moment leaves ``latest``
naming a complete checkpoint. Weights that are not finite are never saved.

Loading picks the checkpoint ``latest`` names if it verifies against its manifest, else
the newest one that does, and says why with a warning; with checkpoints present but none
good it stops (:class:`CheckpointError`) instead of starting again from step 0. Nothing
is unpickled: the trainer state is JSON + safetensors and DeepSpeed's ``*.pt`` files load
with ``weights_only=True`` (``safe_load.py``).
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
import torch.distributed as dist

from .manifest import fsync_path, verify_manifest, write_atomic, write_manifest
from .safe_load import CheckpointError, safe_deepspeed_loading

LATEST = "latest"
CONFIG = "config.yaml"
_NAME = re.compile(r"^step_(\d{8})(?:\.(\d+))?$")

__all__ = ["CheckpointError", "NonFiniteWeightsError", "save_checkpoint", "load_checkpoint", "choose_checkpoint",
           "latest_tag", "tag_for"]


class NonFiniteWeightsError(CheckpointError):
    """The weights hold NaN/Inf: the checkpoint is not written."""


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _from_rank0(value: Any) -> Any:
    """Rank 0's ``value`` on every rank (a Python object over the process group)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def parse_name(name: str) -> Optional[tuple[int, int]]:
    """``(step, revision)`` of a checkpoint folder name, None for anything else."""
    m = _NAME.match(name)
    return (int(m.group(1)), int(m.group(2) or 0)) if m else None


def checkpoint_folders(ckpt_dir: str | Path) -> list[str]:
    """Checkpoint folder names, oldest first (by step, then revision)."""
    d = Path(ckpt_dir)
    if not d.is_dir():
        return []
    names = [p.name for p in d.iterdir() if parse_name(p.name) and p.is_dir() and not p.is_symlink()]
    return sorted(names, key=parse_name)


def trainer_files(rank: int) -> tuple[str, str]:
    return f"trainer_rank{rank:05d}.json", f"trainer_rank{rank:05d}.safetensors"


# ----------------------------------------------------------------------------- RNG state
def rng_state() -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Every RNG this process draws from: JSON scalars and tensors (for safetensors)."""
    version, mt, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    meta = {"python": {"version": version, "gauss": gauss},
            "numpy": {"kind": kind, "pos": int(pos), "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}}
    tensors = {"rng.python": torch.tensor(mt, dtype=torch.int64), "rng.numpy": torch.from_numpy(keys.astype(np.int64)),
               "rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    return meta, tensors


def set_rng_state(meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    py, npy = meta["python"], meta["numpy"]
    random.setstate((int(py["version"]), tuple(int(x) for x in tensors["rng.python"].tolist()), py["gauss"]))
    np.random.set_state((str(npy["kind"]), tensors["rng.numpy"].numpy().astype(np.uint32), int(npy["pos"]),
                         int(npy["has_gauss"]), float(npy["cached_gaussian"])))
    torch.set_rng_state(tensors["rng.torch"])
    cuda_keys = sorted((k for k in tensors if k.startswith("rng.cuda.")), key=lambda k: int(k.rsplit(".", 1)[1]))
    cuda = [tensors[k] for k in cuda_keys]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


# ----------------------------------------------------------------------------- saving
def weights_finite(module: torch.nn.Module) -> bool:
    """Collective: True when every rank's parameters (its ZeRO-3 partition) are finite."""
    flags, device = [], torch.device("cpu")
    with torch.no_grad():
        for p in module.parameters():
            t = getattr(p, "ds_tensor", None)  # ZeRO-3: this rank's partition; p.data is empty
            t = p.data if t is None or p.data.numel() else t
            if t.numel():
                flags.append(torch.isfinite(t).all())
                device = t.device
    # one device->host sync, and one collective (on the device the backend uses)
    bad = (~torch.stack(flags)).sum().float().reshape(1) if flags else torch.zeros(1, device=device)
    if dist.is_initialized():
        dist.all_reduce(bad)
    return bad.item() == 0


def _new_name(ckpt_dir: Path, step: int) -> str:
    """``step_N`` if free, else ``step_N.k`` with the next revision: never an existing folder."""
    tag = tag_for(step)
    revs = [parse_name(n)[1] for n in checkpoint_folders(ckpt_dir) if parse_name(n)[0] == step]
    return tag if not revs and not (ckpt_dir / tag).exists() else f"{tag}.{max(revs, default=0) + 1}"


def _write_trainer_state(folder: Path, step: int, trainer_state: dict[str, Any]) -> None:
    from safetensors.torch import save_file

    meta, tensors = rng_state()
    js, st = trainer_files(_rank())
    state = dict(trainer_state, step=step, rng=meta, format="conceptvlm-trainer", version=1)
    (folder / js).write_text(json.dumps(state))  # a TypeError here means a non-JSON value crept in
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / st))


def _prune(ckpt_dir: Path, current: str, keep_last: int) -> None:
    """Drop other folders of the current step, and older steps beyond ``keep_last``.
    Folders of later steps (left by a fallback to an earlier checkpoint) are kept."""
    step = parse_name(current)[0]
    older = []
    for name in checkpoint_folders(ckpt_dir):
        s = parse_name(name)[0]
        if name == current or s > step:
            continue
        if s == step:
            shutil.rmtree(ckpt_dir / name, ignore_errors=True)
        else:
            older.append(name)
    if keep_last:
        for name in older[:max(0, len(older) - (keep_last - 1))]:
            shutil.rmtree(ckpt_dir / name, ignore_errors=True)


def save_checkpoint(engine, ckpt_dir: str | Path, step: int, trainer_state: dict[str, Any],
                    keep_last: int = 0, config_yaml: Optional[str] = None) -> Path:
    """Collective: every rank calls it. Returns the checkpoint folder.

    ``trainer_state`` must be JSON-serialisable. Raises :class:`NonFiniteWeightsError`
    (on every rank, before anything is written) when the weights are not finite.
    """
    ckpt_dir = Path(ckpt_dir)
    if not weights_finite(engine.module):
        raise NonFiniteWeightsError(f"step {step}: the weights hold NaN/Inf; checkpoint not written "
                                    f"({ckpt_dir / LATEST} still names the last good one)")
    name = None
    if _rank() == 0:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        for debris in ckpt_dir.glob(".tmp-step_*"):  # of a crashed save
            shutil.rmtree(debris, ignore_errors=True)
        name = _new_name(ckpt_dir, step)
    name = _from_rank0(name)
    tmp_tag = f".tmp-{name}"
    tmp, final = ckpt_dir / tmp_tag, ckpt_dir / name
    engine.save_checkpoint(str(ckpt_dir), tag=tmp_tag, client_state={"step": step}, save_latest=False)
    _write_trainer_state(tmp, step, trainer_state)
    _barrier()
    if _rank() == 0:
        if config_yaml is not None:
            (tmp / CONFIG).write_text(config_yaml)
        write_manifest(tmp)
        os.replace(tmp, final)  # `final` is a new name: nothing existing is touched
        fsync_path(ckpt_dir)
        write_atomic(ckpt_dir / LATEST, name)
        _prune(ckpt_dir, name, keep_last)
    _barrier()
    return final


# ----------------------------------------------------------------------------- loading
def latest_tag(ckpt_dir: str | Path) -> Optional[str]:
    """The folder ``latest`` names, if it is a checkpoint folder name that exists (unverified)."""
    d = Path(ckpt_dir)
    return (d / LATEST).read_text().strip() if _latest_problem(d) is None else None


def _latest_problem(ckpt_dir: Path) -> Optional[str]:
    """Why ``latest`` cannot be followed (None when it names an existing checkpoint folder)."""
    p = ckpt_dir / LATEST
    if not p.exists():
        return f"{p} is missing"
    try:
        tag = p.read_text().strip()
    except (OSError, UnicodeDecodeError):
        return f"{p} is unreadable"
    if not tag:
        return f"{p} is empty"
    if not parse_name(tag):
        return f"{p} holds {tag[:40]!r}, not a checkpoint name"
    if not (ckpt_dir / tag).is_dir():
        return f"{p} names {tag}, which does not exist"
    return None


def checkpoint_problem(folder: Path) -> Optional[str]:
    """None when ``folder`` is a complete checkpoint of this format, else why not."""
    legacy = sorted(folder.glob("trainer_rank*.pt"))
    if legacy and not (folder / "manifest.json").exists():
        return (f"written by an older conceptvlm with a pickled trainer state ({legacy[0].name}); it is not "
                "loaded because unpickling can run code")
    problem = verify_manifest(folder)
    if problem is None and not (folder / trainer_files(0)[0]).is_file():
        problem = f"no {trainer_files(0)[0]}"
    return problem


def choose_checkpoint(ckpt_dir: str | Path, warn: Callable[[str], None] = print) -> Optional[str]:
    """The checkpoint to resume from (decided on rank 0, the same on every rank).

    ``latest``'s folder if it verifies, else the newest folder that does (with a warning
    naming what was wrong); None when there is no checkpoint at all. Raises
    :class:`CheckpointError` when there are checkpoints but none is good.
    """
    ckpt_dir = Path(ckpt_dir)
    result: Any = None
    if _rank() == 0:
        try:
            result = _choose(ckpt_dir, warn)
        except CheckpointError as e:
            result = e
    result = _from_rank0(result)
    if isinstance(result, CheckpointError):
        raise CheckpointError(str(result))
    return result


def _choose(ckpt_dir: Path, warn: Callable[[str], None]) -> Optional[str]:
    folders = checkpoint_folders(ckpt_dir)
    latest_problem = _latest_problem(ckpt_dir)
    if not folders and not (ckpt_dir / LATEST).exists():
        return None  # a fresh run
    bad: list[str] = []
    if latest_problem is None:
        tag = latest_tag(ckpt_dir)
        problem = checkpoint_problem(ckpt_dir / tag)
        if problem is None:
            return tag
        bad.append(f"{tag}: {problem}")
        folders.remove(tag)
    else:
        bad.append(latest_problem)
    for name in reversed(folders):
        problem = checkpoint_problem(ckpt_dir / name)
        if problem is None:
            warn(f"warning: resuming from {name}, the newest good checkpoint, because "
                 + "; ".join(bad))
            return name
        bad.append(f"{name}: {problem}")
    raise CheckpointError(f"{ckpt_dir}: no usable checkpoint ({'; '.join(bad)}). Not starting again from step 0 over "
                          "it: fix or remove that folder, or set train.resume=false with a new train.out_dir")


def read_trainer_state(folder: Path, rank: int) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """This rank's JSON trainer state and RNG tensors; :class:`CheckpointError` names a bad file."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    js, st = (folder / n for n in trainer_files(rank))
    if not js.is_file():
        raise CheckpointError(f"{js} is missing: the checkpoint was written with a different number of ranks")
    try:
        state = json.loads(js.read_text())
        if not isinstance(state, dict) or state.get("format") != "conceptvlm-trainer":
            raise ValueError("not a conceptvlm trainer state")
        int(state["step"]), list(state["data"]), dict(state["rng"])
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{js}: bad trainer state ({type(e).__name__}: {e})") from None
    try:
        tensors = load_file(str(st))
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{st}: cannot be read ({e})") from None
    return state, tensors


def load_checkpoint(engine, ckpt_dir: str | Path, tag: Optional[str] = None,
                    warn: Callable[[str], None] = print) -> Optional[dict[str, Any]]:
    """Restore engine (model, optimizer, LR schedule) and this rank's trainer state; RNG
    states are set. Returns the trainer state (with the ``tag`` it came from), or None
    when there is no checkpoint."""
    ckpt_dir = Path(ckpt_dir)
    tag = tag or choose_checkpoint(ckpt_dir, warn)
    if tag is None:
        return None
    folder = ckpt_dir / tag
    state, tensors = read_trainer_state(folder, _rank())
    try:
        with safe_deepspeed_loading(engine):
            path, _ = engine.load_checkpoint(str(ckpt_dir), tag=tag)
    except RuntimeError as e:
        if isinstance(e, CheckpointError):
            raise
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{folder}: DeepSpeed could not load it: {first}") from None
    if path is None:
        raise CheckpointError(f"{folder}: DeepSpeed could not load it")
    set_rng_state(state["rng"], tensors)
    state["tag"] = tag
    return state


# ----------------------------------------------------------------------------- output folders
def check_replaceable(out: str | Path, overwrite: bool = False) -> None:
    """Refuse (:class:`ConfigError`) to write over ``out`` when it is a file, or a non-empty
    folder and ``overwrite`` is not given. Call it before the work, not only at the end."""
    from .config import ConfigError

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ConfigError(f"{out} exists and is not empty; not replacing it (pass --overwrite to replace it)")


def publish_folder(tmp: str | Path, out: str | Path, overwrite: bool = False) -> Path:
    """Move the finished folder ``tmp`` to ``out``. An existing ``out`` is replaced only
    when empty or with ``overwrite``; it is moved aside first and removed last, so a crash
    leaves either the old folder or the new one at ``out`` (or the old one beside it)."""
    tmp, out = Path(tmp), Path(out)
    check_replaceable(out, overwrite)
    old = out.with_name(f".old-{out.name}")
    if out.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)
    return out
