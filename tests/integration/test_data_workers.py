"""DataLoader workers: batches interleave across workers, and resume is still exact."""
from __future__ import annotations

import pytest

from conceptvlm.data.pipeline import DataConfig, Source, build_loader
from conceptvlm.data.synthetic import write_synthetic_shards
from conceptvlm.data.tokenizer import load_tokenizer

TOK = load_tokenizer(None)


def _cfg(**kw) -> DataConfig:
    base = dict(seq_len=256, batch_size=2, image_tokens_per_image=4, image_size=16, epochs=1,
                shuffle_buffer=8, shuffle_initial=4, seed=1, num_workers=2)
    return DataConfig(**(base | kw))


def _ids(batches: list[dict]) -> list[list[int]]:
    return [b["input_ids"].flatten().tolist() + b["images"].flatten().tolist() for b in batches]


@pytest.mark.parametrize("stop", [3, 4])  # odd and even: the next batch is due from either worker
def test_two_workers_resume_exactly(tmp_path, stop):
    write_synthetic_shards("caption", tmp_path, num=60, shard_size=10)
    source = [Source(str(tmp_path / "caption-{000000..000005}.tar"), "caption")]
    full = list(build_loader(source, TOK, _cfg()))
    first = build_loader(source, TOK, _cfg())
    head = []
    for batch in first:
        head.append(batch)
        if len(head) == stop:
            break
    resumed = build_loader(source, TOK, _cfg())
    resumed.load_state_dict(first.state_dict())
    rest = list(resumed)
    assert _ids(head + rest) == _ids(full)
    assert resumed.counters["packing/docs"] == 60 and resumed.counters.skipped == 0
    # Both workers contributed.
    assert sorted(resumed.state_dict()["positions"]) == [0, 1]


def test_more_workers_than_shards_is_a_clear_error(tmp_path):
    write_synthetic_shards("text", tmp_path, num=4, shard_size=4)
    loader = build_loader([Source(str(tmp_path / "text-000000.tar"), "text")], TOK, _cfg())
    with pytest.raises(ValueError, match="at least one shard"):
        list(loader)
