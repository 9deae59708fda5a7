"""``conceptvlm flops``: the accounting of :mod:`conceptvlm.flops` as a printed report."""
from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Optional

from ..config import ModelConfig
from ..flops import (PARTS, STRATEGIES, attention_map_flops, baseline_of, built_parameter_counts, concept_config,
                     effective_ratio, kv_cache_bytes, linear_flops_per_token, match_compute, parameter_counts,
                     predicted_speedups)
from .common import print_table


def _paper_stated(path: Path) -> dict[str, float]:
    """``# paper_stated: total=60e9 activated=2.5e9`` comment lines of a YAML file."""
    out: dict[str, float] = {}
    for line in path.read_text().splitlines():
        m = re.match(r"\s*#\s*paper_stated:\s*(.*)", line)
        if m:
            for k, v in re.findall(r"(\w+)=([0-9.eE+-]+)", m.group(1)):
                out[k] = float(v)
    return out


def _h(n: float) -> str:
    for unit, s in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= unit:
            return f"{n / unit:.3g}{s}"
    return f"{n:.3g}"


def print_accounting(cfg_path: str, R: Optional[float] = None, match: Optional[str] = None,
                     lengths: tuple[int, ...] = (4096, 32768), dtype_bytes: int = 2,
                     check_meta: bool = True) -> dict:
    """Print parameters (by part), activated FLOPs, attention FLOPs and KV cache of the
    ConceptMoE config at ``cfg_path`` and of its baseline MoE; optionally a compute
    match. Returns the numbers as a dict."""
    path = Path(cfg_path)
    cfg = ModelConfig.from_yaml(path)
    R = effective_ratio(cfg, R) if cfg.chunk.router != "none" else float(R or 2.0)
    if cfg.chunk.router == "none":  # a baseline file: account a default ConceptMoE of it
        cfg = concept_config(cfg.to_dict(), R, "cosine", True)
    base = baseline_of(cfg)
    pb, pc = parameter_counts(base), parameter_counts(cfg)
    print(f"{path}  (ConceptMoE at R={R:g}, router {cfg.chunk.router}; baseline = same layers, router none)")
    rows = [[p, _h(pb.total[p]), _h(pb.activated[p]), _h(pc.total[p]), _h(pc.activated[p])] for p in PARTS]
    rows.append(["TOTAL", _h(pb.n_total), _h(pb.n_activated), _h(pc.n_total), _h(pc.n_activated)])
    rows.append(["non-embedding activated", "", _h(pb.n_activated_non_embedding), "",
                 _h(pc.n_activated_non_embedding)])
    print_table(["part", "base total", "base activated", "concept total", "concept activated"], rows)
    result = {"config": str(path), "ratio": R, "baseline": {"total": pb.n_total, "activated": pb.n_activated},
              "concept": {"total": pc.n_total, "activated": pc.n_activated}}
    if check_meta:
        built = built_parameter_counts(cfg)
        ok = built == pc.total
        print(f"meta-device build: {sum(built.values()):,} parameters "
              f"({'equals' if ok else 'DIFFERS FROM'} the analytic count {pc.n_total:,})")
        result["meta_device_total"] = sum(built.values())
    stated = _paper_stated(path)
    # ConceptMoE's activated params per token, FLOPs-equivalent: what a token costs in
    # linear FLOPs / 2 (its concept model's share / R), plus the input embedding row.
    fc_all = linear_flops_per_token(cfg, R)["all"]
    equiv = fc_all / 2 + pc.activated["embedding"]
    print(f"activated per token: baseline {_h(pb.n_activated)}; ConceptMoE {_h(equiv)} FLOPs-equivalent "
          f"(linear FLOPs/2 + embedding; a concept itself activates {_h(pc.n_activated)})")
    result["concept"]["activated_flops_equivalent"] = equiv
    if stated:
        mine = {"total": (pb.n_total, pc.n_total), "activated": (pb.n_activated, equiv)}
        parts = [f"{k} {_h(v)} vs computed baseline {_h(mine[k][0])} / ConceptMoE {_h(mine[k][1])}"
                 for k, v in stated.items() if k in mine]
        print("paper states: " + "; ".join(parts))
        result["paper_stated"] = stated
    fb, fc = linear_flops_per_token(base), linear_flops_per_token(cfg, R)
    print(f"activated linear FLOPs/token: baseline {_h(fb['all'])}, ConceptMoE {_h(fc['all'])} "
          f"({100 * (fc['all'] / fb['all'] - 1):+.2f}%; concept model {_h(fc['concept_model'])} vs "
          f"{_h(fb['concept_model'])} in the baseline's middle layers)")
    rows = []
    for L in lengths:
        ab, ac = attention_map_flops(base, L), attention_map_flops(cfg, L, R)
        kb, kc = kv_cache_bytes(base, L, dtype_bytes=dtype_bytes), kv_cache_bytes(cfg, L, R, dtype_bytes)
        sp = predicted_speedups(base, cfg, L, R, dtype_bytes)
        rows.append([L, _h(ab["all"]), _h(ac["all"]), f"{ab['all'] / ac['all']:.2f}x",
                     f"{ab['concept_layers'] / max(ac['concept_layers'], 1):.2f}x", _h(kb["total"]), _h(kc["total"]),
                     f"{sp['kv_total']:.2f}x", f"{sp['prefill']:.2f}x", f"{sp['decode']:.2f}x"])
    print(f"per sequence, batch 1, KV in {dtype_bytes}-byte dtype:")
    print_table(["length", "attn base", "attn concept", "attn ratio", "concept-layer attn ratio", "KV base",
                 "KV concept", "KV ratio", "pred. prefill", "pred. decode"], rows)
    if match:
        res = match_compute(base, R, match, router=cfg.chunk.router)
        print("compute match " + res.summary())
        result["match"] = {"strategy": match, "knob": res.knob, "flops_mismatch_pct": res.flops_mismatch_pct,
                           "params_mismatch_pct": res.params_mismatch_pct}
    return result


def _flops_cmd(args: argparse.Namespace) -> int:
    print_accounting(args.config, args.ratio, args.match, tuple(args.lengths), args.dtype_bytes)
    return 0


def register(subparsers: "argparse._SubParsersAction") -> None:
    """Add ``flops --config FILE --ratio R [--match topk|loops|width]``."""
    p = subparsers.add_parser("flops", help="parameters, activated FLOPs, attention FLOPs and KV cache of a config")
    p.add_argument("--config", required=True, help="model YAML (configs/model/*.yaml)")
    p.add_argument("--ratio", type=float, default=None, help="compression ratio R (default: the config's target)")
    p.add_argument("--match", choices=STRATEGIES, default=None,
                   help="also propose a compute-matched concept model with this strategy")
    p.add_argument("--lengths", type=int, nargs="+", default=[4096, 32768])
    p.add_argument("--dtype-bytes", type=int, default=2, help="bytes per KV element (2 = bf16)")
    p.set_defaults(func=_flops_cmd)
