"""``conceptvlm eval SUITE --checkpoint DIR``: run one suite on an exported checkpoint.

Suites: ``text`` (perplexity, bits-per-byte), ``longctx`` (passkey / needle retrieval
per length and depth, with a heatmap), ``vqa`` (official VQAv2 accuracy),
``grounding`` (Acc@0.5 IoU), ``harness`` (lm-evaluation-harness tasks) and ``lmms``
(lmms-eval tasks, images included). Each writes one JSON (per-item results and a summary,
or the harness's own results); the two harnesses also print their own results table.
:func:`evaluate` is the same from Python.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Optional

import torch

from conceptvlm.errors import UserError

SUITES = ("text", "longctx", "vqa", "grounding", "harness", "lmms")
HARNESSES = ("harness", "lmms")


def _is_shard_spec(spec) -> bool:
    if isinstance(spec, (list, tuple)):
        return True
    return spec.startswith("pipe:") or ".tar" in spec


def evaluate(suite: str, model: torch.nn.Module, tokenizer: Any, *, data: Optional[str] = None,
             limit: Optional[int] = None, batch_size: int = 8, max_length: int = 2048,
             out_path: Optional[str | Path] = None, lengths: tuple[int, ...] = (1024, 2048, 4096),
             depths: tuple[float, ...] = (0.0, 0.5, 1.0), task: str = "passkey", samples: int = 1,
             tasks: tuple[str, ...] = (), include_path: Optional[str] = None) -> dict:
    """Run ``suite`` on an in-memory model; returns ``{"summary": ..., "items": [...]}``."""
    from conceptvlm.generate import cached_generate

    from .io import write_json

    if suite not in SUITES:
        raise ValueError(f"unknown suite {suite!r}; expected one of {SUITES}")
    model.eval()
    if suite in ("text", "vqa", "grounding") and not data:
        raise ValueError(f"suite {suite!r} needs --data (a text/jsonl file or shards)")
    if suite in HARNESSES and not tasks:
        raise ValueError(f"suite {suite!r} needs --tasks")
    from conceptvlm.data.counters import DataCounters

    counters = DataCounters()  # bad samples of shard data: skipped, counted, summarised
    if suite == "text":
        from .datasets import texts_from_shards
        from .text import perplexity, read_corpus

        texts = texts_from_shards(data, limit, counters) if _is_shard_spec(data) else read_corpus(data)[:limit]
        result = perplexity(model, tokenizer, texts, max_length=max_length, batch_size=batch_size)
    elif suite == "longctx":
        from .longctx import run_retrieval

        heatmap = None if out_path is None else Path(out_path).with_suffix(".png")

        def ratio(out):
            return {k: float(v["ratio"]) for k, v in out.chunk_stats.items()}

        result = run_retrieval(model, tokenizer, task, lengths=lengths, depths=depths, samples=samples,
                               generate_fn=cached_generate, ratio_fn=ratio, heatmap_path=heatmap)
    elif suite in ("vqa", "grounding"):
        processor = getattr(model, "image_processor", None)
        if processor is None:
            raise ValueError(f"suite {suite!r} needs a model with a vision tower")
        n = model.tokens_per_image
        if suite == "vqa":
            from .datasets import vqa_samples_from_shards
            from .vqa_runner import run_vqa

            result = run_vqa(model, tokenizer, vqa_samples_from_shards(data, processor, limit, counters),
                             image_tokens_per_image=n, batch_size=batch_size, generate_fn=cached_generate)
        else:
            from .datasets import grounding_samples_from_shards
            from .grounding_runner import run_grounding

            result = run_grounding(model, tokenizer, grounding_samples_from_shards(data, processor, limit, counters),
                                   image_tokens_per_image=n, batch_size=batch_size, generate_fn=cached_generate)
    elif suite == "harness":
        from .harness import run_harness

        result = run_harness(model, tokenizer, list(tasks), include_path=include_path, limit=limit,
                             batch_size=batch_size, max_length=max_length)
    else:  # lmms
        try:
            from .lmms import run_lmms
        except ImportError as e:
            raise UserError(f"lmms-eval is not installed ({e})", "pip install 'conceptvlm[lmms]'") from None

        result = run_lmms(model, tokenizer, list(tasks), include_path=include_path, limit=limit,
                          batch_size=batch_size)
    if suite in ("text", "vqa", "grounding") and _is_shard_spec(data):
        result["data"] = counters.as_dict()
    if out_path is not None:
        write_json(result, out_path)
    return result


def _run(args: argparse.Namespace) -> int:
    from conceptvlm.export import load_exported

    model, tokenizer = load_exported(args.checkpoint)
    if tokenizer is None:
        from conceptvlm.data import load_tokenizer

        tokenizer = load_tokenizer(None)
    out = args.out or str(Path(args.checkpoint) / "eval" / f"{args.suite}.json")
    result = evaluate(args.suite, model, tokenizer, data=args.data, limit=args.limit, batch_size=args.batch_size,
                      max_length=args.max_length, out_path=out, lengths=tuple(args.lengths),
                      depths=tuple(args.depths), task=args.task, samples=args.samples, tasks=tuple(args.tasks),
                      include_path=args.include_path)
    if args.suite in HARNESSES:
        from .harness import results_table

        make_table = None
        if args.suite == "lmms":
            from lmms_eval.utils import make_table
        print(results_table(result, make_table))
    else:
        summary = result.get("summary", {k: v for k, v in result.items() if k != "samples"})
        print(json.dumps(summary, indent=2, default=str)[:4000])
    if "data" in result:
        from conceptvlm.data.counters import skip_summary

        print(skip_summary(result["data"], what=f"eval {args.suite} data"))
    print(f"wrote {out}")
    return 0


def register(subparsers: "argparse._SubParsersAction") -> argparse.ArgumentParser:
    """Add ``eval SUITE --checkpoint DIR ...`` to a CLI's sub-parsers."""
    p = subparsers.add_parser("eval", help="evaluate an exported checkpoint on a suite; writes a JSON")
    p.add_argument("suite", choices=SUITES)
    p.add_argument("--checkpoint", required=True, help="an exported model directory (conceptvlm train's export)")
    p.add_argument("--data", default=None, help="text/jsonl file, or shards (e.g. 'vqa-{000000..000003}.tar')")
    p.add_argument("--limit", type=int, default=None, help="at most this many samples / documents")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=2048, help="context window for text scoring")
    p.add_argument("--task", default="passkey", choices=("passkey", "needle"), help="longctx task")
    p.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096], help="longctx prompt lengths")
    p.add_argument("--depths", type=float, nargs="+", default=[0.0, 0.5, 1.0], help="longctx needle depths")
    p.add_argument("--samples", type=int, default=1, help="longctx prompts per (length, depth)")
    p.add_argument("--tasks", nargs="+", default=[], help="task names (harness: lm-eval, lmms: lmms-eval)")
    p.add_argument("--include-path", default=None,
                   help="folder of local task YAMLs (harness, lmms); their relative data paths resolve against it")
    p.add_argument("--out", default=None, help="result JSON (default: CHECKPOINT/eval/SUITE.json)")
    p.set_defaults(func=_run)
    return p
