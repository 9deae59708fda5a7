"""``conceptvlm bench inference``: prefill latency and decode tokens/s, ConceptMoE vs the same MoE.

In one process, on the same token ids, for every context length:

* **baseline**: the MoE with router ``none`` (every token a concept, no joint decoding),
* **efficiency** ConceptMoE: the same layers with router ``fixed`` (a boundary exactly
  every R tokens) at each R; it saves compute,
* **matched** ConceptMoE: the same, with the concept model re-spending the saved
  linear FLOPs (:func:`conceptvlm.flops.match_compute`, ``topk`` by default).

The models take turns (:mod:`.interleave`, which also says why the ratio is taken per
boundary period):

* **prefill** (batch 1): one forward over the context with ``use_cache=True`` per model,
  round robin, ``repeats`` times; median and interquartile range of the per-repeat ratio;
* **decode**, for each batch size ``b``: a state of ``b`` rows at the context length per
  model, ``2 x period`` warm-up steps (the first one grows every cache), then
  ``decode_steps`` single-token steps per model (a multiple of the boundary period),
  round robin, each step timed alone; the ratio is the median of the per-period ratios
  with their interquartile range; tokens/s = ``b x period`` over the median period time.

Batched rows have different concept boundaries (:func:`decode_states`), as in serving,
where rows start concepts at different steps and the concept model runs for some rows
only: ``period`` prompts of ``L - i`` tokens (right-padded, one prefill) are tiled to
``b`` rows with ``InferenceState.select`` (prefilling 32 rows of 16k tokens on a CPU would
take far longer than the decode it prepares).

Beside each measured ratio the predicted one: prefill from FLOPs, decode from bytes moved
per step at that batch (:func:`conceptvlm.flops.decode_step_bytes`: weights once per step
for the whole batch, with the expected number of distinct experts the batch activates;
the KV cache once per row). KV-cache bytes are measured with ``state.kv_bytes()``. Eval
mode, ``torch.inference_mode``; float32 on the CPU by default, ``--device cuda --dtype
bfloat16`` on a GPU (the clock then waits for the GPU's queue before each reading).
"""
from __future__ import annotations

import argparse
import gc
import math
import time
from dataclasses import dataclass
from fractions import Fraction
from typing import Callable, Optional, Sequence

import torch

from .common import finish, parse_length, print_table
from .interleave import period_ratios, period_sums, round_robin, spread

DEFAULT_LENGTHS = (1024, 2048, 4096, 8192, 16384)
QUICK_LENGTHS = (512, 1024)
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
GOAL_BATCHES = (1, 8)  # the decode goals at 16k, R = 2 are checked at these batch sizes


@dataclass
class BenchModel:
    d_model: int = 256
    n_heads: int = 8
    n_kv_heads: int = 2
    n_layers: int = 24  # 1 encoder + (n_layers - 2) concept + 1 decoder
    n_experts: int = 8
    top_k: int = 2
    expert_hidden: int = 512
    vocab_size: int = 512

    def baseline(self, max_len: int):
        from ..config import ModelConfig

        return ModelConfig.from_dict(dict(
            vocab_size=self.vocab_size, d_model=self.d_model, n_heads=self.n_heads, n_kv_heads=self.n_kv_heads,
            n_encoder_layers=1, n_concept_layers=self.n_layers - 2, n_decoder_layers=1, max_seq_len=max_len,
            joint_decoding=False, chunk=dict(router="none"),
            moe=dict(n_experts=self.n_experts, top_k=self.top_k, expert_hidden=self.expert_hidden)))


def _period(R: float) -> int:
    """Tokens after which the fixed router's boundary pattern repeats."""
    return Fraction(R).limit_denominator(64).numerator


