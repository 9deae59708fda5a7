"""When did a run leave the prior? Window means of a logged metric from ``metrics.jsonl``.

A grounding run first learns the answer's marginal (the *prior*: the loss of a model that
ignores the image) and sits there until it finds where to look; how long it sits sets most
of the spread between seeds (grounding_cells' notes). This reads a run folder's
``metrics.jsonl`` and prints the mean of a metric over fixed windows of steps and the
step at which the run left the prior for good:

    conceptvlm experiment curve runs/experiments/grounding_cells/full/r1-raster-1d-s0 --prior cells

A step logged twice (a run resumed from a checkpoint older than its last log line)
counts once, at its last value: that is the value the finished run trained on.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

from conceptvlm.logging_utils import read_jsonl

LEFT_BY = 0.02
"""A window has left the prior when its mean is this far below it (nats): the seeds that
never left wander within about 0.01 of it, those that left drop by 0.05 in one window."""


def metric_by_step(rows: list[dict], metric: str) -> dict[int, float]:
    """``{step: value}``; the last logged value wins for a repeated step; non-finite values dropped."""
    out: dict[int, float] = {}
    for r in rows:
        v = r.get(metric)
        if isinstance(v, (int, float)) and math.isfinite(v) and "step" in r:
            out[int(r["step"])] = float(v)
    return out


def window_means(values: dict[int, float], window: int) -> list[tuple[int, float]]:
    """``[(first step of the window, mean), ...]`` over consecutive windows of ``window`` logged
    steps, in step order (the last window may be shorter)."""
    if window < 1:
        raise ValueError(f"window must be >= 1 step, got {window}")
    steps = sorted(values)
    return [(steps[i], sum(values[s] for s in steps[i:i + window]) / len(steps[i:i + window]))
            for i in range(0, len(steps), window)]


def left_prior_at(windows: list[tuple[int, float]], prior: float, by: float = LEFT_BY) -> Optional[int]:
    """First step of the window from which every window's mean stays more than ``by`` below
    ``prior``; None when the run ends at the prior (or never got below it to stay)."""
    first = None
    for step, mean in windows:
        if mean < prior - by:
            first = step if first is None else first
        else:
            first = None
    return first


def cells_prior() -> float:
    """The grounding-cells answer prior in nats per answer token (the report prints the same)."""
    from conceptvlm.data.grounding_cells import cell_answer

    from .grounding import answer_prior_nats

    return answer_prior_nats(answer_tokens(cell_answer(0, 0)))


def answer_tokens(answer: str) -> int:
    """Byte tokens of a cell answer as training sees it: a leading space, the answer, eos."""
    return len((" " + answer).encode()) + 1


def parse_prior(text: Optional[str]) -> Optional[float]:
    """``--prior``: a number of nats, ``cells`` for the grounding-cells answer prior, or nothing."""
    if text is None:
        return None
    if text == "cells":
        return cells_prior()
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"--prior must be a number of nats or 'cells', got {text!r}") from None


def curve_line(name: str, windows: list[tuple[int, float]], prior: Optional[float]) -> str:
    shown = " ".join(f"{s}:{m:.3f}" for s, m in windows)
    if prior is None:
        return f"{name}: {shown}"
    left = left_prior_at(windows, prior)
    where = f"left the prior ({prior:.3f}) at step ~{left:,}" if left is not None else f"at the prior ({prior:.3f})"
    return f"{name}: {where}; {shown}"


def run(run_dirs: list[str], metric: str = "lm_loss", window: int = 200, prior: Optional[str] = None) -> list[dict]:
    """Print one line per run folder (or ``metrics.jsonl`` path); return what was printed as data."""
    level = parse_prior(prior)
    out = []
    for d in run_dirs:
        path = Path(d)
        path = path / "metrics.jsonl" if path.is_dir() else path
        if not path.is_file():
            raise FileNotFoundError(f"{d}: no metrics.jsonl (pass a run folder or its metrics.jsonl)")
        values = metric_by_step(read_jsonl(path), metric)
        if not values:
            raise ValueError(f"{path}: no finite '{metric}' logged")
        windows = window_means(values, window)
        print(curve_line(str(d), windows, level), flush=True)
        out.append({"run": str(d), "windows": windows,
                    "left_prior_at": left_prior_at(windows, level) if level is not None else None})
    return out
