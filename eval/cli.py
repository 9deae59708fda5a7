"""``conceptvlm score vqa|grounding``: thin wrappers over ``eval.vqa`` / ``eval.grounding``.

The console script adds these with ``register(subparsers)``; each sub-command sets
``func(args) -> int`` as its default, which the main CLI calls.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Optional


def _default_out(predictions: str) -> Path:
    p = Path(predictions)
    return p.with_name(p.stem + ".scores.json")


def _score_vqa(args: argparse.Namespace) -> int:
    from .io import write_json
    from .vqa import score_vqa
    result = score_vqa(args.predictions, args.annotations, args.questions)
    out = write_json(result, args.out or _default_out(args.predictions))
    print(json.dumps(result["summary"], indent=2))
    print(f"wrote {out}")
    return 0


def _score_grounding(args: argparse.Namespace) -> int:
    from .grounding import score_grounding
    from .io import write_json
    result = score_grounding(args.predictions, args.annotations, threshold=args.threshold)
    out = write_json(result, args.out or _default_out(args.predictions))
    print(json.dumps(result["summary"], indent=2))
    print(f"wrote {out}")
    return 0


def register(subparsers: "argparse._SubParsersAction") -> argparse.ArgumentParser:
    """Add ``score vqa`` and ``score grounding`` to a CLI's sub-parsers."""
    score = subparsers.add_parser("score", help="score prediction files (VQA, grounding)")
    sub = score.add_subparsers(dest="score_kind", required=True)

    vqa = sub.add_parser("vqa", help="official VQAv2 accuracy (also TextVQA, GQA files)")
    vqa.add_argument("--predictions", required=True, help='[{"question_id": ..., "answer": ...}]')
    vqa.add_argument("--annotations", required=True,
                     help="VQAv2 annotations json, TextVQA json or GQA questions json")
    vqa.add_argument("--questions", default=None, help="VQAv2 questions json (optional)")
    vqa.add_argument("--out", default=None, help="result JSON (default: PREDICTIONS.scores.json)")
    vqa.set_defaults(func=_score_vqa)

    gr = sub.add_parser("grounding", help="Acc@0.5 IoU for referring expressions")
    gr.add_argument("--predictions", required=True,
                    help='[{"sent_id": ..., "answer": "[x1, y1, x2, y2]"}] (0-999 grid)')
    gr.add_argument("--annotations", required=True,
                    help="RefCOCO folder (refs(*).p + instances.json) or items json")
    gr.add_argument("--threshold", type=float, default=0.5)
    gr.add_argument("--out", default=None, help="result JSON (default: PREDICTIONS.scores.json)")
    gr.set_defaults(func=_score_grounding)
    return score


def main(argv: Optional[list[str]] = None) -> int:
    """Stand-alone entry (``python -m conceptvlm.eval.cli score ...``)."""
    parser = argparse.ArgumentParser(prog="conceptvlm")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
