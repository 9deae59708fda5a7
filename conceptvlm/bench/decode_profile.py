"""``conceptvlm bench decode-profile``: where a decode step's time goes, op by op.

The bytes-moved model of decode (:func:`conceptvlm.flops.decode_step_bytes`) counts
weights and KV-cache reads; everything else a step does (routing bookkeeping, boundary
decisions, cache appends, the EMA state, host syncs) is fixed cost per token that the
model does not see. This profiles ``steps`` decode steps of the baseline MoE and of the
efficiency ConceptMoE (fixed router, ratio R) after a prefill of ``length`` tokens with
``torch.profiler`` and reports, per model: time per step, aten ops per step, host syncs
per step (``aten::item`` / ``aten::_local_scalar_dense``) and the ops that take the most
self time. Run it before and after a change to see what moved.
"""
from __future__ import annotations

import argparse
import time
from collections import Counter
from typing import Optional

import torch

from .common import parse_length, positive_int, print_table, write_result
from .inference import BenchModel, synced_clock, add_model_args, model_from_args

SYNC_OPS = ("aten::item", "aten::_local_scalar_dense")


def staggered_state(model, ids_BT: torch.Tensor, length: int, batch: int, period: int):
    """A decoding state for ``batch`` rows whose concept boundaries fall at different
    steps: ``period`` prompts of lengths ``length - i`` (right-padded, one prefill)
    tiled to ``batch`` rows with :meth:`InferenceState.select`. Returns the state and,
    per row, the index of its next token in ``ids_BT``."""
    n = min(period, batch)
    doc = torch.zeros(n, length, dtype=torch.long, device=ids_BT.device)
    for i in range(n):
        doc[i, length - i:] = -1
    out = model(ids_BT[:n, :length], doc_ids=doc, use_cache=True)
    rows = torch.arange(batch, device=ids_BT.device) % n
    return (out.state if n == batch else out.state.select(rows)), length - rows


def _steps(model, ids_BT, state, next_at, steps):
    rows = torch.arange(ids_BT.shape[0], device=ids_BT.device)
    for s in range(steps):
        out = model(ids_BT[rows, next_at + s][:, None], state=state)
        state = out.state
    return state


def profile_decode(model, ids_BT: torch.Tensor, length: int, batch: int, period: int, steps: int,
                   warm: int) -> dict:
    """Profile ``steps`` decode steps after a staggered prefill (see :func:`staggered_state`)."""
    from torch.profiler import ProfilerActivity, profile

    gpu = ids_BT.device.type == "cuda"
    clock = synced_clock(time.perf_counter, ids_BT.device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if gpu else [])
    with torch.inference_mode():
        state, next_at = staggered_state(model, ids_BT, length, batch, period)
        state = _steps(model, ids_BT, state, next_at, warm)
        next_at = next_at + warm
        t0 = clock()
        _steps(model, ids_BT, state, next_at, steps)
        plain = (clock() - t0) / steps
        with profile(activities=activities) as prof:
            _steps(model, ids_BT, state, next_at, steps)
            if gpu:  # the queued kernels finish inside the profiled window
                torch.cuda.synchronize()
    events = prof.key_averages()
    counts = Counter({e.key: e.count for e in events if e.key.startswith("aten::")})
    self_us = {e.key: e.self_cpu_time_total for e in events}
    top = sorted(((k, v) for k, v in self_us.items() if k.startswith("aten::")), key=lambda kv: -kv[1])[:12]
    total_us = sum(v for k, v in self_us.items())
    result = {"ms_per_step": 1e3 * plain,
              "aten_ops_per_step": sum(counts.values()) / steps,
              "host_syncs_per_step": sum(counts[k] for k in SYNC_OPS) / steps,
              "top_ops": [{"op": k, "self_ms_per_step": v / 1e3 / steps, "calls_per_step": counts[k] / steps,
                           "share": v / max(total_us, 1)} for k, v in top]}
    if gpu:  # the GPU's own busy time: far below ms_per_step when launches and syncs dominate
        kernel_us = {e.key: e.self_device_time_total for e in events if e.self_device_time_total > 0}
        result["gpu_busy_ms_per_step"] = sum(kernel_us.values()) / 1e3 / steps
        result["top_kernels"] = [{"kernel": k, "ms_per_step": v / 1e3 / steps}
                                 for k, v in sorted(kernel_us.items(), key=lambda kv: -kv[1])[:8]]
    return result