def _configs(base_cfg, ratios: Sequence[float], variants: Sequence[str], match: str) -> tuple[dict, dict]:
    """``{(variant, R): config}`` with the baseline at ``("baseline", 1.0)``, and the
    compute match found for each R."""
    from ..flops import match_compute

    configs, matches = {("baseline", 1.0): base_cfg}, {}
    for R in ratios:
        if "efficiency" in variants:
            d = base_cfg.to_dict()
            d["chunk"] = {"router": "fixed", "target_ratio_text": R, "target_ratio_image": R}
            d["joint_decoding"] = True
            configs[("efficiency", R)] = type(base_cfg).from_dict(d)
        if "matched" in variants:
            m = match_compute(base_cfg, R, match, router="fixed")
            configs[("matched", R)] = m.config
            matches[R] = {"strategy": match, "knob": m.knob, "flops_mismatch_pct": m.flops_mismatch_pct,
                          "params_mismatch_pct": m.params_mismatch_pct}
    return configs, matches


def measure_prefill(models: dict, ids_1L: torch.Tensor, repeats: int, clock: Callable[[], float]
                    ) -> tuple[dict[tuple, list[float]], dict]:
    """Seconds of ``repeats`` prefills of ``ids_1L`` per model, round robin; and each
    model's state after its last one (batch 1 decoding starts from it)."""
    last: dict = {}

    def prefill(key):
        def call(_i: int) -> None:
            last[key] = None  # free the previous repeat's caches first
            with torch.inference_mode():
                last[key] = models[key](ids_1L, use_cache=True).state
        return call

    gc.collect()
    return round_robin({k: prefill(k) for k in models}, repeats, clock), last


def decode_states(models: dict, ids_BT: torch.Tensor, length: int, batch: int, period: int
                  ) -> tuple[dict, dict]:
    """Each model's state of ``batch`` rows whose concept boundaries fall at different steps
    (:func:`.decode_profile.staggered_state`: ``period`` prompts of ``length - i`` tokens,
    tiled), and per model the ``[batch, T]`` tokens each row decodes next.

    The baseline (router ``none``: every token a concept) has nothing to stagger: its rows
    all hold ``length`` tokens, so its caches stay even and its steps need no mask (the
    comparison gives it its best case)."""
    from .decode_profile import staggered_state

    states, next_BT = {}, {}
    with torch.inference_mode():
        for key, model in models.items():
            stagger = 1 if model.config.chunk.router == "none" else period
            states[key], next_at_B = staggered_state(model, ids_BT, length, batch, stagger)
            t_BT = next_at_B[:, None] + torch.arange(ids_BT.shape[1] - length, device=ids_BT.device)
            next_BT[key] = ids_BT[:batch].gather(1, t_BT)
    return states, next_BT


def measure_decode(models: dict, states: dict, next_BT: dict, warm: int, steps: int,
                   clock: Callable[[], float]) -> dict[tuple, list[float]]:
    """Seconds of each of ``steps`` single-token steps per model (tokens ``next_BT[key][:, i]``
    after ``warm`` untimed ones), round robin; ``states`` advance in place."""
    def step(key, offset):
        def call(i: int) -> None:
            t = offset + i
            with torch.inference_mode():
                states[key] = models[key](next_BT[key][:, t:t + 1], state=states[key]).state
        return call

    round_robin({k: step(k, 0) for k in models}, warm, clock)
    gc.collect()
    return round_robin({k: step(k, warm) for k in models}, steps, clock)


def _prefill_row(key, cfg, base_cfg, L: int, base_s: list[float], s: list[float], dtype_bytes: int = 4) -> dict:
    from ..flops import predicted_speedups, prefill_flops

    variant, R = key
    pred = predicted_speedups(base_cfg, cfg, L, R, dtype_bytes=dtype_bytes)["prefill"]
    ratio = spread([a / b for a, b in zip(base_s, s)])  # adjacent calls: the same moment
    return {"variant": variant, "ratio": R, "length": L,
            "prefill_s_baseline": spread(base_s)["median"], "prefill_s": spread(s)["median"],
            "prefill_speedup": ratio["median"], "prefill_speedup_q25": ratio["q25"],
            "prefill_speedup_q75": ratio["q75"], "prefill_iqr_rel": ratio["iqr_rel"], "prefill_predicted": pred,
            "prefill_vs_predicted": ratio["median"] / pred, "prefill_s_samples_baseline": base_s,
            "prefill_s_samples": s, "prefill_flops": prefill_flops(cfg, L, R)["all"],
            "prefill_flops_baseline": prefill_flops(base_cfg, L)["all"]}


