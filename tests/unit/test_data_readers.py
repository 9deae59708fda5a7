"""Readers: every kind round-trips from shards to tokens; damage is skipped and counted."""
from __future__ import annotations

import io
import logging
import tarfile

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from conceptvlm.data.boxes import parse_box
from conceptvlm.data.counters import DataCounters
from conceptvlm.data.tario import iter_shard
from conceptvlm.data.pipeline import DataConfig, Source, build_loader
from conceptvlm.data.shards import ReaderInfo, expand_shards, shards_for_epoch
from conceptvlm.data.synthetic import synthetic_sample, write_synthetic_shards
from conceptvlm.data.tokenizer import load_tokenizer

TOK = load_tokenizer(None)
N_IMG = 4


def _cfg(**kw) -> DataConfig:
    base = dict(seq_len=640, batch_size=2, image_tokens_per_image=N_IMG, image_size=16, epochs=1, shuffle_buffer=0)
    return DataConfig(**(base | kw))


def _documents(loader) -> list[tuple[str, str, int]]:
    """Every document of every batch as (text with specials dropped, trained text, #images)."""
    out = []
    for batch in loader:
        n_images = 0
        for b in range(batch["input_ids"].shape[0]):
            for d in range(int(batch["doc_ids"][b].max()) + 1):
                m = batch["doc_ids"][b] == d
                ids, lab = batch["input_ids"][b][m], batch["labels"][b][m]
                k = int((ids == TOK.image_start_id).sum())
                assert int((ids == TOK.image_id).sum()) == k * N_IMG
                out.append((TOK.decode(ids), TOK.decode(lab[lab >= 0]), k))
                n_images += k
        assert batch["images"].shape == (n_images, 3, 16, 16)
    return out


@pytest.mark.parametrize("kind", ["caption", "vqa", "grounding", "interleaved", "text"])
def test_every_kind_round_trips(tmp_path, kind):
    write_synthetic_shards(kind, tmp_path, num=6, shard_size=3)
    loader = build_loader([Source(str(tmp_path / f"{kind}-{{000000..000001}}.tar"), kind)], TOK, _cfg())
    docs = _documents(loader)
    assert len(docs) == 6 and loader.counters.skipped == 0
    for i, (text, trained, n_images) in enumerate(docs):
        s = synthetic_sample(kind, i)
        meta = s.get("json", {})
        if kind == "caption":
            assert (text, trained, n_images) == (s["txt"], s["txt"], 1)
        elif kind == "vqa":
            assert text == f"Question: {meta['question']} Answer: {meta['answer']}"
            assert trained == " " + meta["answer"]  # loss only on the answer
        elif kind == "grounding":
            assert text.startswith(f"Locate: {meta['expression']}. Box: [")
            box = parse_box(trained, 64, 64)
            assert np.allclose(box, meta["box"], atol=0.1)
        elif kind == "interleaved":
            texts = [t for t in meta["texts"] if t is not None]
            assert text == trained == "\n".join(texts)
            assert n_images == sum(m is not None for m in meta["images"])
        else:
            assert (text, trained, n_images) == (s["txt"], s["txt"], 0)


@pytest.mark.parametrize("kind", ["vqa", "grounding"])
def test_question_first_puts_the_question_before_the_image(tmp_path, kind):
    """data.question_first (the model's image.question_first): the prompt's question, then
    the image block, then the rest; the trained answer is unchanged."""
    write_synthetic_shards(kind, tmp_path, num=3, shard_size=3)
    src = [Source(str(tmp_path / f"{kind}-000000.tar"), kind)]
    first = _documents(build_loader(src, TOK, _cfg(question_first=False)))
    qfirst = _documents(build_loader(src, TOK, _cfg(question_first=True)))
    for i, ((text, trained, k), (text_q, trained_q, k_q)) in enumerate(zip(first, qfirst)):
        assert (trained_q, k_q) == (trained, k) == (trained, 1) and text_q == text  # same tokens, other order
    loader = build_loader(src, TOK, _cfg(question_first=True))
    row = next(iter(loader))["input_ids"][0].tolist()
    start = row.index(TOK.image_start_id)
    meta = synthetic_sample(kind, 0)["json"]
    before = TOK.decode(row[1:start])
    assert before == (f"Question: {meta['question']}" if kind == "vqa" else f"Locate: {meta['expression']}.")


def _write(path, samples) -> None:
    with wds.TarWriter(str(path)) as sink:
        for s in samples:
            sink.write(s)


def _png(mode: str, size=(20, 10)) -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size).save(buf, format="PNG")
    return buf.getvalue()


def test_coco_xywh_boxes_and_any_image_mode(tmp_path):
    samples = [
        {"__key__": "a", "png": _png("RGBA"), "json": {"expression": "x", "box": [2, 1, 10, 4], "box_format": "xywh"}},
        {"__key__": "b", "png": _png("L"), "json": {"expression": "x", "box": [2, 1, 12, 5], "box_format": "xyxy"}},
        {"__key__": "c", "png": _png("P"), "json": {"expression": "x", "box": [2, 1, 12, 5], "box_format": "xyxy"}},
    ]
    _write(tmp_path / "g.tar", samples)
    docs = _documents(build_loader([Source(str(tmp_path / "g.tar"), "grounding")], TOK, _cfg()))
    assert [d[1] for d in docs] == [" [100, 100, 599, 500]"] * 3  # both conventions, same box


