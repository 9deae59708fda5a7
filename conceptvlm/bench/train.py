"""``conceptvlm bench train``: a full training step of ConceptMoE against the same MoE without chunking.

For each model config and row length, in one process: a packed row of several
documents, forward + backward + AdamW step, the two models' steps interleaved
(baseline, ConceptMoE, baseline, ...) so a busy moment of the machine hits both; the
median step time of each. Reported beside it:

* the FLOPs-predicted speed-up: training FLOPs = 3 x (linear FLOPs per token x tokens +
  attention-map FLOPs summed over the row's documents), :mod:`conceptvlm.flops`;
* memory, to check it grows linearly in L (:mod:`.step_memory`): the bytes autograd
  saves for backward (exact, counted on the first step) and the peak RSS of the second
  step (reset before it through ``/proc/self/clear_refs``; the first step also
  allocates AdamW's state, a constant floor that hid the short rows' growth);
* MFU on this machine: achieved FLOP/s over the FLOP/s of a large float32 matmul timed
  in the same run with the same threads.

ConceptMoE uses the ``fixed`` router here so the ratio is exactly R (a learned router's
ratio depends on its training).

``--compile`` adds a compiled copy of each model (``block.compile_blocks``, what
``train.compile`` does) to the interleaved steps: its first step's wall time less its
median step is the compile time, and its median against the eager median the compiled
speed-up. ``--clock cpu`` times steps (and the matmul MFU divides by) in process CPU
time, which other jobs on a shared machine disturb least (with 1 thread).
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from typing import Optional, Sequence

import torch

from .common import finish, parse_length, positive_int, print_table
from .inference import CLOCKS, BenchModel
from .step_memory import SavedActivations, step_peak_rss

DEFAULT_LENGTHS = (2048, 4096, 8192, 16384)
TINY_YAML = Path(__file__).resolve().parents[2] / "configs" / "model" / "tiny.yaml"


def bench_configs(name: str, max_len: int, ratio: float):
    """``(baseline, ConceptMoE)`` configs: ``efficiency`` (the inference benchmark's
    headline model) or ``tiny`` (configs/model/tiny.yaml), ConceptMoE with the fixed router."""
    from ..config import ModelConfig
    from ..flops import baseline_of

    if name == "efficiency":
        base = BenchModel().baseline(max_len)
    elif name == "tiny":
        base = baseline_of(ModelConfig.from_yaml(TINY_YAML))
    else:
        raise ValueError(f"unknown bench config {name!r} (efficiency, tiny)")
    d = base.to_dict()
    d["max_seq_len"] = max(d["max_seq_len"], max_len)
    baseline = ModelConfig.from_dict(d)
    d["chunk"].update(router="fixed", target_ratio_text=ratio, target_ratio_image=ratio)
    d["joint_decoding"] = True
    return baseline, ModelConfig.from_dict(d)


def document_lengths(L: int, n_docs: int, generator: torch.Generator) -> list[int]:
    """``n_docs`` lengths summing to ``L``, each within 0.5-1.5x of ``L / n_docs``."""
    w = 0.5 + torch.rand(n_docs, generator=generator, dtype=torch.float64)
    lengths = (w / w.sum() * L).floor().long()
    lengths[-1] += L - int(lengths.sum())
    return lengths.tolist()


def training_flops(cfg, doc_lengths: Sequence[int], ratio: Optional[float] = None) -> float:
    """Forward + backward FLOPs of one packed row (backward = 2x forward)."""
    from ..flops import attention_map_flops, linear_flops_per_token

    L = sum(doc_lengths)
    fwd = linear_flops_per_token(cfg, ratio)["all"] * L
    fwd += sum(attention_map_flops(cfg, n, ratio)["all"] for n in doc_lengths)
    return 3.0 * fwd


def matmul_flops_per_s(n: int = 1024, repeats: int = 5, clock=time.perf_counter) -> float:
    """FLOP/s of a float32 ``n x n`` matmul with the current threads (the machine's peak we can reach)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = min(_timed(lambda: a @ b, clock) for _ in range(repeats))
    return 2.0 * n ** 3 / best


def _timed(fn, clock=time.perf_counter) -> float:
    t0 = clock()
    fn()
    return clock() - t0


class _Trainer:
    """One model, its AdamW and a fixed packed row: ``step()`` is a full training step."""

    def __init__(self, cfg, ids, doc, seed: int, compile: bool = False):
        from ..block import compile_blocks
        from ..model import ConceptMoE

        torch.manual_seed(seed)
        self.model = ConceptMoE(cfg).train()
        if compile:
            compile_blocks(self.model)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-4)
        self.ids, self.doc = ids, doc

    def step(self) -> float:
        return self._finish(self.model(self.ids, labels=self.ids, doc_ids=self.doc))

    def _finish(self, out) -> float:
        out.loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return out.loss.item()

    def measure_memory(self) -> tuple[int, Optional[int]]:
        """``(saved-activation bytes, peak RSS bytes)`` of a step. Run first, as the warm-up:
        the saved bytes are counted on the first step, the peak RSS is taken on the
        second, once AdamW's state exists (its allocation on the first step sets a
        constant floor under short rows' peaks: the efficiency ConceptMoE at 2k peaks at
        1205 MB on its first step, 942 MB on the next)."""
        counter = SavedActivations(self.model.parameters())
        with counter:
            out = self.model(self.ids, labels=self.ids, doc_ids=self.doc)
        self._finish(out)
        return counter.bytes, step_peak_rss(self.step)


