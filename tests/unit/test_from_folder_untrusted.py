"""`shards from-folder` reads only files inside --images, verifies every image, stays in --out."""
from __future__ import annotations

import argparse
import json
import os
import tarfile
from collections import Counter

import pytest
from PIL import Image

from conceptvlm.data.cli import register
from conceptvlm.data.from_folder import write_folder_shards


def _members(paths) -> dict[str, bytes]:
    out = {}
    for p in paths:
        with tarfile.open(p) as tar:
            for m in tar.getmembers():
                out[m.name] = tar.extractfile(m).read()
    return out


@pytest.fixture
def folder(tmp_path):
    imgs = tmp_path / "imgs"
    (imgs / "sub").mkdir(parents=True)
    Image.new("RGB", (6, 4), "red").save(imgs / "ok.png")
    Image.new("RGB", (6, 4), "blue").save(imgs / "sub" / "ok2.jpg")
    (imgs / "fake.jpg").write_text("I am a text file, not a JPEG")
    secret = tmp_path / "secret.png"
    Image.new("RGB", (3, 3), "green").save(secret)
    os.symlink(secret, imgs / "link.png")
    os.symlink(imgs / "ok.png", imgs / "inside_link.png")
    return tmp_path


def _rows(path, images) -> None:
    with open(path, "w") as f:
        for i, name in enumerate(images):
            f.write(json.dumps({"image": name, "caption": f"c{i}"}) + "\n")


def test_rows_outside_the_folder_symlinks_and_fake_images_are_refused_and_counted(folder):
    secret = folder / "secret.png"
    _rows(folder / "a.jsonl", ["ok.png", "../secret.png", str(secret), "link.png", "inside_link.png",
                               "fake.jpg", "sub/ok2.jpg", "sub/../ok.png", "nope.png"])
    counts: Counter = Counter()
    paths = write_folder_shards(folder / "imgs", folder / "a.jsonl", folder / "out", counts=counts)
    members = _members(paths)
    assert sorted(m for m in members if m.endswith((".png", ".jpg"))) == ["000000000.png", "000000001.jpg"]
    assert secret.read_bytes() not in members.values()
    assert counts == {"outside_images": 3, "symlink": 2, "bad_image": 1, "missing_image": 1}
    with pytest.raises(ValueError, match=r"a.jsonl:2: '../secret.png' is not a path inside"):
        write_folder_shards(folder / "imgs", folder / "a.jsonl", folder / "out2", strict=True)


def test_follow_symlinks_is_explicit(folder):
    _rows(folder / "b.jsonl", ["link.png"])
    paths = write_folder_shards(folder / "imgs", folder / "b.jsonl", folder / "out", follow_symlinks=True)
    assert (folder / "secret.png").read_bytes() in _members(paths).values()


@pytest.mark.parametrize("prefix", ["../../escape", "/tmp/abs", "a/b", "..", ""])
def test_prefix_cannot_leave_out(folder, prefix):
    _rows(folder / "c.jsonl", ["ok.png"])
    with pytest.raises(ValueError, match="must be a plain file name"):
        write_folder_shards(folder / "imgs", folder / "c.jsonl", folder / "out" / "x", prefix=prefix)
    assert not (folder / "escape-000000.tar").exists() and not (folder / "out").exists()


def test_same_name_txt_captions_without_annotations(folder, capsys):
    (folder / "imgs" / "ok.txt").write_text("a red picture\n")
    (folder / "imgs" / "sub" / "ok2.txt").write_text("a blue picture")
    for name in ("link", "inside_link", "fake"):
        (folder / "imgs" / f"{name}.txt").write_text("a caption")
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="cmd"))
    args = parser.parse_args(["shards", "from-folder", "--images", str(folder / "imgs"), "--out", str(folder / "o")])
    assert args.func(args) == 0
    members = _members(sorted((folder / "o").glob("*.tar")))
    assert sorted(v.decode() for k, v in members.items() if k.endswith(".txt")) == ["a blue picture", "a red picture"]
    out = capsys.readouterr().out
    assert "skipped 3 row(s): bad_image 1, symlink 2" in out


def test_help_names_the_annotation_fields(capsys):
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="cmd"))
    with pytest.raises(SystemExit):
        parser.parse_args(["shards", "from-folder", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for field in ("image", "caption", "question", "answers", "answer", "--follow-symlinks", "--strict", ".txt"):
        assert field in text, field
