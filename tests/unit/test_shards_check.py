"""``conceptvlm shards check``: every sample read and parsed as training reads it; the counts
agree with what the training pipeline itself skips on the same damaged shards."""
import io
import tarfile

import pytest

from conceptvlm.cli import main
from conceptvlm.data.check import check_shard
from conceptvlm.data.counters import DataCounters
from conceptvlm.data.samples import document_parser
from conceptvlm.data.synthetic import write_synthetic_shards
from conceptvlm.data.tario import iter_shard


@pytest.fixture()
def shards(tmp_path):
    good = write_synthetic_shards("vqa", tmp_path / "good", num=12, shard_size=6, seed=0, image_size=32)
    bad = tmp_path / "bad"
    bad.mkdir()
    with tarfile.open(good[0]) as src, tarfile.open(bad / "s-000000.tar", "w") as dst:
        broken = 0
        for m in src.getmembers():
            data = src.extractfile(m).read()
            if m.name.endswith((".jpg", ".png")) and broken < 2:  # two samples with an unreadable image
                data, m.size, broken = b"not an image", len(b"not an image"), broken + 1
            dst.addfile(m, io.BytesIO(data))
    raw = open(good[1], "rb").read()
    with tarfile.open(good[1]) as t:
        members = t.getmembers()
    (bad / "s-000001.tar").write_bytes(raw[: members[5].offset_data + 100])  # cut inside the 6th member
    (bad / "s-000002.tar").write_bytes(b"garbage")  # not a tar at all
    # cut exactly before the 7th header: tarfile itself stops there without a word
    (bad / "s-000003.tar").write_bytes(raw[: members[6].offset])
    return tmp_path


def _pipeline_skips(url):
    """What training's own reader and parser make of one shard: usable samples and skip counts."""
    counters, parse, usable = DataCounters(), document_parser("vqa"), 0
    for raw in iter_shard(url, counters):
        try:
            parse(raw)
            usable += 1
        except Exception as bad:
            counters.skip(bad.reason, url, raw["__key__"], str(bad))
    return usable, {k.split("/", 1)[1]: v for k, v in counters.as_dict().items() if k.startswith("skipped/")}


def test_counts_match_the_training_reader(shards):
    for i in range(4):
        url = str(shards / "bad" / f"s-00000{i}.tar")
        result = check_shard(url, "vqa")
        assert (result.samples, result.skipped) == _pipeline_skips(url)
    assert check_shard(str(shards / "bad" / "s-000000.tar"), "vqa").skipped == {"bad_image": 2}
    assert check_shard(str(shards / "bad" / "s-000002.tar"), "vqa").skipped == {"unreadable_shard": 1}
    cut = check_shard(str(shards / "bad" / "s-000003.tar"), "vqa")  # 3 whole samples kept, the cut counted
    assert (cut.samples, cut.skipped) == (3, {"truncated_shard": 1})
    whole = check_shard(str(shards / "good" / "vqa-000000.tar"), "vqa")
    assert whole.ok and whole.samples == 6 and whole.images == 6


def test_cli_exit_code_and_lines(shards, capsys):
    assert main(["shards", "check", str(shards / "good" / "vqa-{000000..000001}.tar"), "--kind", "vqa"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 3 and out[-1] == "2 shard(s): 12 usable vqa sample(s), 0 that training would skip"
    assert main(["shards", "check", str(shards / "bad" / "s-{000000..000003}.tar"), "--kind", "vqa"]) == 1
    out = capsys.readouterr().out.strip().splitlines()
    assert "4 usable sample(s), 4 image(s); 2 skipped (bad_image 2)" in out[0]
    assert "2 usable sample(s), 2 image(s); 1 skipped (truncated_member 1)" in out[1]
    assert "unreadable_shard 1" in out[2] and "truncated_shard 1" in out[3]
    assert out[4] == "4 shard(s): 9 usable vqa sample(s), 5 that training would skip"
    # the wrong kind: every sample lacks the fields, named by reason
    assert main(["shards", "check", str(shards / "good" / "vqa-000000.tar"), "--kind", "grounding"]) == 1
    assert "6 skipped (missing_field 6)" in capsys.readouterr().out
    assert main(["shards", "check", str(shards / "nope-{000000..000001}.tar"), "--kind", "vqa"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not found" in err[0]
