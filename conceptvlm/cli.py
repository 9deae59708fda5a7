"""The ``conceptvlm`` console script: thin commands over library functions.

Each sub-command sets ``func(args) -> int``; everything it does is callable from Python.
Expected failures (missing files, bad configs, unknown tasks, ...) are turned into one
line and exit code 2 here, in one place (:mod:`conceptvlm.errors`); ``--debug``, anywhere
on the command line, shows the traceback instead.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

from .errors import UserError


def _bench_moe(args: argparse.Namespace) -> int:
    from .bench.moe import run_model_step_bench, run_moe_bench

    if args.model_config and not Path(args.model_config).is_file():
        raise UserError(f"model config not found: {args.model_config}", "pass --model-config FILE, or '' to skip")
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


def _generate(args: argparse.Namespace) -> int:
    from .ask import GenerationOptions, answer_file, generate_texts, read_requests
    from .export import load_exported

    opts = GenerationOptions(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                             stop=tuple(args.stop), seed=args.seed)
    if (args.prompt is None) == (args.input is None):
        raise UserError("give either --prompt TEXT or --input FILE.jsonl", "see conceptvlm generate --help")
    requests = read_requests(args.input) if args.input else None  # bad input fails before the model loads
    model, tokenizer = load_exported(args.checkpoint)
    if tokenizer is None:
        from .data import load_tokenizer

        tokenizer = load_tokenizer(None)
    if requests is not None:
        out = args.out or str(Path(args.input).with_suffix(".answers.jsonl"))
        answer_file(model, tokenizer, requests, out, opts, batch_size=args.batch_size)
        print(f"answered {len(requests)} request(s) -> {out}")
        return 0
    generate_texts(model, tokenizer, [args.prompt], [args.image], opts,
                   on_text=lambda row, piece: print(piece, end="", flush=True))
    print()
    return 0


def _export(args: argparse.Namespace) -> int:
    from .hf_export import export_hf

    out = export_hf(args.checkpoint, args.hf, push_to_hub=args.push_to_hub, private=args.private,
                    overwrite=args.overwrite)
    print(f"wrote {out} (transformers layout: AutoModelForCausalLM.from_pretrained(..., trust_remote_code=True))"
          + (f"; pushed to https://huggingface.co/{args.push_to_hub}" if args.push_to_hub else ""))
    return 0


def _register_use(sub: "argparse._SubParsersAction") -> None:
    """``generate`` (ask the model) and ``export --hf`` (hand it to the hub ecosystem)."""
    g = sub.add_parser("generate", help="answer a prompt about images with an exported model (streams the answer)")
    g.add_argument("--checkpoint", required=True, help="exported model directory (a run's export/ or export --hf)")
    g.add_argument("--image", action="append", default=[], help="image path or http(s) URL (repeat for several)")
    g.add_argument("--prompt", default=None,
                   help='prompt text, e.g. "Question: what colour is the shape? Answer:" (<image> marks where '
                        "images go; default: before the text)")
    g.add_argument("--input", default=None, help='jsonl of {"prompt": ..., "image": path|URL|[...]} rows, '
                                                  "answered in batches (relative paths: against the file's folder)")
    g.add_argument("--out", default=None, help="answers jsonl for --input (default: INPUT.answers.jsonl)")
    g.add_argument("--batch-size", type=int, default=8)
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (with --temperature > 0)")
    g.add_argument("--stop", action="append", default=[], help="stop string (repeat for several)")
    g.add_argument("--seed", type=int, default=None, help="sampling seed (row i of --input uses seed + i)")
    g.set_defaults(func=_generate)
    e = sub.add_parser("export", help="write an exported model in the transformers layout (hub, lmms-eval, lm_eval hf)")
    e.add_argument("--hf", required=True, metavar="OUT", help="output directory")
    e.add_argument("--checkpoint", required=True, help="exported model directory (a training run's export/)")
    e.add_argument("--push-to-hub", default=None, metavar="REPO", help="also upload to this hub repo (needs a token)")
    e.add_argument("--private", action="store_true", help="create the hub repo private")
    e.add_argument("--overwrite", action="store_true", help="replace a non-empty --hf folder")
    e.set_defaults(func=_export)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Parse ``argv`` and run the command; expected failures print one line and return 2."""
    from .errors import EXIT_USAGE, one_line

    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    parser = build_parser()
    try:
        args = parser.parse_args([a for a in argv if a != "--debug"])
    except SystemExit as e:  # --help / --version (0) or a usage error already printed (2)
        return int(e.code or 0)
    if not debug:
        from .quiet import quiet_library_warnings

        quiet_library_warnings()
    try:
        return int(args.func(args) or 0)
    except Exception as e:
        message = None if debug else one_line(e)
        if message is None:  # --debug, or a bug rather than bad input: keep the traceback
            raise
        print(f"error: {message}", file=sys.stderr)
        return EXIT_USAGE


class OneLineParser(argparse.ArgumentParser):
    """A usage error is one line, like every other bad input (``--help`` shows the usage)."""

    def error(self, message: str):
        self.exit(2, f"error: {self.prog}: {message} (see --help)\n")


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
    from .bench import decode_profile
    from .data import bench as data_bench
    from .data import cli as data_cli
    from .eval import cli as eval_cli
    from .eval import suites as eval_suites

    parser = OneLineParser(
        prog="conceptvlm", description="ConceptVLM: vision-language MoE models whose language backbone runs on concepts")
    parser.add_argument("--version", action="version", version=f"conceptvlm {__version__}")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error (anywhere on the line)")
    sub = parser.add_subparsers(dest="command", required=True)
    demo.register(sub)
    add_train_parser(sub)
    add_convert_parser(sub)
    bench_kinds = _register_bench(sub)
    _register_use(sub)
    eval_cli.register(sub)
    eval_suites.register(sub)
    data_cli.register(sub)
    data_bench.register_bench(bench_kinds)
    inference_bench.register_bench(bench_kinds)
    scan_bench.register_bench(bench_kinds)
    train_bench.register_bench(bench_kinds)
    decode_profile.register_bench(bench_kinds)
    flops_report.register(sub)
    experiments.register(sub)
    return parser


if __name__ == "__main__":
    sys.exit(main())