def _decode_row(key, cfg, base_cfg, L: int, batch: int, base_s: list[float], s: list[float],
                kv_base: dict, kv: dict, dtype_bytes: int = 4) -> dict:
    from ..flops import decode_step_bytes, kv_cache_bytes, predicted_speedups

    variant, R = key
    p = _period(R)
    ratios = period_ratios(base_s, s, p)
    r = spread(ratios)
    pred = predicted_speedups(base_cfg, cfg, L, R, dtype_bytes=dtype_bytes, batch=batch)["decode"]
    tok_s = lambda steps: batch * p / spread(period_sums(steps, p))["median"]  # noqa: E731
    return {
        "variant": variant, "ratio": R, "length": L, "batch": batch, "decode_period": p,
        "decode_tok_s_baseline": tok_s(base_s), "decode_tok_s": tok_s(s),
        "decode_speedup": r["median"], "decode_speedup_q25": r["q25"], "decode_speedup_q75": r["q75"],
        "decode_iqr_rel": r["iqr_rel"], "decode_predicted": pred, "decode_vs_predicted": r["median"] / pred,
        "decode_bytes": decode_step_bytes(cfg, L, R, batch=batch, dtype_bytes=dtype_bytes)["all"],
        "decode_bytes_baseline": decode_step_bytes(base_cfg, L, batch=batch, dtype_bytes=dtype_bytes)["all"],
        "kv_bytes_baseline": kv_base, "kv_bytes": kv,
        "kv_bytes_predicted": kv_cache_bytes(cfg, L, R, dtype_bytes, batch=batch),
        "kv_concept_reduction": kv_base["concept"] / max(kv["concept"], 1),
        "kv_total_reduction": kv_base["total"] / max(kv["total"], 1),
        "decode_period_ratios": ratios, "decode_step_s_baseline": base_s, "decode_step_s": s,
    }


