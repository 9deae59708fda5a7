"""The end of training says how many distinct samples the readers skipped, and why."""
import webdataset as wds

from conceptvlm.data.synthetic import synthetic_sample
from conceptvlm.train import train
from conceptvlm.train_config import load_train_config
from train_helpers import train_yaml


def test_training_ends_with_a_skip_summary(tmp_path, capsys):
    with wds.TarWriter(str(tmp_path / "t.tar")) as sink:
        sink.write({"__key__": "badutf", "txt": b"\xff\xfe not utf-8"})
        sink.write({"__key__": "badjson", "txt": b"fine", "json": b"{broken"})
        for i in range(6):  # a short epoch: the 12 steps read the shard several times
            sink.write(synthetic_sample("text", i))
    cfg = load_train_config(train_yaml(tmp_path / "t.yaml", str(tmp_path / "t.tar")),
                            ["train.steps=12", "train.save_every=0", "data.resample=true", "data.shuffle_buffer=0"])
    train(cfg)
    out = capsys.readouterr().out
    # resampling reads the shard again and again: the two bad samples are still counted once each
    assert "data: 2 distinct samples skipped (bad_field 1, bad_json 1)" in out, out[-2000:]