def test_damaged_shard_streams_the_good_samples_and_counts(tmp_path, caplog):
    good = [synthetic_sample("vqa", i) for i in range(6)]
    samples = [
        good[0],
        {"__key__": "notimage", "jpg": b"this is not a jpeg", "json": good[1]["json"]},
        good[2],
        {"__key__": "brokenjson", "jpg": good[3]["jpg"], "json": b'{"question": "what'},
        {"__key__": "noquestion", "jpg": good[3]["jpg"], "json": {"answers": ["a"]}},
        good[4],
        {"__key__": "truncated", "jpg": good[5]["jpg"] * 4, "json": good[5]["json"]},
    ]
    path = tmp_path / "bad.tar"
    _write(path, samples)
    data = path.read_bytes()
    with tarfile.open(path) as tar:  # cut the archive in the middle of the last image
        member = next(m for m in tar.getmembers() if m.name == "truncated.jpg")
    path.write_bytes(data[: member.offset_data + member.size // 2])
    with caplog.at_level(logging.WARNING, logger="conceptvlm.data"):
        loader = build_loader([Source(str(path), "vqa")], TOK, _cfg())
        docs = _documents(loader)
    assert [d[0].split("Answer:")[0] for d in docs] == [
        f"Question: {good[i]['json']['question']} " for i in (0, 2, 4)]
    c = loader.counters
    assert (c["skipped/bad_image"], c["skipped/bad_json"], c["skipped/missing_field"], c["skipped/truncated_member"]) == (1, 1, 1, 1)
    for key in ("notimage", "brokenjson", "noquestion", "truncated"):  # warnings name shard and key
        assert any(key in r.getMessage() and "bad.tar" in r.getMessage() for r in caplog.records), key


def test_missing_shard_and_empty_spec_are_clear_errors(tmp_path):
    write_synthetic_shards("text", tmp_path, num=2, shard_size=1)
    with pytest.raises(FileNotFoundError, match=r"4 shard\(s\).*text-000002.tar.*and 1 more"):
        expand_shards(str(tmp_path / "text-{000000..000005}.tar"))
    with pytest.raises(ValueError, match="names no shards"):
        expand_shards([])
    with pytest.raises(FileNotFoundError):
        build_loader([Source(str(tmp_path / "nope.tar"), "text")], TOK, _cfg())


def test_spec_forms_lists_braces_and_pipes(tmp_path):
    paths = write_synthetic_shards("text", tmp_path, num=4, shard_size=1)
    assert expand_shards(str(tmp_path / "text-{000000..000003}.tar")) == paths
    assert expand_shards(f"{paths[0]}::{paths[1]}") == paths[:2]
    assert expand_shards([paths[0], tmp_path / "text-00000{1..3}.tar"]) == paths
    loader = build_loader([Source([f"pipe:cat {p}" for p in paths], "text")], TOK, _cfg())
    assert len(_documents(loader)) == 4


def test_shards_split_by_rank_and_worker_cover_each_shard_once():
    urls = [f"s{i}" for i in range(10)]
    readers = [ReaderInfo(r, 2, w, 2) for r in range(2) for w in range(2)]
    for epoch in range(2):
        parts = [shards_for_epoch(urls, r, seed=3, epoch=epoch) for r in readers]
        assert sorted(sum(parts, [])) == sorted(urls)
    assert shards_for_epoch(urls, readers[0], 3, 0) != shards_for_epoch(urls, readers[0], 3, 1)
    resampled = shards_for_epoch(urls, readers[1], 3, 0, resample=True, shards_per_epoch=7)
    assert len(resampled) == 7 and set(resampled) <= set(urls)
    with pytest.raises(ValueError, match="at least one shard"):
        shards_for_epoch(urls[:3], readers[0], 0, 0)


def test_weighted_mixing_follows_weights(tmp_path):
    write_synthetic_shards("text", tmp_path / "t", num=400, shard_size=400)
    write_synthetic_shards("caption", tmp_path / "c", num=400, shard_size=400)
    sources = [Source(str(tmp_path / "t" / "text-000000.tar"), "text", weight=3.0),
               Source(str(tmp_path / "c" / "caption-000000.tar"), "caption", weight=1.0)]
    loader = build_loader(sources, TOK, _cfg(resample=True, shards_per_epoch=1, batch_size=8, seq_len=1024))
    docs = _documents(loader)
    with_image = sum(d[2] > 0 for d in docs)
    # Epoch ends when the heavier source runs out (400 texts): ~133 captions expected.
    assert len(docs) - with_image == 400 and 90 < with_image < 180
    assert torch.is_tensor(next(iter(build_loader(sources, TOK, _cfg())))["images"])


def test_failing_pipe_is_counted_not_fatal():
    counters = DataCounters()
    assert list(iter_shard("pipe:exit 3", counters)) == []
    assert counters.as_dict() == {"skipped/unreadable_shard": 1}


def test_default_transform_matches_torchvision_to_tensor_normalize():
    from torchvision import transforms

    from conceptvlm.data.images import CLIP_MEAN, CLIP_STD, default_image_transform

    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (30, 20, 3), dtype=np.uint8))
    ours = default_image_transform(16)(img)
    ref = transforms.Compose([transforms.Resize(16, interpolation=transforms.InterpolationMode.BICUBIC),
                              transforms.CenterCrop(16), transforms.ToTensor(),
                              transforms.Normalize(CLIP_MEAN, CLIP_STD)])(img)
    assert ours.shape == (3, 16, 16) and torch.allclose(ours, ref, atol=1e-5)