def run_inference_bench(lengths: Sequence[int] = DEFAULT_LENGTHS, ratios: Sequence[float] = (1.5, 2.0),
                        decode_steps: int = 200, variants: Sequence[str] = ("efficiency", "matched"),
                        match: str = "topk", model: Optional[BenchModel] = None, threads: Optional[int] = None,
                        repeats: int = 3, batches: Sequence[int] = (1,), budget_s: Optional[float] = None,
                        quick: bool = False, out: Optional[str] = "runs/bench/inference.json",
                        plot: Optional[str] = None, seed: int = 0, clock: str = "wall", device: str = "cpu",
                        dtype: str = "float32") -> dict:
    """Measure prefill and decode of the baseline and each ConceptMoE variant, interleaved.

    ``repeats`` prefills per model and length (batch 1); ``decode_steps`` timed decode
    steps per model, length and batch size in ``batches`` (rounded up to whole boundary
    periods). With ``budget_s``, no new length starts once that many seconds have passed
    (what ran is reported). ``quick``: lengths 512 and 1024, 12 decode steps.
    ``clock="cpu"`` times with the process's CPU time instead of wall time: with
    ``threads=1`` it measures the work done even while other jobs hold the cores.
    ``device``/``dtype`` place the models (``cuda`` + ``bfloat16`` on a GPU); the byte
    predictions use that dtype's size.
    Returns the payload written to ``out``: ``prefill`` and ``decode`` rows (medians,
    quartiles and every sample), ``goals`` and the printed tables.
    """
    from ..model import ConceptMoE

    if quick:
        lengths, decode_steps = QUICK_LENGTHS, min(decode_steps, 12)
    batches = sorted({int(b) for b in batches})
    if not batches or batches[0] < 1:
        raise ValueError(f"--batch: batch sizes must be >= 1, got {list(batches)}")
    if decode_steps < 1 or repeats < 1:
        raise ValueError(f"--decode-steps and --repeats must be >= 1, got {decode_steps} and {repeats}")
    if threads:
        torch.set_num_threads(threads)
    spec = model or BenchModel()
    dev, dt = torch.device(device), DTYPES[dtype]
    if dev.type == "cuda" and clock == "cpu":
        raise ValueError("--clock cpu times the host only: a GPU's work needs --clock wall")
    elem = dt.itemsize
    lengths = sorted(int(L) for L in lengths)
    period = math.lcm(*[_period(R) for R in ratios])
    warm = 2 * period
    decode_steps += -decode_steps % period  # whole boundary periods only
    base_cfg = spec.baseline(max(lengths) + warm + decode_steps + 64)
    configs, matches = _configs(base_cfg, ratios, variants, match)
    models = {}
    for key, cfg in configs.items():
        torch.manual_seed(seed)
        models[key] = ConceptMoE(cfg).to(dev, dt).eval()
        with torch.inference_mode():  # warm-up: allocator, kernels, first cache growth
            o = models[key](torch.zeros(1, 64, dtype=torch.long, device=dev), use_cache=True)
            for _ in range(3):
                o = models[key](torch.zeros(1, 1, dtype=torch.long, device=dev), state=o.state)
    print(f"bench inference: width {spec.d_model}, {spec.n_layers} layers (1 enc + {spec.n_layers - 2} concept + "
          f"1 dec), {spec.n_experts} experts top-{spec.top_k} (hidden {spec.expert_hidden}), heads "
          f"{spec.n_heads}/{spec.n_kv_heads} kv, vocab {spec.vocab_size}; {dtype} on {device_name(dev)}, "
          f"{torch.get_num_threads()} threads, {clock} clock; models interleaved: prefill {repeats} repeats "
          f"(batch 1), decode {warm} warm-up + "
          f"{decode_steps} timed steps at batch {' '.join(map(str, batches))} (rows staggered over a period of "
          f"{period})", flush=True)
    for R, m in matches.items():
        print(f"  matched at R={R:g} ({m['strategy']}): {m['knob']}, linear FLOPs {m['flops_mismatch_pct']:+.1f}%, "
              f"total params {m['params_mismatch_pct']:+.2f}%", flush=True)

    g = torch.Generator().manual_seed(seed)
    clk = synced_clock(CLOCKS[clock], dev)
    base_key = ("baseline", 1.0)
    pre_rows, dec_rows, skipped, t_start = [], [], [], time.perf_counter()
    for L in lengths:
        if budget_s is not None and time.perf_counter() - t_start > budget_s:
            skipped.append(L)
            continue
        ids = torch.randint(0, spec.vocab_size, (max(batches), L + warm + decode_steps), generator=g).to(dev)
        times, last = measure_prefill(models, ids[:1, :L], repeats, clk)
        check_realised_ratios(last, L, dtype)
        for key in models:
            if key != base_key:
                r = _prefill_row(key, configs[key], base_cfg, L, times[base_key], times[key], elem)
                pre_rows.append(r)
                print(f"  L={L:>6} {key[0]:<10} R={key[1]:<4g} prefill {r['prefill_s']:.2f}s vs "
                      f"{r['prefill_s_baseline']:.2f}s: {r['prefill_speedup']:.2f}x (IQR "
                      f"{r['prefill_speedup_q25']:.2f}-{r['prefill_speedup_q75']:.2f}, pred "
                      f"{r['prefill_predicted']:.2f}x)", flush=True)
        for b in batches:
            if b == 1:  # batch 1 decodes from the last prefill
                states, last, next_BT = last, {}, {k: ids[:1, L:] for k in models}
            else:
                last = {}
                states, next_BT = decode_states(models, ids, L, b, period)
            kv = {k: st.kv_bytes() for k, st in states.items()}
            times = measure_decode(models, states, next_BT, warm, decode_steps, clk)
            del states
            for key in models:
                if key == base_key:
                    continue
                r = _decode_row(key, configs[key], base_cfg, L, b, times[base_key], times[key], kv[base_key],
                                kv[key], elem)
                dec_rows.append(r)
                print(f"  L={L:>6} {key[0]:<10} R={key[1]:<4g} batch {b:<3} decode {r['decode_tok_s']:.1f} vs "
                      f"{r['decode_tok_s_baseline']:.1f} tok/s: {r['decode_speedup']:.2f}x (IQR "
                      f"{r['decode_speedup_q25']:.2f}-{r['decode_speedup_q75']:.2f}, pred "
                      f"{r['decode_predicted']:.2f}x)", flush=True)
        del last
        gc.collect()
    tables = _tables(pre_rows, dec_rows)
    if skipped:
        print(f"skipped lengths (time budget {budget_s}s): {skipped}")
    payload = {"config": {"model": spec.__dict__, "lengths": lengths, "ratios": list(ratios), "batches": batches,
                          "decode_steps": decode_steps, "warm_steps": warm, "repeats": repeats, "period": period,
                          "variants": list(variants), "match": matches,
                          "threads": torch.get_num_threads(), "clock": clock, "device": device_name(dev),
                          "dtype": dtype, "skipped_lengths": skipped,
                          "method": "interleaved: median and IQR of per-repeat prefill ratios and of per-period "
                                    "decode ratios (conceptvlm.bench.interleave)"},
               "prefill": pre_rows, "decode": dec_rows, "goals": _goals(pre_rows, dec_rows), "tables": tables}
    return finish(payload, out, plot, lambda path: plot_results(pre_rows, dec_rows, path))


