"""Raw shard samples -> documents (template parts + PIL images), one function per kind.

Every problem raises ``BadSample(reason, ...)``; the pipeline counts and skips it. The
layouts (file names, json fields) are documented with examples in ``docs/data.md``.
"""
from __future__ import annotations

import functools
import json
import math
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable, Optional

from PIL import Image

from .boxes import xywh_to_xyxy
from .counters import BAD_FIELD, BAD_JSON, MISSING_FIELD, BadSample
from .decode import DEFAULT_MAX_PIXELS, ImageError, decode_image_sized
from .templates import IMAGE, Part, caption_parts, grounding_parts, interleaved_parts, text_parts, vqa_parts

KINDS = ("caption", "vqa", "grounding", "interleaved", "text")
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
Document = tuple[list[Part], list[Image.Image]]

# Limits on what one sample may hold. Generous for real data; they exist so that one
# crafted sample cannot take a reader's memory (a 2 GB caption, 10,000 images).
MAX_FIELD_CHARS = 65_536  # caption, question, answer, expression, one interleaved text
MAX_DOCUMENT_CHARS = 16_000_000  # a whole text or interleaved document
MAX_IMAGES_PER_DOCUMENT = 256
MAX_ANSWERS = 100
MAX_COORDINATE = 1e7  # pixels


@dataclass(frozen=True)
class ImageOptions:
    """How shard images are decoded: the pixel limit (checked from the header) and the side
    worth decoding (JPEG draft; the tower's ``ImageProcessor.draft_side``)."""

    max_pixels: int = DEFAULT_MAX_PIXELS
    draft_side: Optional[int] = None

    @classmethod
    def for_transform(cls, transform: Any, max_pixels: int = DEFAULT_MAX_PIXELS) -> "ImageOptions":
        """Options matching an image transform: an ``ImageProcessor`` brings its own limit and
        draft side, so shard images are decoded exactly as it decodes files."""
        limit = min(max_pixels, getattr(transform, "max_pixels", max_pixels))
        return cls(limit, getattr(transform, "draft_side", None))


def _decode(raw: dict[str, Any], member: str, opts: ImageOptions) -> tuple[Image.Image, tuple[int, int]]:
    data = raw[member]
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise BadSample(BAD_FIELD, f"member {member} is a {type(data).__name__}, not bytes")
    try:
        return decode_image_sized(data, member, opts.max_pixels, opts.draft_side)
    except ImageError as err:
        raise BadSample(err.kind, str(err)) from err


def image_member(raw: dict[str, Any], opts: ImageOptions) -> tuple[Image.Image, tuple[int, int]]:
    """The sample's image (first of ``IMAGE_EXTS``) decoded, and its full displayed size."""
    for ext in IMAGE_EXTS:
        if ext in raw:
            return _decode(raw, ext, opts)
    raise BadSample(MISSING_FIELD, f"no image member ({'/'.join(IMAGE_EXTS)}); members: {_members(raw)}")


def _members(raw: dict[str, Any]) -> list[str]:
    return sorted(str(k) for k in raw if not str(k).startswith("__"))[:20]


def _no_constant(name: str) -> float:
    raise ValueError(f"{name} is not JSON")


def sample_json(raw: dict[str, Any], required: bool = True) -> Optional[dict[str, Any]]:
    """``KEY.json`` as an object; ``BadSample(bad_json)`` when it does not parse."""
    if "json" not in raw:
        if required:
            raise BadSample(MISSING_FIELD, f"no json member; members: {_members(raw)}")
        return None
    try:
        # NaN / Infinity are not JSON (Python accepts them by default); deep nesting
        # raises RecursionError, non-UTF bytes UnicodeDecodeError: all "does not parse".
        meta = json.loads(raw["json"], parse_constant=_no_constant)
    except Exception as exc:
        raise BadSample(BAD_JSON, f"json does not parse: {exc!r}"[:300]) from exc
    if not isinstance(meta, dict):
        raise BadSample(BAD_JSON, f"json is a {type(meta).__name__}, expected an object")
    return meta


def _check_text(text: str, what: str, max_chars: int, allow_empty: bool = False) -> str:
    if len(text) > max_chars:
        raise BadSample(BAD_FIELD, f"{what} has {len(text)} characters (limit {max_chars})")
    if not allow_empty and not text.strip():
        raise BadSample(BAD_FIELD, f"{what} is empty")
    try:
        text.encode("utf-8")  # json "\ud800" gives a lone surrogate the tokenizer cannot take
    except UnicodeEncodeError as exc:
        raise BadSample(BAD_FIELD, f"{what} is not valid Unicode: {exc.reason}") from exc
    return text


