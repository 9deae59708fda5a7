"""Resuming a run: say where from, say what changed in the config, apply or refuse it.

Policy for a config that differs from the one the checkpoint was written with:

* applied: ``optim.lr`` (the optimizer and scheduler states in the checkpoint carry the
  old base rate; it is replaced), the schedule (``optim.warmup_steps``,
  ``optim.min_lr_ratio``, ``train.steps``: the schedule is a function of the config and
  the restored step), clipping, logging and saving settings;
* refused (:class:`ConfigError`): ``optim.name``, ``betas``, ``eps``, ``weight_decay``:
  the restored optimizer state was built for them, and DeepSpeed's expert groups no
  longer tell which group decays. Data settings that change the sample order are
  refused by the loader's ``load_state_dict``; a model that no longer fits the weights
  fails in DeepSpeed's load (:class:`CheckpointError`, with the changes listed).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Optional

import yaml

from .checkpoint import CONFIG, CheckpointError, choose_checkpoint, load_checkpoint
from .config import ConfigError

REFUSED = ("optim.name", "optim.betas", "optim.eps", "optim.weight_decay")


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix: d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flatten(v, f"{prefix}{k}."))
    return {k.rstrip("."): v for k, v in out.items()}


def config_changes(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """``"key: old -> new"`` for every leaf that differs (keys added or removed included)."""
    a, b = _flatten(saved), _flatten(current)
    missing = object()
    return [f"{k}: {a.get(k, '(unset)')} -> {b.get(k, '(unset)')}" for k in sorted(set(a) | set(b))
            if a.get(k, missing) != b.get(k, missing)]


def apply_learning_rate(scheduler, lr: float) -> None:
    """Make ``lr`` the base rate of a restored ``LambdaLR`` and its optimizer's groups
    (the checkpoint brought back the rate it was saved with)."""
    scheduler.base_lrs = [lr for _ in scheduler.base_lrs]
    for group, fn in zip(scheduler.optimizer.param_groups, scheduler.lr_lambdas):
        group["initial_lr"] = lr
        group["lr"] = lr * fn(scheduler.last_epoch)


def saved_config(folder: Path) -> Optional[dict[str, Any]]:
    """The train config a checkpoint folder was written with (None if it has none)."""
    path = folder / CONFIG
    try:
        data = yaml.safe_load(path.read_text()) if path.is_file() else None
    except (yaml.YAMLError, UnicodeDecodeError):
        return None
    return data if isinstance(data, dict) else None


def resume(engine, scheduler, loaders: list, ckpt_dir: str | Path, current: dict[str, Any],
           say: Callable[[str], None]) -> Optional[dict[str, Any]]:
    """Load the checkpoint to resume from, if any (``checkpoint.choose_checkpoint``),
    report it, check the config changes and apply the learning rate. Returns the trainer
    state, or None for a fresh start."""
    tag = choose_checkpoint(ckpt_dir, warn=say)
    if tag is None:
        return None
    folder = Path(ckpt_dir) / tag
    saved = saved_config(folder)
    changes = config_changes(saved, current) if saved is not None else []
    refused = [c for c in changes if c.split(":")[0].startswith(REFUSED)]
    if refused:
        raise ConfigError(f"cannot resume from {folder} with a changed optimizer ({'; '.join(refused)}): its "
                          "restored state was built for the old values; revert them or start a new train.out_dir")
    try:
        state = load_checkpoint(engine, ckpt_dir, tag)
    except CheckpointError as e:
        if changes and "DeepSpeed could not load" in str(e):
            raise CheckpointError(f"{e} (config changed since: {'; '.join(changes)})") from None
        raise
    say(f"resumed from step {state['step']} (checkpoint {folder})")
    if changes:
        say("config changed since that checkpoint: " + "; ".join(changes))
    apply_learning_rate(scheduler, float(current["optim"]["lr"]))
    for ld, s in zip(loaders, state["data"]):
        try:
            ld.load_state_dict(s)
        except (ValueError, KeyError, TypeError) as e:
            raise ConfigError(f"cannot resume the data stream of {folder}: {e}") from None
    return state