def realised_ratio(state) -> float:
    """Tokens per concept held in a decoding state (its caches' key counts)."""
    tokens, concepts = state.tokens.index.lengths, state.concepts.index.lengths
    return float(tokens.sum()) / max(float(concepts.sum()), 1.0)


def check_realised_ratios(states: dict, length: int, dtype: str, tol: float = 0.05) -> None:
    """Each model must hold about one concept per R tokens after its prefill, or its
    timings compare a different model (a fixed router whose boundaries drift, say);
    raises with the ratios found."""
    bad = []
    for (variant, R), state in states.items():
        got = realised_ratio(state)
        if abs(got / R - 1) > tol:
            bad.append(f"{variant} R={R:g} holds {got:.2f} tokens per concept")
    if bad:
        raise RuntimeError(f"bench inference at L={length} in {dtype}: " + "; ".join(bad)
                           + f" (more than {100 * tol:.0f}% off): the timings would compare other models")


def device_name(dev: torch.device) -> str:
    return torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"


def synced_clock(clock: Callable[[], float], dev: torch.device) -> Callable[[], float]:
    """``clock``, reading only once the GPU has finished what was queued (kernels run
    asynchronously: without it a step would be timed by its launches)."""
    if dev.type != "cuda":
        return clock

    def read() -> float:
        torch.cuda.synchronize(dev)
        return clock()
    return read


def _tables(pre_rows: list[dict], dec_rows: list[dict]) -> dict[str, str]:
    """The printed prefill and decode tables (ratios as ``median [q25-q75]``)."""
    iqr = lambda r, k: f"{r[k + '_speedup']:.2f} [{r[k + '_speedup_q25']:.2f}-{r[k + '_speedup_q75']:.2f}]"  # noqa
    pre = print_table(
        ["variant", "R", "length", "prefill s base", "prefill s", "prefill x [IQR]", "pred x", "% of pred"],
        [[r["variant"], r["ratio"], r["length"], r["prefill_s_baseline"], r["prefill_s"], iqr(r, "prefill"),
          f"{r['prefill_predicted']:.2f}", f"{100 * r['prefill_vs_predicted']:.0f}%"] for r in pre_rows])
    dec = print_table(
        ["variant", "R", "length", "batch", "tok/s base", "tok/s", "decode x [IQR]", "IQR/med", "pred x",
         "% of pred", "MB/step base", "MB/step", "KV concept /", "KV total /"],
        [[r["variant"], r["ratio"], r["length"], r["batch"], r["decode_tok_s_baseline"], r["decode_tok_s"],
          iqr(r, "decode"), f"{100 * r['decode_iqr_rel']:.0f}%", f"{r['decode_predicted']:.2f}",
          f"{100 * r['decode_vs_predicted']:.0f}%", r["decode_bytes_baseline"] / 1e6, r["decode_bytes"] / 1e6,
          f"{r['kv_concept_reduction']:.2f}", f"{r['kv_total_reduction']:.2f}"] for r in dec_rows])
    return {"prefill": pre, "decode": dec}


