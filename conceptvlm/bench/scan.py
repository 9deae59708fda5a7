"""``conceptvlm bench scan``: the dechunk EMA scan against a Python loop and a plain copy.

Goals (issue 20): at B4 M4096 D64 at least 10x faster than the loop over positions; at
B4 M4096 D512 at most 3x the time of ``x.clone()`` (a copy is the floor for any scan
that writes its output). The three are timed interleaved (loop, scan, clone, loop, ...)
so a busy moment of the machine hits all of them alike; the ratios are of medians.
"""
from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable

import torch

from ..dechunk import ema_scan
from .common import print_table, write_result


def ema_loop(x: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """The recurrence one position at a time (the obvious reference)."""
    z = torch.zeros_like(x[:, 0])
    out = []
    for j in range(x.shape[1]):
        z = p[:, j, None] * x[:, j] + (1 - p[:, j, None]) * z
        out.append(z)
    return torch.stack(out, 1)


def _interleaved(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {k: [] for k in fns}
    for fn in fns.values():  # warm-up
        fn()
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return times


def run_scan_bench(shapes: list[tuple[int, int, int]], repeats: int = 7, loop_repeats: int = 3,
                   threads: int = 1, out: str | None = None) -> list[dict]:
    """Time loop / scan / clone per shape; print the ratios; optionally write JSON."""
    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(0)
    rows = []
    for B, M, D in shapes:
        x, p = torch.randn(B, M, D, generator=g), torch.rand(B, M, generator=g)
        torch.testing.assert_close(ema_scan(x, p), ema_loop(x, p), rtol=1e-4, atol=1e-4)
        fns = {"scan": lambda: ema_scan(x, p), "clone": lambda: x.clone()}
        t = _interleaved(fns, repeats)
        t_loop = _interleaved({"loop": lambda: ema_loop(x, p)}, loop_repeats)["loop"]
        med = {k: statistics.median(v) for k, v in {**t, "loop": t_loop}.items()}
        rows.append({"B": B, "M": M, "D": D, "seconds": med, "samples": {**t, "loop": t_loop},
                     "loop_over_scan": med["loop"] / med["scan"], "scan_over_clone": med["scan"] / med["clone"]})
    print_table(["B", "M", "D", "loop ms", "scan ms", "clone ms", "loop / scan", "scan / clone"],
                [[r["B"], r["M"], r["D"], r["seconds"]["loop"] * 1e3, r["seconds"]["scan"] * 1e3,
                  r["seconds"]["clone"] * 1e3, r["loop_over_scan"], r["scan_over_clone"]] for r in rows])
    if out:
        write_result(out, {"bench": "scan", "threads": threads, "repeats": repeats,
                         "goals": {"loop_over_scan_at_D64": ">= 10", "scan_over_clone_at_D512": "<= 3"},
                         "rows": rows})
    return rows


def _shape(text: str) -> tuple[int, int, int]:
    try:
        B, M, D = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"shape must look like 4x4096x64 (B x M x D), got {text!r}") from None
    return B, M, D


def register_bench(kinds: "argparse._SubParsersAction") -> None:
    p = kinds.add_parser("scan", help="the dechunk EMA scan vs a Python loop and x.clone()")
    p.add_argument("--shapes", nargs="+", type=_shape, default=[(4, 4096, 64), (4, 4096, 512)],
                   help="B x M x D shapes (default: the issue's 4x4096x64 and 4x4096x512)")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="runs/bench/scan.json")
    p.set_defaults(func=lambda a: run_scan_bench(a.shapes, a.repeats, threads=a.threads, out=a.out) and 0)
