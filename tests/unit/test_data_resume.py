"""Resume: after load_state_dict the stream continues with exactly the batches an
uninterrupted run would have produced: no repeats, nothing skipped."""
from __future__ import annotations

import json

import pytest
import torch

from conceptvlm.data.pipeline import DataConfig, Source, build_loader
from conceptvlm.data.synthetic import write_synthetic_shards
from conceptvlm.data.tokenizer import load_tokenizer

TOK = load_tokenizer(None)


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    d = tmp_path_factory.mktemp("shards")
    write_synthetic_shards("interleaved", d, num=24, shard_size=6)
    write_synthetic_shards("vqa", d, num=30, shard_size=10)
    return [Source(str(d / "interleaved-{000000..000003}.tar"), "interleaved", weight=1.0),
            Source(str(d / "vqa-{000000..000002}.tar"), "vqa", weight=2.0)]


def _cfg(**kw) -> DataConfig:
    # seq_len 160 splits most interleaved documents, so resume points fall inside documents.
    base = dict(seq_len=160, batch_size=2, image_tokens_per_image=4, image_size=16, epochs=2,
                shuffle_buffer=8, shuffle_initial=4, seed=7)
    return DataConfig(**(base | kw))


def _same(a: list[dict], b: list[dict]) -> bool:
    return len(a) == len(b) and all(
        all(torch.equal(x[k], y[k]) for k in ("input_ids", "labels", "doc_ids", "images")) for x, y in zip(a, b))


def _take(loader, n: int) -> list[dict]:
    out = []
    for batch in loader:
        out.append(batch)
        if len(out) == n:
            break
    return out


@pytest.mark.parametrize("stop", [1, 7, 41])  # 7: inside a split document; 41: in epoch 1
def test_resume_continues_exactly(sources, stop):
    full = list(build_loader(sources, TOK, _cfg()))
    assert len(full) > 30  # two epochs, crossing the epoch boundary below
    first = build_loader(sources, TOK, _cfg())
    head = _take(first, stop)
    state = json.loads(json.dumps(first.state_dict()))  # goes into a checkpoint as JSON-able data
    resumed = build_loader(sources, TOK, _cfg())
    resumed.load_state_dict(state)
    assert _same(head + list(resumed), full)
    assert resumed.counters["packing/split_too_long"] > 0


def test_iterating_again_continues_and_order_depends_on_seed(sources):
    loader = build_loader(sources, TOK, _cfg())
    a, b = _take(loader, 5), _take(loader, 5)
    assert _same(a + b, _take(build_loader(sources, TOK, _cfg()), 10))
    assert not _same(a, _take(build_loader(sources, TOK, _cfg(seed=8)), 5))


def test_mismatched_setup_is_refused(sources):
    state = build_loader(sources, TOK, _cfg()).state_dict()
    other = build_loader(sources, TOK, _cfg(shuffle_buffer=16))
    with pytest.raises(ValueError, match="shuffle_buffer"):
        other.load_state_dict(state)
