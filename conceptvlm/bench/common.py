"""Timing and reporting helpers shared by the benchmarks."""
from __future__ import annotations

import os
import statistics
import time
from pathlib import Path
from typing import Callable, Optional, Sequence


def time_call(fn: Callable[[], object], repeats: int = 5, warmup: int = 1) -> float:
    """Median wall seconds of ``fn()`` over ``repeats`` runs after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


def parse_length(s: str) -> int:
    """A length on the command line: ``4096`` or ``4k`` (an argparse ``type``)."""
    import argparse

    t = s.strip().lower()
    try:
        n = int(float(t[:-1]) * 1024) if t.endswith("k") else int(t)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{s!r} is not a length (e.g. 4096 or 4k)") from None
    if n <= 0:
        raise argparse.ArgumentTypeError(f"{s!r} is not a positive length")
    return n


def positive_int(s: str) -> int:
    """An argparse ``type``: an integer >= 1."""
    import argparse

    try:
        n = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{s!r} is not an integer") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"{s!r} must be at least 1")
    return n


def print_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """Plain-text table (also returned, for reports)."""
    cells = [[str(h) for h in headers]] + [[_fmt(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    text = "\n".join(lines)
    print(text, flush=True)
    return text


def _fmt(c: object) -> str:
    if isinstance(c, float):
        return f"{c:,.0f}" if abs(c) >= 100 else f"{c:.3g}"
    return str(c)


def write_result(path: str | os.PathLike, payload: dict) -> Path:
    """A benchmark's JSON: ``payload`` with the machine it ran on (``eval.io.write_json``)."""
    from ..eval.io import write_json

    return write_json({"machine": machine_info(), **payload}, path)


def finish(payload: dict, out: Optional[str], plot: Optional[str], draw: Callable[[str], None]) -> dict:
    """Print the goal lines of ``payload["goals"]``, write it as JSON to ``out`` and draw
    its plot (``draw(path)``) to ``plot``, by default next to the JSON. Returns ``payload``."""
    for line in payload["goals"]["lines"]:
        print(line)
    if out:
        path = write_result(out, payload)
        print(f"wrote {path}")
        plot = plot or str(path.with_suffix(".png"))
    if plot:
        draw(plot)
        print(f"wrote {plot}")
    return payload


def machine_info() -> dict:
    import platform

    import torch

    return {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None}
