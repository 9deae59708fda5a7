"""An image folder (plus a jsonl/csv of captions or QA, or same-name ``.txt`` captions) -> shards.

Annotation rows (``.jsonl`` objects or ``.csv`` columns):

- ``image``: path of the image, relative to the image folder (required);
- captions: ``caption`` (or ``text``);
- QA: ``question`` with ``answers`` (a list; in csv separated by ``|``) or one ``answer``;
- any other field is kept in ``KEY.json``.

Without an annotation file, every image ``DIR/a/b.jpg`` with a ``DIR/a/b.txt`` next to it
is a caption sample. Image bytes are copied unchanged (no re-encoding). The output follows
``docs/data.md``: captions as ``KEY.jpg + KEY.txt + KEY.json``, QA as ``KEY.jpg + KEY.json``.

The folder is untrusted input: a row may only name a file inside the image folder (no
``..``, no absolute path, no symlink unless ``follow_symlinks``), and every image must
decode (a text file named ``.jpg`` is not an image). Such rows are skipped and counted
(``FolderCounts``), or raise with ``strict=True``.
"""
from __future__ import annotations

import csv
import json
from collections import Counter
from pathlib import Path
from typing import Any, Iterator, Optional, Union

import webdataset as wds

from .decode import ImageError, decode_image
from .samples import IMAGE_EXTS

PathLike = Union[str, Path]
ANNOTATION_FIELDS = "image (path under --images), caption or text, or question with answers (list) or answer"


