"""Packing: the batch contract holds and no document is ever silently truncated."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from conceptvlm.data.counters import DataCounters
from conceptvlm.data.packing import Doc, PackConfig, Packer
from conceptvlm.data.templates import IGNORE, IMAGE, Text, encode_parts
from conceptvlm.data.tokenizer import load_tokenizer

TOK = load_tokenizer(None)
N_IMG = 3


def _cfg(**kw) -> PackConfig:
    base = dict(seq_len=32, batch_size=2, pad_id=TOK.pad_id, image_start_id=TOK.image_start_id,
                image_end_id=TOK.image_end_id, image_tokens_per_image=N_IMG, image_shape=(3, 2, 2))
    return PackConfig(**(base | kw))


def _docs(n: int, seed: int = 0) -> list[Doc]:
    """Random documents: text of 1-40 bytes with 0-3 images; each image tensor holds its id."""
    rng = np.random.default_rng(seed)
    docs, img_id = [], 0
    for i in range(n):
        parts, images = [], []
        for _ in range(rng.integers(1, 4)):
            parts.append(Text("x" * int(rng.integers(1, 20)), loss=bool(rng.integers(2))))
            if rng.random() < 0.4:
                parts.append(IMAGE)
                images.append(torch.full((3, 2, 2), float(img_id)))
                img_id += 1
        ids, labels = encode_parts(parts, TOK, N_IMG)
        docs.append(Doc(ids, labels, images, epoch=0, index=i))
    return docs


def _check_batch(batch: dict, cfg: PackConfig) -> list[torch.Tensor]:
    """Contract checks; returns each document's ids, in order."""
    B, L = cfg.batch_size, cfg.seq_len
    assert batch["input_ids"].shape == batch["labels"].shape == batch["doc_ids"].shape == (B, L)
    assert batch["input_ids"].dtype == batch["labels"].dtype == batch["doc_ids"].dtype == torch.long
    pad = batch["doc_ids"] < 0
    assert (batch["input_ids"][pad] == cfg.pad_id).all() and (batch["labels"][pad] == IGNORE).all()
    image_ids = []
    out = []
    for b in range(B):
        d = batch["doc_ids"][b]
        n = int((d >= 0).sum())
        assert (d[n:] < 0).all() and (torch.diff(d[:n]) >= 0).all()  # padding at the end, docs in order
        for k in range(int(d.max()) + 1 if n else 0):
            m = d == k
            assert batch["labels"][b][m][0] == IGNORE  # first token of a document never trained
            out.append(batch["input_ids"][b][m])
        starts = int((batch["input_ids"][b] == TOK.image_start_id).sum())
        assert starts <= cfg.max_images_per_row
        image_ids.append(starts)
    assert batch["images"].shape == (sum(image_ids), *cfg.image_shape)
    return out


@pytest.mark.parametrize("long_docs", ["split", "drop"])
def test_every_token_is_packed_or_counted(long_docs):
    cfg = _cfg(long_docs=long_docs, max_image_tokens_per_row=N_IMG)
    docs = _docs(200)
    counters = DataCounters()
    batches = list(Packer(cfg, counters).pack(iter(docs)))
    packed = [ids for b in batches for ids in _check_batch(b, cfg)]
    fits = [d for d in docs if len(d.ids) <= cfg.seq_len and len(d.images) <= 1]
    too_long = sum(len(d.ids) > cfg.seq_len for d in docs)
    too_many = sum(len(d.ids) <= cfg.seq_len and len(d.images) > 1 for d in docs)
    assert too_long > 5 and too_many > 0  # the test data exercises both limits
    if long_docs == "drop":
        assert counters["packing/dropped_too_long"] == too_long
        assert counters["packing/dropped_too_many_image_tokens"] == too_many
        assert [p.tolist() for p in packed] == [d.ids.tolist() for d in fits]
    else:
        # Splitting loses no token: the pieces concatenate back to the documents.
        assert counters["packing/split_too_long"] == too_long
        assert counters["packing/split_too_many_image_tokens"] == too_many
        assert torch.cat(packed).tolist() == np.concatenate([d.ids for d in docs]).tolist()
    assert counters["packing/docs"] == len(packed)


def test_images_follow_their_tokens_in_row_major_order():
    cfg = _cfg(seq_len=40)
    docs = _docs(60, seed=1)
    expected = torch.cat([torch.stack(d.images) for d in docs if d.images])[:, 0, 0, 0]
    batches = list(Packer(cfg).pack(iter(docs)))
    got = torch.cat([b["images"] for b in batches])[:, 0, 0, 0]
    assert torch.equal(got, expected)


def test_split_never_cuts_an_image_block():
    cfg = _cfg(seq_len=12)
    ids, labels = encode_parts([Text("ab"), IMAGE, IMAGE, Text("cdefghijklmnop"), IMAGE], TOK, N_IMG)
    images = [torch.zeros(3, 2, 2)] * 3
    batches = list(Packer(cfg).pack(iter([Doc(ids, labels, images, 0, 0)])))
    pieces = [p for b in batches for p in _check_batch(b, cfg)]
    assert torch.cat(pieces).tolist() == ids.tolist()
    for p in pieces:
        assert int((p == TOK.image_start_id).sum()) == int((p == TOK.image_end_id).sum())


def test_empty_image_batch_and_final_partial_batch_are_padded():
    cfg = _cfg(batch_size=4)
    ids, labels = encode_parts([Text("hello")], TOK, N_IMG)
    (batch,) = Packer(cfg).pack(iter([Doc(ids, labels, [], 0, 0)]))
    assert batch["images"].shape == (0, 3, 2, 2)
    assert (batch["doc_ids"][1:] == -1).all() and batch["_resume"] == (0, 1, 0)


def test_bad_config_is_rejected():
    with pytest.raises(ValueError, match="long_docs"):
        _cfg(long_docs="truncate")
    with pytest.raises(ValueError, match="image block"):
        _cfg(seq_len=4)
