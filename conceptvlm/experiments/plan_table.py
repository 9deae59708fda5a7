"""The plan table of ``docs/results.md``: each stage's measured cost, what is done, what
is left (the timings come from :mod:`.plan`, the done runs from the result rows)."""
from __future__ import annotations

import os
from typing import Optional

from . import stats as S
from .verdicts import latest


def train_seconds(row: dict) -> float:
    """A row's training time: its wall time over the pieces that ran, or the sum of its
    logged step times when larger (rows written before the runner counted the time of a
    piece that was killed lost that piece's wall time; its steps stay in the log)."""
    return max(float(row.get("train_wall_s", 0.0)), float(row.get("train_step_s_total", 0.0)))


def _run_hours(row: dict) -> float:
    """A row's CPU hours. ``wall_s`` covers only the process that finished the run; a run
    resumed across processes has its training time over every piece in ``train_wall_s``."""
    pieces = train_seconds(row) + float(row.get("eval_wall_s", 0.0))
    return max(float(row.get("wall_s", 0.0)), pieces) / 3600


def progress(rows: list[dict]) -> tuple[int, float, Optional[float]]:
    """(full-form runs done, their CPU hours, their mean seconds per logged training step):
    the last row of each (variant, seed)."""
    done = [r for seeds in latest([r for r in rows if not r.get("quick")]).values() for r in seeds.values()]
    per_step = [r["train_step_s_total"] / r["steps"] for r in done if r.get("train_step_s_total") and r.get("steps")]
    return len(done), sum(_run_hours(r) for r in done), (S.mean_sd(per_step)[0] if per_step else None)


def plan_lines(results_dir, rows: Optional[dict[str, list[dict]]] = None) -> list[str]:
    """The plan table: the measured cost of each stage, what is done, what is left (the
    runs left at the mean CPU hours of the done runs, else at the measured estimate)."""
    from .plan import estimate, load_timing

    timing = load_timing(results_dir)
    out = ["## Plan and cost", "",
           "Run in this order (each stage's command is in its section); the cost is measured with "
           "`conceptvlm experiment plan --measure` (seconds per training step after warm-up and evaluation time "
           "per scored unit of each stage's most expensive variant, on this machine) and multiplied out to the "
           "full forms. Runs resume from their last checkpoint when a process stops, so the plan runs in pieces; "
           "*done* counts the full-form runs with rows (under the YAML's present settings, at the table's current "
           "code revision), *hours spent* their CPU time (every piece), *s per step in runs* their mean logged step "
           "time.", "",
           "| stage | experiment | runs | steps per run | s per step timed | load when timed | s per step in runs "
           "| evaluation per run | CPU hours timed | done | hours spent | hours left |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    total, left_total, spent_total, missing, stale = 0.0, 0.0, 0.0, [], []
    cores = os.cpu_count()
    for e in estimate(timing):
        n_done, spent, step_runs = progress((rows or {}).get(e["experiment"], []))
        spent_total += spent
        in_runs = f"{step_runs:.2f}" if step_runs is not None else "–"
        if not e["measured"]:
            missing.append(e["experiment"])
            out.append(f"| {e['stage']} | {e['experiment']} | – | – | not measured | – | {in_runs} | – | – | {n_done} | "
                       f"{spent:.1f} | – |")
            continue
        total += e["hours"]
        per_run = spent / n_done if n_done else e["hours_per_run"]
        left = max(e["runs"] - n_done, 0) * per_run
        left_total += left
        load = timing[e["experiment"]].get("load_avg_1min")
        if e["stale"]:
            stale.append(e["experiment"])
        out.append(f"| {e['stage']} | {e['experiment']} | {e['runs']} | {e['steps']:,} | {e['step_s']:.2f}"
                   + (" (stale)" if e["stale"] else "") + " | "
                   + (f"{load:.1f} on {cores} cores" if load is not None else "–")
                   + f" | {in_runs} | {e['eval_units']:,} {e['eval_unit']}s | {e['hours']:.1f} | {n_done} | "
                   f"{spent:.1f} | {left:.1f} |")
    t0 = next(iter(timing.values()), {})
    if not timing:
        return out + ["", "Not measured yet: `conceptvlm experiment plan --measure`.", ""]
    out += ["", f"Total: **{spent_total + left_total:.0f} CPU hours**: spent so far {spent_total:.1f}, left about "
            f"{left_total:.0f} (a stage's runs left at the mean of its done runs, else at its timed estimate; one "
            "process per run, 1 torch thread" + (f"; measured on {t0.get('machine')}" if t0 else "")
            + (f"; not measured: {', '.join(missing)}" if missing else "") + f"). The timed estimate of the whole "
            f"plan was {total:.0f} CPU hours; steps timed while other jobs shared the machine (the load column) are "
            "slower than on idle cores with one process per core.", ""]
    if stale:
        out += [f"*(stale)*: timed on an older form of the experiment's YAML (other steps, batch or variants), so its "
                f"timed estimate no longer prices the plan: `conceptvlm experiment plan --measure --only "
                f"{','.join(stale)}`.", ""]
    return out
