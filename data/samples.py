"""Raw shard samples -> documents (template parts + PIL images), one function per kind.

Every problem raises ``BadSample(reason, ...)``; the pipeline counts and skips it. The
layouts (file names, json fields) are documented with examples in ``docs/data.md``.
"""
from __future__ import annotations

import functools
import io
import json
from collections import Counter
from typing import Any, Callable, Optional

from PIL import Image

from .boxes import xywh_to_xyxy
from .counters import BAD_FIELD, BAD_IMAGE, BAD_JSON, EMPTY_IMAGE, MISSING_FIELD, BadSample
from .templates import IMAGE, Part, caption_parts, grounding_parts, interleaved_parts, text_parts, vqa_parts

KINDS = ("caption", "vqa", "grounding", "interleaved", "text")
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
Document = tuple[list[Part], list[Image.Image]]


def decode_image(data: bytes, name: str) -> Image.Image:
    """Bytes -> fully decoded RGB image (``load()`` so truncated files fail here, not later)."""
    try:
        img = Image.open(io.BytesIO(data))
        img.load()
    except Exception as exc:
        raise BadSample(BAD_IMAGE, f"{name} is not a decodable image: {exc!r}") from exc
    if img.width == 0 or img.height == 0:
        raise BadSample(EMPTY_IMAGE, f"{name} has size {img.width}x{img.height}")
    if img.mode != "RGB":
        # P and LA/RGBA: through RGBA so a transparent palette composites sensibly on black.
        img = img.convert("RGBA").convert("RGB") if img.mode in ("P", "LA", "PA") else img.convert("RGB")
    return img


def _image(raw: dict[str, Any]) -> Image.Image:
    for ext in IMAGE_EXTS:
        if ext in raw:
            return decode_image(raw[ext], ext)
    raise BadSample(MISSING_FIELD, f"no image member ({'/'.join(IMAGE_EXTS)}); members: {_members(raw)}")


def _members(raw: dict[str, Any]) -> list[str]:
    return sorted(k for k in raw if not k.startswith("__"))


def _json(raw: dict[str, Any], required: bool = True) -> Optional[dict[str, Any]]:
    if "json" not in raw:
        if required:
            raise BadSample(MISSING_FIELD, f"no json member; members: {_members(raw)}")
        return None
    try:
        meta = json.loads(raw["json"])
    except Exception as exc:
        raise BadSample(BAD_JSON, f"json does not parse: {exc!r}") from exc
    if not isinstance(meta, dict):
        raise BadSample(BAD_JSON, f"json is a {type(meta).__name__}, expected an object")
    return meta


def _field(meta: dict[str, Any], name: str, kind: type | tuple[type, ...] = str) -> Any:
    if name not in meta or meta[name] is None:
        raise BadSample(MISSING_FIELD, f"json has no field {name!r}; fields: {sorted(meta)}")
    if not isinstance(meta[name], kind):
        raise BadSample(BAD_FIELD, f"json field {name!r} is {type(meta[name]).__name__}")
    return meta[name]


def _text(raw: dict[str, Any], ext: str = "txt") -> Optional[str]:
    if ext not in raw:
        return None
    try:
        return raw[ext].decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BadSample(BAD_FIELD, f"{ext} is not UTF-8: {exc!r}") from exc


def caption_document(raw: dict[str, Any], prompt: Optional[str] = None) -> Document:
    """img2dataset pair: ``KEY.jpg`` + ``KEY.txt`` and/or ``KEY.json`` with ``caption``."""
    caption = _text(raw)
    if caption is None:
        meta = _json(raw, required=False)
        if meta is None:
            raise BadSample(MISSING_FIELD, f"no txt or json caption; members: {_members(raw)}")
        caption = _field(meta, "caption")
    img = _image(raw)
    return caption_parts(caption.strip(), prompt), [img]


def majority_answer(answers: list[Any]) -> str:
    """VQAv2 ``answers`` (strings or ``{"answer": ...}``) -> most frequent; ties: first seen."""
    texts = [a["answer"] if isinstance(a, dict) else a for a in answers]
    if not texts or not all(isinstance(t, str) for t in texts):
        raise BadSample(BAD_FIELD, f"answers must be a non-empty list of strings, got {answers!r}"[:200])
    counts = Counter(texts)
    return max(texts, key=lambda t: (counts[t], -texts.index(t)))