def run_train_bench(configs: Sequence[str] = ("efficiency", "tiny"), lengths: Sequence[int] = DEFAULT_LENGTHS,
                    ratio: float = 2.0, n_docs: int = 4, steps: int = 3, threads: Optional[int] = None,
                    seed: int = 0, out: Optional[str] = "runs/bench/train.json", plot: Optional[str] = None,
                    memory_only: bool = False, compile: bool = False, clock: str = "wall") -> dict:
    """Time training steps of each config's baseline and ConceptMoE side by side; print and save.

    Every row first measures memory (two untimed steps per model: saved-activation bytes,
    then peak RSS); ``memory_only`` stops there (no timing, no MFU), which is what long
    rows on a busy machine can still measure honestly. ``compile``: also time compiled
    copies of both (row key ``compiled``). ``clock``: ``wall`` or ``cpu`` (process time).
    """
    timer = CLOCKS[clock]
    if threads:
        torch.set_num_threads(threads)
    lengths = sorted(int(L) for L in lengths)
    peak = None if memory_only else matmul_flops_per_s(clock=timer)  # the steps' clock: MFU is their ratio
    print(f"bench train{' (memory only)' if memory_only else ''}: batch 1, float32, {torch.get_num_threads()} threads, "
          f"{n_docs} documents per row, R={ratio:g} (fixed router), {clock} clock"
          + ("" if peak is None else f"; dense matmul {peak / 1e9:.1f} GFLOP/s"), flush=True)
    g = torch.Generator().manual_seed(seed)
    rows = []
    for name in configs:
        base_cfg, cmoe_cfg = bench_configs(name, max(lengths), ratio)
        for L in lengths:
            docs = document_lengths(L, n_docs, g)
            ids = torch.randint(0, base_cfg.vocab_size, (1, L), generator=g)
            doc = torch.repeat_interleave(torch.arange(n_docs), torch.tensor(docs))[None]
            trainers = {"baseline": _Trainer(base_cfg, ids, doc, seed), "conceptmoe": _Trainer(cmoe_cfg, ids, doc, seed)}
            memory = {k: t.measure_memory() for k, t in trainers.items()}
            row = {"config": name, "length": L, "documents": docs,
                   "saved_activation_bytes": {k: m[0] for k, m in memory.items()},
                   "peak_step_bytes": {k: m[1] for k, m in memory.items()}}
            if not memory_only:
                compiled = {k: _Trainer(c, ids, doc, seed, compile=True)
                            for k, c in (("baseline", base_cfg), ("conceptmoe", cmoe_cfg))} if compile else {}
                row.update(_timed_row(trainers, steps, cfgs=(base_cfg, cmoe_cfg), docs=docs, ratio=ratio, peak=peak,
                                      timer=timer, compiled=compiled))
                del compiled
            rows.append(row)
            print(f"  {name:<10} L={L:>6}: " + _row_line(row), flush=True)
            del trainers
    headers, cells = _memory_table(rows) if memory_only else _speed_table(rows)
    table = print_table(headers, cells)
    payload = {"config": {"configs": list(configs), "lengths": lengths, "ratio": ratio, "documents_per_row": n_docs,
                          "steps": 0 if memory_only else steps, "threads": torch.get_num_threads(),
                          "matmul_flops_per_s": peak, "memory_only": memory_only, "compile": compile,
                          "clock": clock},
               "rows": rows, "goals": train_goals(rows), "table": table}
    return finish(payload, out, plot, lambda path: plot_train(rows, path))