def _goals(pre_rows: list[dict], dec_rows: list[dict]) -> dict:
    """The goals: >= 90% of predicted at lengths >= 4k (batch 1); R=2 efficiency at 16k:
    prefill >= 2.75x; decode at batch 1 and 8 >= 2.17x and >= 95% of predicted as a
    median, with an interquartile range under 10% of it."""
    lines, ok = [], {}
    for kind, rows in (("prefill", pre_rows), ("decode", [r for r in dec_rows if r["batch"] == 1])):
        long = [r for r in rows if r["length"] >= 4096]
        bad = [f"{r['variant']} R={r['ratio']:g} L={r['length']}: {100 * r[kind + '_vs_predicted']:.0f}%"
               for r in long if r[kind + "_vs_predicted"] < 0.9]
        ok[f"{kind}_90pct"] = not bad if long else None
        lines.append(f"goal {kind} >= 90% of predicted at L >= 4k (batch 1): "
                     + ("not measured" if not long else "met" if not bad else "MISSED (" + "; ".join(bad) + ")"))
    head = lambda r: r["variant"] == "efficiency" and r["ratio"] == 2.0 and r["length"] == 16384  # noqa: E731
    pre = [r for r in pre_rows if head(r)]
    if pre:
        v = pre[0]["prefill_speedup"]
        ok["prefill_16k"] = v >= 2.75
        lines.append(f"goal prefill at R=2, 16k >= 2.75x: {v:.2f}x {'met' if v >= 2.75 else 'MISSED'}")
    else:
        ok["prefill_16k"] = None
        lines.append("goal prefill at R=2, 16k >= 2.75x: not measured")
    for b in GOAL_BATCHES:
        rows = [r for r in dec_rows if head(r) and r["batch"] == b]
        name = f"goal decode at R=2, 16k, batch {b} (>= 2.17x, >= 95% of predicted, IQR < 10% of median)"
        if not rows:
            ok[f"decode_16k_batch{b}"] = None
            lines.append(f"{name}: not measured")
            continue
        r = rows[0]
        checks = {">= 2.17x": r["decode_speedup"] >= 2.17, ">= 95% of predicted": r["decode_vs_predicted"] >= 0.95,
                  "IQR < 10%": r["decode_iqr_rel"] < 0.10}
        ok[f"decode_16k_batch{b}"] = all(checks.values())
        lines.append(f"{name}: {r['decode_speedup']:.2f}x (IQR {r['decode_speedup_q25']:.2f}-"
                     f"{r['decode_speedup_q75']:.2f} = {100 * r['decode_iqr_rel']:.0f}% of median; "
                     f"{100 * r['decode_vs_predicted']:.0f}% of predicted {r['decode_predicted']:.2f}x) "
                     + ("met" if all(checks.values()) else
                        "MISSED (" + ", ".join(k for k, v in checks.items() if not v) + ")"))
    return {"met": ok, "lines": lines}


