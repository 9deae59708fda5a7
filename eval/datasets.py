"""Evaluation samples from webdataset shards (the layouts of ``docs/data.md``).

The training readers turn samples into packed token rows; evaluation needs the raw
question, the human answers and the box, so it reads the same shards here with the
same tar reader and image decoder (bad samples are skipped and counted the same way).
"""
from __future__ import annotations

import json
from typing import Any, Callable, Iterator, Optional, Sequence, Union

import torch

from conceptvlm.data.boxes import xywh_to_xyxy
from conceptvlm.data.counters import BAD_IMAGE, BAD_JSON, MISSING_FIELD, DataCounters
from conceptvlm.data.samples import decode_image
from conceptvlm.data.shards import expand_shards
from conceptvlm.data.tario import iter_shard

from .grounding_runner import GroundingSample
from .vqa_runner import VQASample

ShardSpec = Union[str, Sequence[str]]
ImageTransform = Callable[[Any], torch.Tensor]
_IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


def _raw_samples(spec: ShardSpec, counters: DataCounters, limit: Optional[int]) -> Iterator[tuple[str, dict]]:
    n = 0
    for url in expand_shards(spec):
        for raw in iter_shard(url, counters):
            yield url, raw
            n += 1
            if limit is not None and n >= limit:
                return


def _image_and_meta(url: str, raw: dict, counters: DataCounters):
    key = raw.get("__key__", "?")
    try:
        ext = next(e for e in _IMAGE_EXTS if e in raw)
        img = decode_image(raw[ext], f"{url}:{key}.{ext}")
        meta = json.loads(raw["json"])
        return key, img, meta
    except StopIteration:
        counters.skip(MISSING_FIELD, url, key, "no image member")
    except KeyError:
        counters.skip(MISSING_FIELD, url, key, "no json member")
    except json.JSONDecodeError as exc:
        counters.skip(BAD_JSON, url, key, repr(exc))
    except Exception as exc:  # BadSample from decode_image
        counters.skip(getattr(exc, "reason", BAD_IMAGE), url, key, str(exc))
    return None


def _images_with_meta(spec: ShardSpec, limit: Optional[int], counters: DataCounters):
    """``(url, key, image, meta)`` of every sample that decodes; the rest are counted."""
    for url, raw in _raw_samples(spec, counters, limit):
        got = _image_and_meta(url, raw, counters)
        if got is not None:
            yield (url, *got)


def vqa_samples_from_shards(spec: ShardSpec, transform: ImageTransform, limit: Optional[int] = None,
                            counters: Optional[DataCounters] = None) -> list[VQASample]:
    """VQA shards (``KEY.jpg`` + json with ``question`` and ``answers``) -> samples."""
    counters = counters or DataCounters()
    out = []
    for url, key, img, meta in _images_with_meta(spec, limit, counters):
        answers = meta.get("answers") or ([meta["answer"]] if "answer" in meta else None)
        if not isinstance(meta.get("question"), str) or not answers:
            counters.skip(MISSING_FIELD, url, key, "question/answers")
            continue
        answers = [a["answer"] if isinstance(a, dict) else str(a) for a in answers]
        out.append(VQASample(question_id=meta.get("question_id", key), image=transform(img),
                             question=meta["question"], answers=answers,
                             answer_type=meta.get("answer_type"), question_type=meta.get("question_type")))
    return out


def grounding_samples_from_shards(spec: ShardSpec, transform: ImageTransform, limit: Optional[int] = None,
                                  counters: Optional[DataCounters] = None) -> list[GroundingSample]:
    """Grounding shards (json with ``expression``, ``box``, ``box_format``) -> samples (boxes xyxy)."""
    counters = counters or DataCounters()
    out = []
    for url, key, img, meta in _images_with_meta(spec, limit, counters):
        box, fmt = meta.get("box"), meta.get("box_format")
        if not isinstance(meta.get("expression"), str) or not isinstance(box, list) or fmt not in ("xyxy", "xywh"):
            counters.skip(MISSING_FIELD, url, key, "expression/box/box_format")
            continue
        xyxy = xywh_to_xyxy(box) if fmt == "xywh" else tuple(float(v) for v in box)
        out.append(GroundingSample(id=meta.get("id", key), image=transform(img), expression=meta["expression"],
                                   bbox=xyxy, width=img.width, height=img.height, split=meta.get("split")))
    return out


def texts_from_shards(spec: ShardSpec, limit: Optional[int] = None,
                      counters: Optional[DataCounters] = None) -> list[str]:
    """Text shards (``KEY.txt`` or json ``text``) -> documents."""
    counters = counters or DataCounters()
    texts = []
    for url, raw in _raw_samples(spec, counters, limit):
        if "txt" in raw:
            texts.append(raw["txt"].decode("utf-8"))
        elif "json" in raw:
            try:
                texts.append(json.loads(raw["json"])["text"])
            except (json.JSONDecodeError, KeyError) as exc:
                counters.skip(BAD_JSON, url, raw.get("__key__", "?"), repr(exc))
    return texts
