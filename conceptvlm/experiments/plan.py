"""The second protocol's plan, in order, and its CPU-hour estimate (issue 16).

``conceptvlm experiment plan --measure`` times each experiment's heaviest variant for a
few steps on this machine (seconds per training step after warm-up, evaluation seconds
per scored token or item) and writes ``docs/results/plan_timing.json``;
``conceptvlm experiment plan`` prints the estimate from it, and the report shows it.
"""
from __future__ import annotations

import hashlib
import json
import tempfile
import time
from pathlib import Path
from typing import Optional

from ..logging_utils import read_jsonl
from ..manifest import write_atomic
from .runner import RESULTS_DIR, load_experiment, machine

# (stage, experiment, the variant timed for it: the most expensive one)
PLAN = [
    ("1: learning-rate sweep", "lr_sweep", "cosine-topk-lr2e-3"),
    ("2: chunking, BPE (headline; also cosine vs linear on the held-out source)", "chunking_v2", "cosine-topk"),
    ("3: chunking, byte tokens (ablation)", "chunking_v2_bytes", "cosine-topk"),
    ("4: grounding cells (1D vs 2D merging; per-modality ratios)", "grounding_cells", "r4-hilbert-2d"),
]
TIMING_FILE = "plan_timing.json"
MEASURE_STEPS = 12
WARMUP_STEPS = 4  # excluded from the per-step time (first steps pay allocation and start-up)


# What an experiment's YAML sets beside its runs: its claims, gate, notes and quick form
# change no full-form run, so editing them leaves a timing current.
NOT_RUN_SETTINGS = ("claim", "claims", "gate", "notes", "quick")


def setup_digest(exp: dict) -> str:
    """A short digest of what ``exp`` (a loaded experiment) sets for its full-form runs:
    a timing stored with another digest was measured on an older form of the YAML
    (other steps, batch or variants) and no longer prices the plan."""
    keep = {k: v for k, v in exp.items() if k not in NOT_RUN_SETTINGS}
    return hashlib.sha256(json.dumps(keep, sort_keys=True, default=str).encode()).hexdigest()[:12]


def _step_time(metrics: Path) -> float:
    times = [r["step_time_s"] for r in read_jsonl(metrics) if "step_time_s" in r][WARMUP_STEPS:]
    return sum(times) / max(len(times), 1)


def measure(name: str, variant: str, steps: int = MEASURE_STEPS, eval_limit: int = 4,
            runs_root: Path = Path("runs/experiments")) -> dict:
    """Time ``steps`` training steps and a small evaluation of one variant (full-form data
    and model, seed 0). Runs in a temporary folder that borrows ``runs_root/_data`` (the
    corpus is built once), so real run folders are never touched."""
    from omegaconf import OmegaConf

    from .runner import experiment_path, run_dir_of, run_experiment

    import os

    exp = load_experiment(name)
    load_before = os.getloadavg()[0]  # other jobs on the machine slow the steps: recorded with them
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.time()
        cfg = OmegaConf.load(experiment_path(name))
        cfg.eval_limit = eval_limit
        path = Path(tmp) / f"{name}.yaml"
        OmegaConf.save(cfg, path)
        (runs_root / "_data").mkdir(parents=True, exist_ok=True)
        (Path(tmp) / "runs").mkdir()
        (Path(tmp) / "runs" / "_data").symlink_to((runs_root / "_data").resolve())
        row = run_experiment(str(path), runs_root=Path(tmp) / "runs", results_dir=Path(tmp) / "results",
                             variants=[variant], seeds=[0], steps=steps)[0]
        step_s = _step_time(run_dir_of({"name": name}, row, Path(tmp) / "runs") / "metrics.jsonl")
    held = row["held"]
    if "cells" in held:
        eval_units, unit = held["cells"]["items"], "item"
    else:
        eval_units, unit = sum(v.get("tokens", 0) for k, v in held.items() if isinstance(v, dict) and k != "all"), "token"
    return {"experiment": name, "variant": variant, "step_s": step_s, "eval_s": row["eval_wall_s"],
            "eval_units": eval_units, "eval_unit": unit, "measured_steps": steps, "wall_s": time.time() - t0,
            "machine": machine(), "load_avg_1min": load_before, "git": row.get("git"), "time": time.strftime("%Y-%m-%d %H:%M:%S"),
            "seeds": exp["seeds"], "n_variants": len(exp["all_variants"])}


def full_size(name: str, runs_root: Path = Path("runs/experiments")) -> tuple[int, int]:
    """(training steps per run, evaluation units per run) of the full form: for text, the
    steps seed 0 of the timed variant really takes (one pass counted in packed rows)."""
    exp = load_experiment(name)
    if exp.get("kind", "text") != "text":
        return int(exp["steps"]), int(exp["synthetic"]["cells"][1])
    from .runner import prepare_run_data, run_config

    data = prepare_run_data(exp, runs_root)
    variant = next(v for v in exp["variants"] if v["name"] == dict((n, var) for _, n, var in PLAN)[name])
    steps = run_config(exp, variant, 0, data, runs_root, quick=False)[1]
    return steps, int(data["held_tokens"])


def estimate(timing: dict) -> list[dict]:
    """Per stage: runs, steps per run, CPU hours (training + evaluation), from the
    measured timings and the full forms' sizes stored with them."""
    out = []
    for stage, name, _ in PLAN:
        t = timing.get(name)
        if not t:
            out.append({"stage": stage, "experiment": name, "measured": False})
            continue
        steps, units = t["full_steps"], t["full_eval_units"]
        runs = t["n_variants"] * len(t["seeds"])
        per_run = steps * t["step_s"] + units * t["eval_s"] / max(t["eval_units"], 1)
        # timings from before digests were stored cannot be checked: None, not stale
        stale = t["setup"] != setup_digest(load_experiment(name)) if "setup" in t else None
        out.append({"stage": stage, "experiment": name, "measured": True, "stale": stale, "runs": runs, "steps": steps,
                    "step_s": t["step_s"], "eval_units": units, "eval_unit": t["eval_unit"],
                    "hours_per_run": per_run / 3600, "hours": runs * per_run / 3600})
    return out


def load_timing(results_dir: Path = RESULTS_DIR) -> dict:
    """The stored timings (``{}`` before the first ``plan --measure``); a file that is not a
    JSON mapping is a one-line error naming it."""
    from ..errors import UserError

    p = Path(results_dir) / TIMING_FILE
    if not p.is_file():
        return {}
    hint = "restore it from git or measure again: conceptvlm experiment plan --measure"
    try:
        timing = json.loads(p.read_text())
    except ValueError as e:
        raise UserError(f"{p}: not valid JSON ({e})", hint) from None
    if not isinstance(timing, dict):
        raise UserError(f"{p}: expected a JSON mapping of experiment timings", hint)
    return timing


def measure_all(results_dir: Path = RESULTS_DIR, only: Optional[list[str]] = None) -> dict:
    timing = load_timing(results_dir)
    for _, name, variant in PLAN:
        if only and name not in only:
            continue
        print(f"[plan] timing {name} / {variant}: {MEASURE_STEPS} steps", flush=True)
        timing[name] = measure(name, variant)
        timing[name]["full_steps"], timing[name]["full_eval_units"] = full_size(name)
        timing[name]["setup"] = setup_digest(load_experiment(name))
        Path(results_dir).mkdir(parents=True, exist_ok=True)
        write_atomic(Path(results_dir) / TIMING_FILE, json.dumps(timing, indent=1))
    return timing