def plot_results(pre_rows: list[dict], dec_rows: list[dict], path: str) -> None:
    """Measured speedups (median, IQR bars) and predicted ones (dashed) against context
    length: prefill, and decode per batch size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, kind, rows in ((axes[0], "prefill", pre_rows), (axes[1], "decode", dec_rows)):
        keys = sorted({(r["variant"], r["ratio"], r.get("batch", 1)) for r in rows})
        for i, (variant, R, b) in enumerate(keys):
            rs = sorted((r for r in rows if (r["variant"], r["ratio"], r.get("batch", 1)) == (variant, R, b)),
                        key=lambda r: r["length"])
            x, y = [r["length"] for r in rs], [r[kind + "_speedup"] for r in rs]
            err = [[v - r[kind + "_speedup_q25"] for v, r in zip(y, rs)],
                   [r[kind + "_speedup_q75"] - v for v, r in zip(y, rs)]]
            label = f"{variant} R={R:g}" + (f" batch {b}" if kind == "decode" else "")
            ax.errorbar(x, y, yerr=err, fmt="o-", color=f"C{i}", capsize=3, label=label + " measured")
            ax.plot(x, [r[kind + "_predicted"] for r in rs], "x--", color=f"C{i}", alpha=0.7,
                    label=label + " predicted")
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel("speedup over the MoE baseline (median, IQR)")
        ax.set_title(f"{kind} ({'FLOPs' if kind == 'prefill' else 'bytes moved'} prediction dashed)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def add_model_args(p: argparse.ArgumentParser) -> None:
    """The bench model's shape and where it runs (shared with ``decode-profile``)."""
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--layers", type=int, default=24)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--expert-hidden", type=int, default=512)
    p.add_argument("--vocab", type=int, default=512)
    p.add_argument("--device", default="cpu", help="cpu, or cuda / cuda:N on a GPU")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32",
                   help="weights and caches (bfloat16 on a GPU; the CPU's kernels favour float32)")


def model_from_args(args: argparse.Namespace) -> BenchModel:
    return BenchModel(d_model=args.d_model, n_heads=args.heads, n_kv_heads=args.kv_heads, n_layers=args.layers,
                      n_experts=args.experts, top_k=args.top_k, expert_hidden=args.expert_hidden,
                      vocab_size=args.vocab)


def _run(args: argparse.Namespace) -> int:
    run_inference_bench(lengths=args.lengths, ratios=args.ratios,
                        decode_steps=args.decode_steps, variants=args.variants, match=args.match,
                        model=model_from_args(args), threads=args.threads, repeats=args.repeats, batches=args.batch,
                        budget_s=args.budget_s, quick=args.quick, out=args.out, plot=args.plot, seed=args.seed,
                        clock=args.clock, device=args.device, dtype=args.dtype)
    return 0


def register_bench(bench_subparsers: "argparse._SubParsersAction") -> None:
    """Add ``inference`` to the ``bench`` command's subparsers."""
    p = bench_subparsers.add_parser("inference", help="prefill latency and decode tokens/s: ConceptMoE vs MoE")
    p.add_argument("--lengths", nargs="+", type=parse_length, default=list(DEFAULT_LENGTHS),
                   help="context lengths (e.g. 1k 2k 4k 8k 16k)")
    p.add_argument("--ratios", type=float, nargs="+", default=[1.5, 2.0])
    p.add_argument("--decode-steps", type=int, default=200,
                   help="timed decode steps per model (rounded up to whole boundary periods)")
    p.add_argument("--batch", type=int, nargs="+", default=[1],
                   help="decode batch sizes (rows with staggered concept boundaries), e.g. 1 8 32")
    p.add_argument("--variants", nargs="+", choices=["efficiency", "matched"], default=["efficiency", "matched"])
    p.add_argument("--match", choices=["topk", "loops", "width"], default="topk",
                   help="reallocation strategy of the compute-matched variant")
    add_model_args(p)
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads (1 is steadier on a shared, loaded machine)")
    p.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                   help="wall time, or process CPU time (with --threads 1: robust to other jobs on the machine)")
    p.add_argument("--repeats", type=int, default=3, help="interleaved prefills per model and length")
    p.add_argument("--budget-s", type=float, default=None, help="start no new length after this many seconds")
    p.add_argument("--quick", action="store_true", help="lengths 512 1024, 12 decode steps")
    p.add_argument("--out", default="runs/bench/inference.json")
    p.add_argument("--plot", default=None, help="PNG path (default: next to --out)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_run)