def run_decode_profile(length: int = 4096, batches=(1, 8), ratio: float = 2.0, steps: int = 20, warm: int = 4,
                       threads: Optional[int] = 1, out: Optional[str] = "runs/bench/decode_profile.json",
                       seed: int = 0, spec: Optional[BenchModel] = None, device: str = "cpu",
                       dtype: str = "float32") -> dict:
    """Profile the baseline and the efficiency ConceptMoE (``spec``, default the
    inference benchmark's model) at each batch size, on ``device`` in ``dtype``; writes
    JSON to ``out``."""
    from ..model import ConceptMoE
    from .inference import DTYPES, device_name, _period

    dev = torch.device(device)

    if threads:
        torch.set_num_threads(threads)
    spec = spec or BenchModel()
    base = spec.baseline(length + warm + steps + 8)
    d = base.to_dict()
    d["chunk"] = {"router": "fixed", "target_ratio_text": ratio, "target_ratio_image": ratio}
    d["joint_decoding"] = True
    configs = {"baseline": base, f"conceptmoe R={ratio:g}": type(base).from_dict(d)}
    period = _period(ratio)
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, spec.vocab_size, (max(batches), length + warm + steps + 8), generator=g).to(dev)
    results = []
    for name, cfg in configs.items():
        torch.manual_seed(seed)
        model = ConceptMoE(cfg).to(dev, DTYPES[dtype]).eval()
        for b in batches:
            r = profile_decode(model, ids[:b], length, b, period, steps, warm)
            results.append({"model": name, "batch": b, "length": length, **r})
            print(f"  {name:<16} batch {b:>3}: {r['ms_per_step']:.2f} ms/step, {r['aten_ops_per_step']:.0f} ops, "
                  f"{r['host_syncs_per_step']:.1f} host syncs per step"
                  + (f", GPU busy {r['gpu_busy_ms_per_step']:.2f} ms" if "gpu_busy_ms_per_step" in r else ""),
                  flush=True)
    rows = [[r["model"], r["batch"], f"{r['ms_per_step']:.2f}", f"{r['aten_ops_per_step']:.0f}",
             f"{r['host_syncs_per_step']:.1f}",
             ", ".join(f"{t['op'][6:]} {100 * t['share']:.0f}%" for t in r["top_ops"][:4])] for r in results]
    table = print_table(["model", "batch", "ms/step", "ops/step", "syncs/step", "top self time"], rows)
    payload = {"config": {"model": spec.__dict__, "length": length, "ratio": ratio, "steps": steps, "warm": warm,
                          "threads": torch.get_num_threads(), "device": device_name(dev), "dtype": dtype},
               "results": results, "table": table}
    if out:
        print(f"wrote {write_result(out, payload)}")
    return payload


def _run(args: argparse.Namespace) -> int:
    run_decode_profile(length=args.length, batches=args.batch, ratio=args.ratio, steps=args.steps,
                       threads=args.threads, out=args.out, spec=model_from_args(args), device=args.device,
                       dtype=args.dtype)
    return 0


def register_bench(bench_subparsers: "argparse._SubParsersAction") -> None:
    """Add ``decode-profile`` to the ``bench`` command's subparsers."""
    p = bench_subparsers.add_parser("decode-profile", help="ops, host syncs and time per decode step (torch.profiler)")
    p.add_argument("--length", type=parse_length, default=4096, help="prefill length (e.g. 4096 or 4k)")
    p.add_argument("--batch", type=positive_int, nargs="+", default=[1, 8])
    p.add_argument("--ratio", type=float, default=2.0)
    p.add_argument("--steps", type=positive_int, default=20)
    p.add_argument("--threads", type=int, default=1)
    add_model_args(p)
    p.add_argument("--out", default="runs/bench/decode_profile.json")
    p.set_defaults(func=_run)