def vqa_document(raw: dict[str, Any]) -> Document:
    """``KEY.jpg`` + ``KEY.json`` with ``question`` and ``answers`` (or one ``answer``)."""
    meta = _json(raw)
    question = _field(meta, "question")
    if "answers" in meta:
        answer = majority_answer(_field(meta, "answers", list))
    else:
        answer = _field(meta, "answer")
    img = _image(raw)
    return vqa_parts(question, answer), [img]


def grounding_document(raw: dict[str, Any]) -> Document:
    """``KEY.jpg`` + ``KEY.json`` with ``expression``, ``box`` (pixels of the stored image)
    and ``box_format``: ``"xyxy"`` (corners) or ``"xywh"`` (COCO: corner + size)."""
    meta = _json(raw)
    expression = _field(meta, "expression")
    box = _field(meta, "box", list)
    fmt = _field(meta, "box_format")
    if len(box) != 4 or not all(isinstance(v, (int, float)) for v in box):
        raise BadSample(BAD_FIELD, f"box must be 4 numbers, got {box!r}")
    if fmt not in ("xyxy", "xywh"):
        raise BadSample(BAD_FIELD, f"box_format must be 'xyxy' or 'xywh', got {fmt!r}")
    xyxy = xywh_to_xyxy(box) if fmt == "xywh" else tuple(float(v) for v in box)
    if xyxy[2] < xyxy[0] or xyxy[3] < xyxy[1]:
        raise BadSample(BAD_FIELD, f"box {box} ({fmt}) has negative extent")
    img = _image(raw)
    return grounding_parts(expression, xyxy, img.width, img.height), [img]


def interleaved_document(raw: dict[str, Any]) -> Document:
    """OBELICS-like: ``KEY.json`` with parallel lists ``texts`` and ``images``; at each
    position exactly one is non-null; an image entry names its member (``"0.jpg"``, read
    from ``KEY.0.jpg``)."""
    meta = _json(raw)
    texts = _field(meta, "texts", list)
    images = _field(meta, "images", list)
    if len(texts) != len(images):
        raise BadSample(BAD_FIELD, f"texts ({len(texts)}) and images ({len(images)}) differ in length")
    items: list[Any] = []
    pil: list[Image.Image] = []
    for i, (t, m) in enumerate(zip(texts, images)):
        if (t is None) == (m is None):
            raise BadSample(BAD_FIELD, f"position {i}: exactly one of texts/images must be non-null")
        if t is not None:
            if not isinstance(t, str):
                raise BadSample(BAD_FIELD, f"texts[{i}] is {type(t).__name__}")
            items.append(t)
            continue
        member = str(m).lower()
        if member not in raw:
            raise BadSample(MISSING_FIELD, f"images[{i}] names member {m!r}, not in sample; members: {_members(raw)}")
        pil.append(decode_image(raw[member], member))
        items.append(IMAGE)
    if not items:
        raise BadSample(BAD_FIELD, "empty document")
    return interleaved_parts(items), pil


def text_document(raw: dict[str, Any]) -> Document:
    """``KEY.txt`` (or ``KEY.json`` with ``text``)."""
    text = _text(raw)
    if text is None:
        meta = _json(raw, required=False)
        if meta is None:
            raise BadSample(MISSING_FIELD, f"no txt member; members: {_members(raw)}")
        text = _field(meta, "text")
    return text_parts(text), []


def document_parser(kind: str, caption_prompt: Optional[str] = None) -> Callable[[dict[str, Any]], Document]:
    if kind == "caption":
        return functools.partial(caption_document, prompt=caption_prompt)  # picklable for workers
    parsers = {"vqa": vqa_document, "grounding": grounding_document,
               "interleaved": interleaved_document, "text": text_document}
    if kind not in parsers:
        raise ValueError(f"unknown sample kind {kind!r}; expected one of {KINDS}")
    return parsers[kind]
