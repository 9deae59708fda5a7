"""Tokenizers are lossless; templates lay out image tokens and labels as the model expects."""
from __future__ import annotations

import json

import pytest

from conceptvlm.data.boxes import parse_box
from conceptvlm.data.templates import IGNORE, encode_parts, encode_prompt, grounding_parts, vqa_parts
from conceptvlm.data.tokenizer import SPECIAL_TOKENS, load_tokenizer, train_bpe_tokenizer

HARD_TEXTS = [
    "", " ", "  two leading spaces", "trailing\t\t", "line\r\nbreaks\n\n\n", "Ünïcödé façade naïve",
    "中文和日本語のテキスト", "emoji 🎉👩‍👩‍👧 and combining e\u0301", "\x00\x01 control\x7f",
    "literal <|eos|> and <|image|> stay text", "code:\n    def f(x):\n\treturn x  # ok",
]
CORPUS = ["the red circle is left of the blue square. " * 3, "def f(x):\n    return x\n", "Ünïcödé 中文 🎉"] * 40


@pytest.fixture(scope="module")
def bpe(tmp_path_factory):
    out = tmp_path_factory.mktemp("tok")
    train_bpe_tokenizer(CORPUS, vocab_size=300, out_dir=out)
    return load_tokenizer(out)


@pytest.mark.parametrize("which", ["bytes", "bpe"])
def test_decode_encode_is_lossless(which, bpe):
    tok = load_tokenizer(None) if which == "bytes" else bpe
    for text in HARD_TEXTS + CORPUS[:3]:
        assert tok.decode(tok.encode(text)) == text, repr(text)
    specials = {getattr(tok, f"{n}_id") for n in SPECIAL_TOKENS}
    assert len(specials) == len(SPECIAL_TOKENS) and max(specials) < tok.vocab_size
    assert not specials & set(tok.encode(HARD_TEXTS[9]))  # spelled specials are not specials
    assert tok.decode([tok.bos_id, *tok.encode("ab"), tok.image_id, tok.eos_id]) == "ab"


def test_bpe_compresses_and_saves(bpe, tmp_path):
    text = CORPUS[0]
    assert len(bpe.encode(text)) < len(text.encode()) / 2
    bpe.save(tmp_path)
    again = load_tokenizer(tmp_path / "tokenizer.json")
    assert again.encode(text) == bpe.encode(text) and again.eos_id == bpe.eos_id


def test_byte_tokenizer_saves_and_foreign_json_gets_our_specials(tmp_path, bpe):
    load_tokenizer(None).save(tmp_path / "b")
    assert load_tokenizer(tmp_path / "b").vocab_size == 256 + len(SPECIAL_TOKENS)
    # A tokenizer.json from elsewhere, without our special tokens: they are added.
    bpe.save(tmp_path / "f")
    data = json.loads((tmp_path / "f" / "tokenizer.json").read_text())
    data["added_tokens"] = [t for t in data["added_tokens"] if t["content"] != "<|image_end|>"]
    del data["model"]["vocab"]["<|image_end|>"]
    (tmp_path / "f" / "tokenizer.json").write_text(json.dumps(data))
    tok = load_tokenizer(tmp_path / "f")
    assert tok.image_end_id is not None and tok.decode(tok.encode("x <|image_end|>")) == "x <|image_end|>"
    with pytest.raises(FileNotFoundError):
        load_tokenizer(tmp_path / "missing")
    with pytest.raises(ValueError, match="vocab_size"):
        train_bpe_tokenizer(CORPUS, vocab_size=100)


def test_image_expansion_and_answer_only_labels():
    tok = load_tokenizer(None)
    ids, labels = encode_parts(vqa_parts("What color?", "red"), tok, image_tokens_per_image=4)
    n = 1 + 6  # bos, image block
    assert ids[:n].tolist() == [tok.bos_id, tok.image_start_id] + [tok.image_id] * 4 + [tok.image_end_id]
    trained = labels[labels != IGNORE]
    assert tok.decode(trained) == " red" and trained[-1] == tok.eos_id  # answer + eos only
    assert (labels[:n] == IGNORE).all()
    assert encode_prompt("<image>Question: What color? Answer:", tok, 4) == ids[: len(ids) - 5].tolist()


def test_grounding_answer_is_a_parseable_grid_box():
    tok = load_tokenizer(None)
    ids, labels = encode_parts(grounding_parts("the circle", (10, 20, 30, 60), 100, 80), tok, 2)
    answer = tok.decode(labels[labels != IGNORE])
    assert answer == " [100, 250, 300, 749]"
    assert parse_box(answer, 100, 80) == pytest.approx((10, 20, 30, 60), abs=0.1)