class RowError(ValueError):
    """A row that cannot become a sample; ``reason`` is its counter key."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


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
                        row = json.loads(text)
                    except json.JSONDecodeError as exc:
                        raise ValueError(f"{path}:{line}: not valid json: {exc}") from exc
                    if not isinstance(row, dict):
                        raise ValueError(f"{path}:{line}: a row must be a json object")
                    yield line, row
    else:
        raise ValueError(f"{path}: annotations must be .jsonl or .csv")


def caption_rows(image_dir: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """``(where, row)`` for every image under ``image_dir`` with a same-name ``.txt`` caption;
    images without one give a row without a caption (counted as ``no_caption``)."""
    for path in sorted(p for p in image_dir.rglob("*") if p.suffix.lower().lstrip(".") in IMAGE_EXTS + ("jpeg",)):
        rel = path.relative_to(image_dir).as_posix()
        row: dict[str, Any] = {"image": rel}
        caption = path.with_suffix(".txt")
        if caption.is_file() and not caption.is_symlink():
            row["caption"] = caption.read_text(encoding="utf-8", errors="replace").strip()
        yield rel, row


def row_kind(row: dict[str, Any]) -> str:
    if "question" in row:
        return "vqa"
    if "caption" in row or "text" in row:
        return "caption"
    raise RowError("no_caption", f"row has neither a caption/text nor a question: fields {sorted(row)}")


def resolve_image(image_dir: Path, name: Any, follow_symlinks: bool = False) -> Path:
    """The file a row names, only if it lies inside ``image_dir`` (``RowError`` otherwise).

    Refused: absolute paths, ``..`` components, and without ``follow_symlinks`` any symlink
    on the way (a link inside the folder can point anywhere). With ``follow_symlinks`` the
    caller vouches for the links, wherever they point.
    """
    if not isinstance(name, str) or not name:
        raise RowError("bad_row", f"'image' must be a relative path, got {name!r:.80}")
    rel = Path(name)
    if rel.is_absolute() or ".." in rel.parts or "\\" in name:
        raise RowError("outside_images", f"{name!r} is not a path inside the image folder")
    path = image_dir / rel
    if not follow_symlinks:
        walked = image_dir
        for part in rel.parts:
            walked = walked / part
            if walked.is_symlink():
                raise RowError("symlink", f"{name!r} goes through a symlink ({walked}); pass --follow-symlinks to allow")
    if not path.is_file():
        raise RowError("missing_image", f"image not found: {path}")
    return path


def folder_sample(image_dir: Path, row: dict[str, Any], key: str, kind: str,
                  follow_symlinks: bool = False) -> dict[str, Any]:
    """One annotation row -> a webdataset sample dict (the image verified by decoding it)."""
    if "image" not in row:
        raise RowError("bad_row", f"row has no 'image' field: fields {sorted(row)}")
    image = resolve_image(image_dir, row["image"], follow_symlinks)
    ext = image.suffix.lower().lstrip(".")
    ext = "jpg" if ext == "jpeg" else ext
    if ext not in IMAGE_EXTS:
        raise RowError("bad_row", f"{image}: extension .{ext} is not one of {IMAGE_EXTS}")
    data = image.read_bytes()
    try:
        decode_image(data, str(image))
    except ImageError as err:
        raise RowError(err.kind, str(err)) from err
    meta = {k: v for k, v in row.items() if k != "image"} | {"source_image": row["image"]}
    sample: dict[str, Any] = {"__key__": key, ext: data}
    if kind == "caption":
        meta["caption"] = meta.get("caption", meta.get("text"))
        if not isinstance(meta["caption"], str) or not meta["caption"].strip():
            raise RowError("no_caption", f"{image}: empty caption")
        sample["txt"] = meta["caption"]
    elif "answers" not in meta and "answer" not in meta:
        raise RowError("bad_row", "QA row has a question but no 'answers' or 'answer'")
    sample["json"] = meta
    return sample


def check_prefix(prefix: str) -> str:
    """A shard name prefix is a plain file name: it cannot name another folder."""
    if not prefix or prefix in (".", "..") or Path(prefix).name != prefix or "\\" in prefix:
        raise ValueError(f"--prefix {prefix!r} must be a plain file name (no '/', no '..')")
    return prefix


def write_folder_shards(image_dir: PathLike, annotations: Optional[PathLike], out_dir: PathLike,
                        shard_size: int = 1000, prefix: str = "shard", strict: bool = False,
                        follow_symlinks: bool = False, counts: Optional[Counter] = None) -> list[str]:
    """Write ``OUT/PREFIX-000000.tar``, ... and return their paths.

    ``annotations`` None: same-name ``.txt`` captions. All rows must be of one kind
    (captions or QA), since a reader reads a source as one kind; annotation errors name the
    line. Rows that name no usable image are skipped and counted in ``counts`` by reason
    (``outside_images``, ``symlink``, ``missing_image``, ``bad_image``, ...), or raise with
    ``strict``.
    """
    image_dir, out = Path(image_dir), Path(out_dir)
    if not image_dir.is_dir():
        raise FileNotFoundError(f"image folder not found: {image_dir}")
    check_prefix(prefix)
    counts = counts if counts is not None else Counter()
    rows = (((f"{annotations}:{line}", row) for line, row in read_annotations(annotations))
            if annotations is not None else caption_rows(image_dir))
    out.mkdir(parents=True, exist_ok=True)
    written: list[str] = []
    kind = None
    n = 0
    with wds.ShardWriter(str(out / f"{prefix}-%06d.tar"), maxcount=shard_size, verbose=0, post=written.append) as sink:
        for where, row in rows:
            try:
                this = row_kind(row)
                if kind is not None and this != kind:
                    raise ValueError(f"a {this} row among {kind} rows; write them to separate shards")
                sample = folder_sample(image_dir, row, f"{n:09d}", this, follow_symlinks)
            except RowError as exc:
                if strict or annotations is not None and exc.reason == "no_caption":
                    raise ValueError(f"{where}: {exc}") from exc
                counts[exc.reason] += 1
                continue
            except ValueError as exc:
                raise ValueError(f"{where}: {exc}") from exc
            kind = this
            sink.write(sample)
            n += 1
    if kind is None:
        skipped = f" ({dict(counts)} skipped)" if counts else ""
        raise ValueError(f"{annotations or image_dir}: no usable rows{skipped}")
    return written