def _timed_row(trainers: dict[str, _Trainer], steps: int, cfgs, docs: Sequence[int], ratio: float,
               peak: float, timer=time.perf_counter, compiled: Optional[dict[str, _Trainer]] = None) -> dict:
    """Interleaved timed steps of both models: median step time, speed-up against the
    FLOPs prediction, MFU; with ``compiled`` copies, their steps interleaved too, their
    compile time and speed-up over eager."""
    compiled = compiled or {}
    first = {k: _timed(t.step) for k, t in compiled.items()}  # wall time: compiling runs in worker processes
    times: dict[str, list[float]] = {k: [] for k in trainers}
    ctimes: dict[str, list[float]] = {k: [] for k in compiled}
    for _ in range(steps):
        for k, t in trainers.items():
            times[k].append(_timed(t.step, timer))
            if k in compiled:
                ctimes[k].append(_timed(compiled[k].step, timer))
    med = {k: statistics.median(v) for k, v in times.items()}
    flops = {"baseline": training_flops(cfgs[0], docs), "conceptmoe": training_flops(cfgs[1], docs, ratio)}
    L = sum(docs)
    row = {"step_s": med, "samples": times, "tokens_per_s": {k: L / v for k, v in med.items()},
           "train_flops": flops, "speedup": med["baseline"] / med["conceptmoe"],
           "predicted": flops["baseline"] / flops["conceptmoe"], "mfu": {k: flops[k] / med[k] / peak for k in med}}
    row["vs_predicted"] = row["speedup"] / row["predicted"]
    if compiled:
        cmed = {k: statistics.median(v) for k, v in ctimes.items()}
        row["compiled"] = {"step_s": cmed, "samples": ctimes, "compile_s": {k: first[k] - cmed[k] for k in cmed},
                           "speedup_vs_eager": {k: med[k] / cmed[k] for k in cmed}}
    return row


def _row_line(r: dict) -> str:
    saved, rss = r["saved_activation_bytes"], r["peak_step_bytes"]
    line = (f"saved activations {_mb(saved['baseline'])} -> {_mb(saved['conceptmoe'])} MB, "
            f"peak {_mb(rss['baseline'])} -> {_mb(rss['conceptmoe'])} MB")
    if "speedup" not in r:
        return line
    med = r["step_s"]
    line = (f"step {med['baseline']:.2f}s -> {med['conceptmoe']:.2f}s ({r['speedup']:.2f}x, predicted "
            f"{r['predicted']:.2f}x); MFU {100 * r['mfu']['baseline']:.0f}% / {100 * r['mfu']['conceptmoe']:.0f}%; "
            + line)
    c = r.get("compiled")
    if c:
        line += (f"; compiled step {c['step_s']['baseline']:.2f}s / {c['step_s']['conceptmoe']:.2f}s "
                 f"({c['speedup_vs_eager']['baseline']:.2f}x / {c['speedup_vs_eager']['conceptmoe']:.2f}x eager), "
                 f"compile {c['compile_s']['baseline']:.0f}s / {c['compile_s']['conceptmoe']:.0f}s")
    return line


