"""Command-line glue for the data commands: parse, call the library, print.

``register(subparsers)`` adds ``shards synthetic``, ``shards from-folder``, ``shards check`` and
``tokenizer train``; every parser sets ``func(args) -> int`` (the exit code).
"""
from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path

from .check import check_shards
from .from_folder import ANNOTATION_FIELDS, write_folder_shards
from .samples import KINDS
from .synthetic import write_synthetic_shards
from .tokenizer import train_bpe_tokenizer


def _synthetic(args: argparse.Namespace) -> int:
    paths = write_synthetic_shards(args.kind, args.out, num=args.num, shard_size=args.shard_size,
                                   seed=args.seed, image_size=args.image_size, start_index=args.start_index)
    print(f"wrote {args.num} {args.kind} samples to {len(paths)} shard(s): {paths[0]} ... {paths[-1]}")
    return 0


def _from_folder(args: argparse.Namespace) -> int:
    skipped: Counter = Counter()
    paths = write_folder_shards(args.images, args.annotations, args.out, shard_size=args.shard_size,
                                prefix=args.prefix, strict=args.strict, follow_symlinks=args.follow_symlinks,
                                counts=skipped)
    print(f"wrote {len(paths)} shard(s): {paths[0]} ... {paths[-1]}")
    if skipped:
        detail = ", ".join(f"{k} {v}" for k, v in sorted(skipped.items()))
        print(f"skipped {sum(skipped.values())} row(s): {detail} (--strict makes these errors)")
    return 0


def _check(args: argparse.Namespace) -> int:
    shards = samples = skipped = 0
    for result in check_shards(args.spec, args.kind):
        print(result.line(), flush=True)
        shards, samples = shards + 1, samples + result.samples
        skipped += sum(result.skipped.values())
    print(f"{shards} shard(s): {samples:,} usable {args.kind} sample(s), {skipped:,} that training would skip")
    return 1 if skipped else 0


def _train_tokenizer(args: argparse.Namespace) -> int:
    missing = [f for f in args.files if not Path(f).is_file()]
    if missing:
        raise FileNotFoundError(2, "text file not found", missing[0])
    tok = train_bpe_tokenizer(args.files, args.vocab_size, args.out, min_frequency=args.min_frequency)
    print(f"trained byte-level BPE with {tok.vocab_size} tokens -> {args.out}/tokenizer.json")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    shards = subparsers.add_parser("shards", help="write webdataset shards").add_subparsers(dest="shards_cmd", required=True)

    p = shards.add_parser("synthetic", help="generated shape scenes (demo and test data)")
    p.add_argument("--kind", required=True, choices=KINDS)
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--num", type=int, default=1000, help="number of samples")
    p.add_argument("--shard-size", type=int, default=1000, help="samples per shard")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--image-size", type=int, default=64, help="image side in pixels")
    p.add_argument("--start-index", type=int, default=0, help="first sample index (held-out splits)")
    p.set_defaults(func=_synthetic)

    p = shards.add_parser(
        "from-folder", help="image folder + captions/QA jsonl or csv, or same-name .txt captions",
        description="Write webdataset shards from an image folder. Annotation fields: " + ANNOTATION_FIELDS
        + "; other fields are kept in KEY.json. Without --annotations, each image with a same-name .txt "
        "next to it is a caption sample. Rows naming files outside --images, symlinks (unless "
        "--follow-symlinks) or files that are not images are skipped and counted (errors with --strict).")
    p.add_argument("--images", required=True, help="image folder")
    p.add_argument("--annotations", help=".jsonl or .csv; fields: " + ANNOTATION_FIELDS
                   + " (default: same-name .txt captions next to each image)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--shard-size", type=int, default=1000, help="samples per shard")
    p.add_argument("--prefix", default="shard", help="shard file name prefix (a plain name, no '/')")
    p.add_argument("--strict", action="store_true", help="fail on the first unusable row instead of skipping it")
    p.add_argument("--follow-symlinks", action="store_true",
                   help="follow symlinks in --images and in row paths (wherever they point)")
    p.set_defaults(func=_from_folder)

    p = shards.add_parser("check", help="read and parse every sample as training would; one line per shard "
                                        "(exit 1 when any would be skipped)")
    p.add_argument("spec", help="shard spec: dir/name-{000000..000009}.tar, a.tar::b.tar, pipe:CMD")
    p.add_argument("--kind", required=True, choices=KINDS, help="the sample kind the shards hold (docs/data.md)")
    p.set_defaults(func=_check)

    tok = subparsers.add_parser("tokenizer", help="tokenizer tools").add_subparsers(dest="tokenizer_cmd", required=True)
    p = tok.add_parser("train", help="fit a byte-level BPE on text files")
    p.add_argument("files", nargs="+", help="UTF-8 text files")
    p.add_argument("--vocab-size", type=int, required=True)
    p.add_argument("--out", required=True, help="folder for tokenizer.json")
    p.add_argument("--min-frequency", type=int, default=2)
    p.set_defaults(func=_train_tokenizer)
