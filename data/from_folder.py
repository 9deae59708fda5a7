"""An image folder plus a jsonl/csv of captions or QA -> webdataset shards.

Each annotation row names an image (``image``: path relative to the folder) and either a
caption (``caption`` or ``text``) or a question with ``answers`` (a list; in csv, answers
separated by ``|``) or one ``answer``. Image bytes are copied unchanged (no re-encoding);
other fields of the row are kept in ``KEY.json``. The output follows ``docs/data.md``:
captions as ``KEY.jpg + KEY.txt + KEY.json``, QA as ``KEY.jpg + KEY.json``.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any, Iterator, Union

import webdataset as wds

from .samples import IMAGE_EXTS

PathLike = Union[str, Path]


def read_annotations(path: PathLike) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, row) from a ``.jsonl`` or ``.csv`` file."""
    path = Path(path)
    if path.suffix.lower() == ".csv":
        with open(path, newline="", encoding="utf-8") as f:
            for line, row in enumerate(csv.DictReader(f), start=2):  # line 1 is the header
                if row.get("answers"):
                    row["answers"] = row["answers"].split("|")
                yield line, {k: v for k, v in row.items() if v not in (None, "")}
    elif path.suffix.lower() in (".jsonl", ".json"):
        with open(path, encoding="utf-8") as f:
            for line, text in enumerate(f, start=1):
                if text.strip():
                    try:
                        yield line, json.loads(text)
                    except json.JSONDecodeError as exc:
                        raise ValueError(f"{path}:{line}: not valid json: {exc}") from exc
    else:
        raise ValueError(f"{path}: annotations must be .jsonl or .csv")


def row_kind(row: dict[str, Any]) -> str:
    if "question" in row:
        return "vqa"
    if "caption" in row or "text" in row:
        return "caption"
    raise ValueError(f"row has neither a caption/text nor a question: fields {sorted(row)}")


def folder_sample(image_dir: Path, row: dict[str, Any], key: str, kind: str) -> dict[str, Any]:
    """One annotation row -> a webdataset sample dict."""
    if "image" not in row:
        raise ValueError(f"row has no 'image' field: fields {sorted(row)}")
    image = image_dir / row["image"]
    ext = image.suffix.lower().lstrip(".")
    ext = "jpg" if ext == "jpeg" else ext
    if ext not in IMAGE_EXTS:
        raise ValueError(f"{image}: extension .{ext} is not one of {IMAGE_EXTS}")
    if not image.is_file():
        raise FileNotFoundError(f"image not found: {image}")
    meta = {k: v for k, v in row.items() if k != "image"} | {"source_image": row["image"]}
    sample: dict[str, Any] = {"__key__": key, ext: image.read_bytes()}
    if kind == "caption":
        meta["caption"] = meta.get("caption", meta.get("text"))
        sample["txt"] = meta["caption"]
    elif "answers" not in meta and "answer" not in meta:
        raise ValueError("QA row has a question but no 'answers' or 'answer'")
    sample["json"] = meta
    return sample


def write_folder_shards(image_dir: PathLike, annotations: PathLike, out_dir: PathLike,
                        shard_size: int = 1000, prefix: str = "shard") -> list[str]:
    """Write ``OUT/PREFIX-000000.tar``, ... and return their paths. All rows must be of one
    kind (captions or QA), since a reader reads a source as one kind; errors name the line."""
    image_dir, out = Path(image_dir), Path(out_dir)
    if not image_dir.is_dir():
        raise FileNotFoundError(f"image folder not found: {image_dir}")
    out.mkdir(parents=True, exist_ok=True)
    written: list[str] = []
    kind = None
    with wds.ShardWriter(str(out / f"{prefix}-%06d.tar"), maxcount=shard_size, verbose=0, post=written.append) as sink:
        for n, (line, row) in enumerate(read_annotations(annotations)):
            try:
                this = row_kind(row)
                if kind is not None and this != kind:
                    raise ValueError(f"a {this} row among {kind} rows; write them to separate shards")
                kind = this
                sink.write(folder_sample(image_dir, row, f"{n:09d}", kind))
            except (ValueError, FileNotFoundError) as exc:
                raise type(exc)(f"{annotations}:{line}: {exc}") from exc
    if kind is None:
        raise ValueError(f"{annotations}: no annotation rows")
    return written