def _speed_table(rows: list[dict]) -> tuple[list[str], list[list]]:
    return (["config", "L", "base tok/s", "CMoE tok/s", "speed-up", "predicted", "% of pred", "base MFU", "CMoE MFU",
             "base saved MB", "CMoE saved MB", "base peak MB", "CMoE peak MB"],
            [[r["config"], r["length"], r["tokens_per_s"]["baseline"], r["tokens_per_s"]["conceptmoe"],
              f"{r['speedup']:.2f}", f"{r['predicted']:.2f}", f"{100 * r['vs_predicted']:.0f}%",
              f"{100 * r['mfu']['baseline']:.0f}%", f"{100 * r['mfu']['conceptmoe']:.0f}%",
              _mb(r["saved_activation_bytes"]["baseline"]), _mb(r["saved_activation_bytes"]["conceptmoe"]),
              _mb(r["peak_step_bytes"]["baseline"]), _mb(r["peak_step_bytes"]["conceptmoe"])] for r in rows])


def _memory_table(rows: list[dict]) -> tuple[list[str], list[list]]:
    def per_token(r, k):
        return f"{r['saved_activation_bytes'][k] / r['length'] / 1024:.1f}"

    return (["config", "L", "base saved MB", "CMoE saved MB", "base KB/token", "CMoE KB/token",
             "base peak MB", "CMoE peak MB"],
            [[r["config"], r["length"], _mb(r["saved_activation_bytes"]["baseline"]),
              _mb(r["saved_activation_bytes"]["conceptmoe"]), per_token(r, "baseline"), per_token(r, "conceptmoe"),
              _mb(r["peak_step_bytes"]["baseline"]), _mb(r["peak_step_bytes"]["conceptmoe"])] for r in rows])


def _mb(n: Optional[int]) -> str:
    return "n/a" if n is None else f"{n / 2**20:.0f}"


def memory_fit(lengths: Sequence[int], peaks: Sequence[float]) -> dict:
    """Least-squares ``a + b L + c L^2`` of peak memory; ``quadratic_share`` = ``c L^2 / peak`` at the longest L."""
    import numpy as np

    L = np.asarray(lengths, dtype=float)
    y = np.asarray(peaks, dtype=float)
    c, b, a = np.polyfit(L, y, 2)  # needs 3 or more lengths
    share = float(c * L[-1] ** 2 / y[-1]) if y[-1] else float("nan")
    return {"a": float(a), "b": float(b), "c": float(c), "quadratic_share": share}


# Row key -> (goal key prefix, words in the goal line).
MEMORY_MEASURES = {"peak_step_bytes": ("memory_linear", "peak memory"),
                   "saved_activation_bytes": ("saved_linear", "saved activations")}


def train_goals(rows: list[dict]) -> dict:
    """Issue 20's goals: speed-up >= 90% of predicted at L >= 4k; peak memory linear in L
    (quadratic term < 10% of the peak at the longest length; the saved-activation bytes
    are fitted the same way); the efficiency baseline at >= 40% MFU at 4k. Rows without
    timing (memory only) check the memory goal alone."""
    lines, met = [], {}
    timed = [r for r in rows if "speedup" in r]
    if timed:
        bad = [f"{r['config']} L={r['length']}: {100 * r['vs_predicted']:.0f}%" for r in timed
               if r["length"] >= 4096 and r["vs_predicted"] < 0.9]
        long = [r for r in timed if r["length"] >= 4096]
        met["speedup_90pct"] = (not bad) if long else None
        lines.append("goal speed-up >= 90% of predicted at L >= 4k: "
                     + ("not measured" if not long else "met" if not bad else "MISSED (" + "; ".join(bad) + ")"))
    for name in sorted({r["config"] for r in rows}):
        for measure, (key, what) in MEMORY_MEASURES.items():
            rs = [r for r in rows if r["config"] == name and r.get(measure, {}).get("baseline") is not None]
            if len(rs) < 3:
                continue
            for k in ("baseline", "conceptmoe"):
                fit = memory_fit([r["length"] for r in rs], [r[measure][k] for r in rs])
                ok = fit["quadratic_share"] < 0.10
                met[f"{key}/{name}/{k}"] = ok
                lines.append(f"goal {what} linear in L ({name} {k}): quadratic term "
                             f"{100 * fit['quadratic_share']:.1f}% of it at {rs[-1]['length']} "
                             f"{'met' if ok else 'MISSED'}")
    at4k = [r for r in timed if r["config"] == "efficiency" and r["length"] == 4096]
    if at4k:
        m = at4k[0]["mfu"]["baseline"]
        met["mfu_40pct_4k"] = m >= 0.4
        lines.append(f"goal efficiency baseline MFU >= 40% at 4k: {100 * m:.0f}% {'met' if m >= 0.4 else 'MISSED'}")
    return {"met": met, "lines": lines}


