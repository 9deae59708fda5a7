"""The ``conceptvlm`` console script: thin commands over library functions.

Each sub-command sets ``func(args) -> int``; everything it does is callable from Python.
Expected failures (missing files, bad configs, unknown tasks, ...) are turned into one
line and exit code 2 here, in one place (:mod:`conceptvlm.errors`); ``--debug``, anywhere
on the command line, shows the traceback instead.
"""
from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence


def _bench_moe(args: argparse.Namespace) -> int:
    from .bench.moe import run_model_step_bench, run_moe_bench

    run_moe_bench(tokens=args.tokens, d_model=args.d_model, hidden=args.hidden, n_experts=args.experts,
                  top_k=args.top_k, repeats=args.repeats, with_deepspeed=not args.no_deepspeed, out=args.out)
    if args.model_config:
        run_model_step_bench(args.model_config)
    return 0


def _register_bench(sub: "argparse._SubParsersAction") -> "argparse._SubParsersAction":
    bench = sub.add_parser("bench", help="benchmarks that print a table and write JSON")
    kinds = bench.add_subparsers(dest="bench_kind", required=True)
    moe = kinds.add_parser("moe", help="our dropless MoE vs naive, DeepSpeed MoE and the dense bound")
    moe.add_argument("--tokens", type=int, default=4096)
    moe.add_argument("--d-model", type=int, default=512)
    moe.add_argument("--hidden", type=int, default=1024)
    moe.add_argument("--experts", type=int, default=8)
    moe.add_argument("--top-k", type=int, default=2)
    moe.add_argument("--repeats", type=int, default=5)
    moe.add_argument("--no-deepspeed", action="store_true", help="skip the DeepSpeed rows")
    moe.add_argument("--model-config", default="configs/model/tiny.yaml",
                     help="also time forward+backward of this model config ('' to skip)")
    moe.add_argument("--out", default="runs/bench/moe.json")
    moe.set_defaults(func=_bench_moe)
    return kinds


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Parse ``argv`` and run the command; expected failures print one line and return 2."""
    from .errors import EXIT_USAGE, one_line

    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    parser = build_parser()
    args = parser.parse_args([a for a in argv if a != "--debug"])
    if not debug:
        from .quiet import quiet_library_warnings

        quiet_library_warnings()
    try:
        return int(args.func(args) or 0)
    except (Exception, SystemExit) as e:
        if isinstance(e, SystemExit) or debug:
            raise
        message = one_line(e)
        if message is None:  # a bug, not bad input: keep the traceback
            raise
        print(f"error: {message}", file=sys.stderr)
        return EXIT_USAGE


def build_parser() -> argparse.ArgumentParser:
    """The whole ``conceptvlm`` command tree."""
    from . import __version__
    from . import demo, experiments
    from .bench import flops as flops_report
    from .convert import add_convert_parser
    from .train import add_train_parser
    from .bench import inference as inference_bench
    from .bench import scan as scan_bench
    from .bench import train as train_bench
    from .data import bench as data_bench
    from .data import cli as data_cli
    from .eval import cli as eval_cli
    from .eval import suites as eval_suites

    parser = argparse.ArgumentParser(
        prog="conceptvlm", description="ConceptVLM: vision-language MoE models whose language backbone runs on concepts")
    parser.add_argument("--version", action="version", version=f"conceptvlm {__version__}")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error (anywhere on the line)")
    sub = parser.add_subparsers(dest="command", required=True)
    demo.register(sub)
    add_train_parser(sub)
    add_convert_parser(sub)
    bench_kinds = _register_bench(sub)
    eval_cli.register(sub)
    eval_suites.register(sub)
    data_cli.register(sub)
    data_bench.register_bench(bench_kinds)
    inference_bench.register_bench(bench_kinds)
    scan_bench.register_bench(bench_kinds)
    train_bench.register_bench(bench_kinds)
    flops_report.register(sub)
    experiments.register(sub)
    return parser


if __name__ == "__main__":
    sys.exit(main())