def json_field(meta: dict[str, Any], name: str, kind: type | tuple[type, ...] = str,
           max_chars: int = MAX_FIELD_CHARS) -> Any:
    """A required json field of type ``kind`` (strings: non-empty, valid, within ``max_chars``)."""
    if name not in meta or meta[name] is None:
        raise BadSample(MISSING_FIELD, f"json has no field {name!r}; fields: {sorted(meta)[:20]}")
    value = meta[name]
    if not isinstance(value, kind):
        raise BadSample(BAD_FIELD, f"json field {name!r} is {type(value).__name__}")
    if isinstance(value, str):
        _check_text(value, f"json field {name!r}", max_chars)
    return value


def _text(raw: dict[str, Any], ext: str = "txt", max_chars: int = MAX_FIELD_CHARS) -> Optional[str]:
    if ext not in raw:
        return None
    data = raw[ext]
    if not isinstance(data, (bytes, bytearray)):
        raise BadSample(BAD_FIELD, f"member {ext} is a {type(data).__name__}, not bytes")
    if len(data) > 4 * max_chars:  # before decoding: UTF-8 uses at most 4 bytes a character
        raise BadSample(BAD_FIELD, f"{ext} has {len(data)} bytes (limit {max_chars} characters)")
    try:
        text = bytes(data).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BadSample(BAD_FIELD, f"{ext} is not UTF-8: {exc.reason} at byte {exc.start}") from exc
    return _check_text(text, ext, max_chars)


def _coordinate(v: Any) -> float:
    """A box number: int or float (bool is not a number here), finite, of a sane size."""
    if type(v) not in (int, float):
        raise BadSample(BAD_FIELD, f"box value {v!r:.40} is a {type(v).__name__}, not a number")
    if not (math.isfinite(v) and abs(v) <= MAX_COORDINATE):
        raise BadSample(BAD_FIELD, f"box value {v!r:.40} is not a finite pixel coordinate")
    return float(v)


def caption_document(raw: dict[str, Any], prompt: Optional[str] = None,
                     images: ImageOptions = ImageOptions()) -> Document:
    """img2dataset pair: ``KEY.jpg`` + ``KEY.txt`` and/or ``KEY.json`` with ``caption``.
    A json sidecar that does not parse skips the sample even when ``KEY.txt`` is there."""
    meta = sample_json(raw, required=False)
    caption = _text(raw)
    if caption is None:
        if meta is None:
            raise BadSample(MISSING_FIELD, f"no txt or json caption; members: {_members(raw)}")
        caption = json_field(meta, "caption")
    img, _ = image_member(raw, images)
    return caption_parts(caption.strip(), prompt), [img]


def answer_texts(answers: list[Any]) -> list[str]:
    """VQAv2 ``answers`` (strings or ``{"answer": ...}`` objects) -> the strings, validated."""
    if not answers or len(answers) > MAX_ANSWERS:
        raise BadSample(BAD_FIELD, f"answers must hold 1 to {MAX_ANSWERS} entries, got {len(answers)}")
    texts = [a.get("answer") if isinstance(a, dict) else a for a in answers]
    if not all(isinstance(t, str) and len(t) <= MAX_FIELD_CHARS for t in texts):
        raise BadSample(BAD_FIELD, f"answers must be strings or {{'answer': string}}, got {answers!r:.200}")
    for t in texts:
        _check_text(t, "an answer", MAX_FIELD_CHARS, allow_empty=True)
    return texts


def vqa_fields(meta: dict[str, Any]) -> tuple[str, list[str]]:
    """``question`` and the human answers (``answers``, or one ``answer``), validated."""
    question = json_field(meta, "question")
    if meta.get("answers") is not None:
        return question, answer_texts(json_field(meta, "answers", list))
    return question, [json_field(meta, "answer")]


def majority_answer(answers: list[Any]) -> str:
    """VQAv2 ``answers`` (strings or ``{"answer": ...}``) -> most frequent; ties: first seen."""
    texts = answer_texts(answers)
    counts = Counter(texts)
    first = {t: -i for i, t in reversed(list(enumerate(texts)))}
    return _check_text(max(texts, key=lambda t: (counts[t], first[t])), "majority answer", MAX_FIELD_CHARS)


def vqa_document(raw: dict[str, Any], images: ImageOptions = ImageOptions(), question_first: bool = False) -> Document:
    """``KEY.jpg`` + ``KEY.json`` with ``question`` and ``answers`` (or one ``answer``)."""
    question, answers = vqa_fields(sample_json(raw))
    img, _ = image_member(raw, images)
    return vqa_parts(question, majority_answer(answers), question_first), [img]


def grounding_document(raw: dict[str, Any], images: ImageOptions = ImageOptions(),
                       question_first: bool = False) -> Document:
    """``KEY.jpg`` + ``KEY.json`` with ``expression``, ``box`` (pixels of the stored image
    as displayed, i.e. after EXIF orientation) and ``box_format``: ``"xyxy"`` (corners) or
    ``"xywh"`` (COCO: corner + size). The box must overlap the image."""
    meta = sample_json(raw)
    expression = json_field(meta, "expression")
    xyxy = parse_box_field(meta)
    img, (width, height) = image_member(raw, images)
    if xyxy[0] > width or xyxy[1] > height or xyxy[2] < 0 or xyxy[3] < 0:
        raise BadSample(BAD_FIELD, f"box {list(xyxy)} lies outside the {width}x{height} image")
    return grounding_parts(expression, xyxy, width, height, question_first), [img]