def plot_train(rows: list[dict], path: str) -> None:
    """Measured (solid) vs predicted (dashed) speed-up where timed, then peak step memory
    and saved-activation bytes, against L."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    timed = all("speedup" in r for r in rows)
    fig, axes = plt.subplots(1, 3 if timed else 2, figsize=(16 if timed else 11, 4.2))
    ax_mem = axes[-2:]
    for i, name in enumerate(sorted({r["config"] for r in rows})):
        rs = [r for r in rows if r["config"] == name]
        x = [r["length"] for r in rs]
        if timed:
            axes[0].plot(x, [r["speedup"] for r in rs], "o-", color=f"C{i}", label=f"{name} measured")
            axes[0].plot(x, [r["predicted"] for r in rs], "--", color=f"C{i}", alpha=0.7, label=f"{name} predicted")
        for ax, measure in zip(ax_mem, MEMORY_MEASURES):
            for k, style in (("baseline", "s:"), ("conceptmoe", "o-")):
                y = [r[measure][k] for r in rs]
                if all(v is not None for v in y):
                    ax.plot(x, [v / 2**20 for v in y], style, color=f"C{i}", label=f"{name} {k}")
    titles = ([("training step speed-up over the MoE", "speed-up")] if timed else []) + [
        ("peak RSS of one step (after the first)", "MB above the step's start"),
        ("bytes saved for backward (exact)", "MB")]
    for ax, (title, ylabel) in zip(axes, titles):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("row length (tokens)")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _run(args: argparse.Namespace) -> int:
    lengths = (512, 1024) if args.quick else args.lengths
    run_train_bench(configs=["tiny"] if args.quick else args.configs, lengths=lengths, ratio=args.ratio,
                    n_docs=args.docs, steps=2 if args.quick else args.steps, threads=args.threads, seed=args.seed,
                    out=args.out, plot=args.plot, memory_only=args.memory_only, compile=args.compile,
                    clock=args.clock)
    return 0


def register_bench(bench_subparsers: "argparse._SubParsersAction") -> None:
    """Add ``train`` to the ``bench`` command's subparsers."""
    p = bench_subparsers.add_parser("train", help="training-step speed, memory and MFU: ConceptMoE vs MoE")
    p.add_argument("--configs", nargs="+", choices=["efficiency", "tiny"], default=["efficiency", "tiny"])
    p.add_argument("--lengths", nargs="+", type=parse_length, default=list(DEFAULT_LENGTHS),
                   help="row lengths (2k 4k ...)")
    p.add_argument("--ratio", type=float, default=2.0)
    p.add_argument("--docs", type=positive_int, default=4, help="documents packed in each row")
    p.add_argument("--steps", type=positive_int, default=3, help="timed steps per model (after one warm-up step)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--quick", action="store_true", help="tiny config, lengths 512 1024, 2 steps")
    p.add_argument("--memory-only", action="store_true",
                   help="measure saved-activation bytes and peak RSS only (no timed steps, no MFU)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--compile", action="store_true",
                   help="also time compiled copies of both models (train.compile): compile time and speed-up")
    p.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                   help="step times in wall or process CPU time (cpu: with 1 thread on a shared machine)")
    p.add_argument("--out", default="runs/bench/train.json")
    p.add_argument("--plot", default=None, help="PNG path (default: next to --out)")
    p.set_defaults(func=_run)
