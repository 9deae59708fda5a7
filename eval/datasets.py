"""Evaluation samples from webdataset shards (the layouts of ``docs/data.md``).

The training readers turn samples into packed token rows; evaluation needs the raw
question, the human answers and the box, so it reads the same shards here with the
same tar reader and image decoder (bad samples are skipped and counted the same way).
"""
from __future__ import annotations

from typing import Any, Callable, Iterator, Optional, Sequence, Union

import torch

from conceptvlm.data.counters import BadSample, DataCounters
from conceptvlm.data.samples import (ImageOptions, document_text, image_member, json_field, parse_box_field,
                                     sample_json, vqa_fields)
from conceptvlm.data.shards import expand_shards
from conceptvlm.data.tario import iter_shard

from .grounding_runner import GroundingSample
from .vqa_runner import VQASample

ShardSpec = Union[str, Sequence[str]]
ImageTransform = Callable[[Any], torch.Tensor]


def _raw_samples(spec: ShardSpec, counters: DataCounters, limit: Optional[int]) -> Iterator[tuple[str, dict]]:
    n = 0
    for url in expand_shards(spec):
        for raw in iter_shard(url, counters):
            yield url, raw
            n += 1
            if limit is not None and n >= limit:
                return


def _parsed(spec: ShardSpec, limit: Optional[int], counters: DataCounters, parse: Callable[[dict], Any]):
    """``(key, parse(raw))`` for every sample ``parse`` accepts; ``BadSample`` is counted."""
    for url, raw in _raw_samples(spec, counters, limit):
        key = raw.get("__key__", "?")
        try:
            yield key, parse(raw)
        except BadSample as bad:
            counters.skip(bad.reason, url, key, str(bad))


def vqa_samples_from_shards(spec: ShardSpec, transform: ImageTransform, limit: Optional[int] = None,
                            counters: Optional[DataCounters] = None) -> list[VQASample]:
    """VQA shards (``KEY.jpg`` + json with ``question`` and ``answers``) -> samples."""
    counters = counters if counters is not None else DataCounters()
    opts = ImageOptions.for_transform(transform)

    def parse(raw: dict) -> tuple[dict, str, list[str], Any]:
        meta = sample_json(raw)
        question, answers = vqa_fields(meta)
        return meta, question, answers, image_member(raw, opts)[0]

    return [VQASample(question_id=meta.get("question_id", key), image=transform(img), question=question,
                      answers=answers, answer_type=meta.get("answer_type"), question_type=meta.get("question_type"))
            for key, (meta, question, answers, img) in _parsed(spec, limit, counters, parse)]


def grounding_samples_from_shards(spec: ShardSpec, transform: ImageTransform, limit: Optional[int] = None,
                                  counters: Optional[DataCounters] = None) -> list[GroundingSample]:
    """Grounding shards (json with ``expression``, ``box``, ``box_format``) -> samples (boxes xyxy)."""
    counters = counters if counters is not None else DataCounters()
    opts = ImageOptions.for_transform(transform)

    def parse(raw: dict) -> tuple[dict, Any, Any, tuple[int, int]]:
        meta = sample_json(raw)
        json_field(meta, "expression")
        xyxy = parse_box_field(meta)
        img, size = image_member(raw, opts)
        return meta, xyxy, img, size

    return [GroundingSample(id=meta.get("id", key), image=transform(img), expression=meta["expression"],
                            bbox=xyxy, width=w, height=h, split=meta.get("split"))
            for key, (meta, xyxy, img, (w, h)) in _parsed(spec, limit, counters, parse)]


def texts_from_shards(spec: ShardSpec, limit: Optional[int] = None,
                      counters: Optional[DataCounters] = None) -> list[str]:
    """Text shards (``KEY.txt`` or json ``text``) -> documents."""
    counters = counters if counters is not None else DataCounters()
    return [text for _, text in _parsed(spec, limit, counters, document_text)]
