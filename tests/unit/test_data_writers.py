"""Writers: synthetic scenes are deterministic and correct; folders and the CLI write shards."""
from __future__ import annotations

import argparse
import csv
import io
import json

import numpy as np
import pytest
from PIL import Image

from conceptvlm.data.cli import register
from conceptvlm.data.from_folder import write_folder_shards
from conceptvlm.data.pipeline import DataConfig, Source, build_loader
from conceptvlm.data.samples import majority_answer
from conceptvlm.data.synthetic import COLOURS, synthetic_sample
from conceptvlm.data.tokenizer import load_tokenizer

TOK = load_tokenizer(None)


def _cfg() -> DataConfig:
    return DataConfig(seq_len=256, batch_size=2, image_tokens_per_image=2, image_size=16, epochs=1, shuffle_buffer=0)


@pytest.mark.parametrize("kind", ["caption", "vqa", "grounding", "interleaved", "text"])
def test_synthetic_is_deterministic_by_seed(kind):
    assert synthetic_sample(kind, 5, seed=1) == synthetic_sample(kind, 5, seed=1)
    assert synthetic_sample(kind, 5, seed=1) != synthetic_sample(kind, 5, seed=2)


def test_grounding_box_covers_the_shape_and_vqa_answers_agree():
    for i in range(20):
        s = synthetic_sample("grounding", i, image_size=96)
        x1, y1, x2, y2 = s["json"]["box"]
        img = np.asarray(Image.open(io.BytesIO(s["jpg"])).convert("RGB"), dtype=float)
        centre = img[(y1 + y2) // 2, (x1 + x2) // 2]
        assert min(np.abs(centre - np.array(c)).max() for c in COLOURS.values()) < 40  # a shape colour
        assert img.shape == (96, 96, 3) and 0 <= x1 < x2 <= 96 and 0 <= y1 < y2 <= 96
        q = synthetic_sample("vqa", i)["json"]
        assert len(q["answers"]) == 10 and majority_answer(q["answers"]) == q["answer"]
    questions = {synthetic_sample("vqa", i)["json"]["question"].split()[0] for i in range(60)}
    assert {"How", "What", "Where", "Is"} <= questions  # count, colour/shape, position, yes/no


def _docs(sources) -> list[str]:
    out = []
    for b in build_loader(sources, TOK, _cfg()):
        for r in range(b["input_ids"].shape[0]):
            for d in range(int(b["doc_ids"][r].max()) + 1):
                out.append(TOK.decode(b["input_ids"][r][b["doc_ids"][r] == d]))
    return sorted(out)


def _image(path, colour) -> None:
    Image.new("RGB", (12, 8), colour).save(path)


def test_from_folder_jsonl_and_csv(tmp_path):
    (tmp_path / "imgs").mkdir()
    for i in range(5):
        _image(tmp_path / "imgs" / f"{i}.png", (i * 40, 0, 0))
    with open(tmp_path / "caps.jsonl", "w") as f:
        for i in range(5):
            f.write(json.dumps({"image": f"{i}.png", "caption": f"picture {i}", "source": "me"}) + "\n")
    with open(tmp_path / "qa.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "question", "answers"])
        for i in range(3):
            w.writerow([f"{i}.png", f"what is {i}?", f"{i}|{i}|x"])
    caps = write_folder_shards(tmp_path / "imgs", tmp_path / "caps.jsonl", tmp_path / "out", shard_size=2, prefix="cap")
    qa = write_folder_shards(tmp_path / "imgs", tmp_path / "qa.csv", tmp_path / "out", shard_size=2, prefix="qa")
    assert len(caps) == 3 and len(qa) == 2
    # Shard order is a seeded permutation, so compare as sets of documents.
    assert _docs([Source(caps, "caption")]) == sorted(f"picture {i}" for i in range(5))
    assert _docs([Source(qa, "vqa")]) == sorted(f"Question: what is {i}? Answer: {i}" for i in range(3))
    with open(tmp_path / "bad.jsonl", "w") as f:
        f.write(json.dumps({"image": "missing.png", "caption": "x"}) + "\n")
    with pytest.raises(ValueError, match="bad.jsonl:1: image not found"):
        write_folder_shards(tmp_path / "imgs", tmp_path / "bad.jsonl", tmp_path / "out2", strict=True)


def test_cli_commands(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="cmd"))
    args = parser.parse_args(["shards", "synthetic", "--kind", "grounding", "--out", str(tmp_path / "g"),
                              "--num", "5", "--shard-size", "2", "--image-size", "32"])
    assert args.func(args) == 0 and len(list((tmp_path / "g").glob("grounding-*.tar"))) == 3
    (tmp_path / "corpus.txt").write_text("the red circle is left of the blue square.\n" * 50)
    args = parser.parse_args(["tokenizer", "train", str(tmp_path / "corpus.txt"), "--vocab-size", "300",
                              "--out", str(tmp_path / "tok")])
    assert args.func(args) == 0
    tok = load_tokenizer(tmp_path / "tok")
    assert tok.decode(tok.encode("the blue square")) == "the blue square"
    assert "wrote 5 grounding samples" in capsys.readouterr().out