def parse_box_field(meta: dict[str, Any]) -> tuple[float, float, float, float]:
    """``box`` + ``box_format`` of a grounding json -> pixel xyxy, validated (``BadSample``)."""
    box = json_field(meta, "box", list)
    fmt = json_field(meta, "box_format")
    if len(box) != 4:
        raise BadSample(BAD_FIELD, f"box must be 4 numbers, got {len(box)} values")
    numbers = [_coordinate(v) for v in box]
    if fmt not in ("xyxy", "xywh"):
        raise BadSample(BAD_FIELD, f"box_format must be 'xyxy' or 'xywh', got {fmt!r:.40}")
    xyxy = xywh_to_xyxy(numbers) if fmt == "xywh" else tuple(numbers)
    if xyxy[2] < xyxy[0] or xyxy[3] < xyxy[1]:
        raise BadSample(BAD_FIELD, f"box {numbers} ({fmt}) has negative extent")
    return xyxy  # type: ignore[return-value]


def interleaved_document(raw: dict[str, Any], images: ImageOptions = ImageOptions()) -> Document:
    """OBELICS-like: ``KEY.json`` with parallel lists ``texts`` and ``images``; at each
    position exactly one is non-null; an image entry names its member (``"0.jpg"``, read
    from ``KEY.0.jpg``)."""
    meta = sample_json(raw)
    texts = json_field(meta, "texts", list)
    names = json_field(meta, "images", list)
    if len(texts) != len(names):
        raise BadSample(BAD_FIELD, f"texts ({len(texts)}) and images ({len(names)}) differ in length")
    if sum(m is not None for m in names) > MAX_IMAGES_PER_DOCUMENT:
        raise BadSample(BAD_FIELD, f"more than {MAX_IMAGES_PER_DOCUMENT} images in one document")
    items: list[Any] = []
    pil: list[Image.Image] = []
    chars = 0
    for i, (t, m) in enumerate(zip(texts, names)):
        if (t is None) == (m is None):
            raise BadSample(BAD_FIELD, f"position {i}: exactly one of texts/images must be non-null")
        if t is not None:
            if not isinstance(t, str):
                raise BadSample(BAD_FIELD, f"texts[{i}] is {type(t).__name__}")
            chars += len(_check_text(t, f"texts[{i}]", MAX_FIELD_CHARS, allow_empty=True))
            if chars > MAX_DOCUMENT_CHARS:
                raise BadSample(BAD_FIELD, f"document has over {MAX_DOCUMENT_CHARS} characters")
            items.append(t)
            continue
        if not isinstance(m, str) or len(m) > 100 or m.rsplit(".", 1)[-1].lower() not in IMAGE_EXTS:
            raise BadSample(BAD_FIELD, f"images[{i}] must name an image member like '0.jpg', got {m!r:.60}")
        member = m.lower()
        if member not in raw:
            raise BadSample(MISSING_FIELD, f"images[{i}] names member {m!r}, not in sample; members: {_members(raw)}")
        pil.append(_decode(raw, member, images)[0])
        items.append(IMAGE)
    if not items:
        raise BadSample(BAD_FIELD, "empty document")
    return interleaved_parts(items), pil


def text_document(raw: dict[str, Any]) -> Document:
    """``KEY.txt`` (or ``KEY.json`` with ``text``); a json member must parse either way."""
    return text_parts(document_text(raw)), []


def document_text(raw: dict[str, Any]) -> str:
    """The text of a ``text`` sample, validated (``BadSample`` otherwise)."""
    meta = sample_json(raw, required=False)
    text = _text(raw, max_chars=MAX_DOCUMENT_CHARS)
    if text is None:
        if meta is None:
            raise BadSample(MISSING_FIELD, f"no txt member; members: {_members(raw)}")
        text = json_field(meta, "text", max_chars=MAX_DOCUMENT_CHARS)
    return text


def document_parser(kind: str, caption_prompt: Optional[str] = None, images: ImageOptions = ImageOptions(),
                    question_first: bool = False) -> Callable[[dict[str, Any]], Document]:
    """The parser of one sample kind: ``raw sample -> (parts, images)`` or ``BadSample``;
    ``question_first``: VQA and grounding prompts put the question before the image
    (``data.templates``). (``functools.partial`` of module functions: picklable for
    DataLoader workers.)"""
    if kind == "caption":
        return functools.partial(caption_document, prompt=caption_prompt, images=images)
    if kind == "text":
        return text_document
    if kind in ("vqa", "grounding"):
        return functools.partial(vqa_document if kind == "vqa" else grounding_document, images=images,
                                 question_first=question_first)
    if kind != "interleaved":
        raise ValueError(f"unknown sample kind {kind!r}; expected one of {KINDS}")
    return functools.partial(interleaved_document, images=images)
