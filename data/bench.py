"""``conceptvlm bench data``: samples/s of decode + transform + tokenise + pack.

Writes synthetic caption shards at the requested size (224 px by default, JPEG) to a
temporary folder and streams them through ``PackedLoader`` with 0, 1, 2 workers.
"Steady" excludes worker start-up and the first batch; "total" includes them.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any, Optional, Sequence

from .pipeline import DataConfig, Source, build_loader
from .synthetic import write_synthetic_shards
from .tokenizer import load_tokenizer


def bench_data(num_samples: int = 1024, image_size: int = 224, workers: Sequence[int] = (0, 1, 2),
               seq_len: int = 1024, batch_size: int = 8, image_tokens_per_image: int = 64,
               kind: str = "caption", out_json: Optional[str] = None) -> dict[str, Any]:
    """Measure, print a table, return ``{"rows": [...], "setup": {...}}`` (and write it as JSON)."""
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        # 8 shards: enough for 2 workers to split, few enough to be realistic-ish in size.
        shards = write_synthetic_shards(kind, tmp, num=num_samples, shard_size=max(1, num_samples // 8),
                                        image_size=image_size)
        tok = load_tokenizer(None)
        for w in workers:
            cfg = DataConfig(seq_len=seq_len, batch_size=batch_size, image_tokens_per_image=image_tokens_per_image,
                             image_size=image_size, epochs=1, num_workers=w, shuffle_buffer=100)
            loader = build_loader([Source(shards, kind)], tok, cfg)
            t0 = time.perf_counter()
            first_t, first_docs, batches = None, 0, 0
            for _ in loader:
                batches += 1
                if first_t is None:
                    first_t, first_docs = time.perf_counter(), loader.counters["packing/docs"]
            t1 = time.perf_counter()
            docs = loader.counters["packing/docs"]
            steady = (docs - first_docs) / (t1 - first_t) if first_t and t1 > first_t else float("nan")
            rows.append({"workers": w, "samples": docs, "batches": batches, "seconds": round(t1 - t0, 3),
                         "samples_per_s_total": round(docs / (t1 - t0), 1), "samples_per_s_steady": round(steady, 1)})
    result = {"setup": {"num_samples": num_samples, "image_size": image_size, "seq_len": seq_len,
                        "batch_size": batch_size, "image_tokens_per_image": image_tokens_per_image,
                        "kind": kind, "tokenizer": "bytes"}, "rows": rows}
    print(f"data pipeline, {kind} @ {image_size}px, seq_len {seq_len}, batch {batch_size}")
    print(f"{'workers':>7} {'samples':>8} {'seconds':>8} {'samples/s':>10} {'steady/s':>9}")
    for r in rows:
        print(f"{r['workers']:>7} {r['samples']:>8} {r['seconds']:>8.2f} {r['samples_per_s_total']:>10.1f} "
              f"{r['samples_per_s_steady']:>9.1f}")
    if out_json:
        Path(out_json).write_text(json.dumps(result, indent=1))
    return result


def _run(a: argparse.Namespace) -> int:
    bench_data(a.num, a.image_size, a.workers, a.seq_len, a.batch_size, a.image_tokens, a.kind, a.out)
    return 0


def register_bench(subparsers: argparse._SubParsersAction) -> None:
    """Add ``data`` to the ``bench`` command's subparsers."""
    p = subparsers.add_parser("data", help="samples/s of the data pipeline with 0, 1, 2 workers")
    p.add_argument("--num", type=int, default=1024, help="synthetic samples to stream")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--image-tokens", type=int, default=64, help="image tokens per image")
    p.add_argument("--kind", default="caption")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    p.set_defaults(func=_run)
