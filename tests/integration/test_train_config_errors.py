"""The config faults that used to end in tracebacks: one line naming the problem, exit
code 2, before any model is built or folder written."""
import pytest

import conceptvlm.train as train_mod
from conceptvlm.config import ConfigError
from conceptvlm.train import main
from conceptvlm.train_config import load_train_config
from train_helpers import text_shards, train_yaml


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return text_shards(tmp_path_factory.mktemp("shards"), num=40)  # 2 shards


def _no_model(*a, **k):
    raise AssertionError("the model was built before the config error")


CASES = {
    "unknown source kind": (["+kind=captions"], "'captions'"),
    "missing tokenizer": (["data.tokenizer=/nonexistent/tokenizer.json"], "data.tokenizer"),
    "missing init_from": (["train.init_from=/nonexistent/model"], "train.init_from"),
    "more workers than shards": (["data.num_workers=3", "data.resample=false"], "2 shard(s) for 3 readers"),
    "seq_len above max_seq_len": (["data.seq_len=600"], "exceeds model.max_seq_len=512"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_config_fault_is_one_line_before_any_work(tmp_path, shards, capsys, monkeypatch, case):
    overrides, named = list(CASES[case][0]), CASES[case][1]
    monkeypatch.setattr(train_mod, "build_model", _no_model)
    path = train_yaml(tmp_path / "t.yaml", shards)
    if overrides[0].startswith("+kind="):  # a list entry: set in the YAML
        path.write_text(path.read_text().replace("kind: text", f"kind: {overrides.pop(0)[6:]}"))
    rc = main(["--config", str(path), *overrides])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and named in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "run").exists()


def test_override_into_a_list_is_one_line(tmp_path, shards):
    with pytest.raises(ConfigError, match="set lists in the YAML"):
        load_train_config(train_yaml(tmp_path / "t.yaml", shards), ["data.sources.0.kind=vqa"])


def test_out_dir_that_is_a_file(tmp_path, shards, capsys, monkeypatch):
    monkeypatch.setattr(train_mod, "build_model", _no_model)
    (tmp_path / "afile").write_text("x")
    rc = main(["--config", str(train_yaml(tmp_path / "t.yaml", shards)), f"train.out_dir={tmp_path}/afile/run"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "afile exists and is not a folder" in err and len(err.splitlines()) == 1


def test_tab_in_the_yaml(tmp_path, shards, capsys):
    path = train_yaml(tmp_path / "t.yaml", shards)
    path.write_text(path.read_text().replace("  steps: 4", "\tsteps: 4"))
    rc = main(["--config", str(path)])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "a tab" in err and f"{path}, line" in err and len(err.splitlines()) == 1, err


def test_seq_len_fits_max_seq_len_and_training_forwards_enforce_it():
    import torch

    from conceptvlm.config import ModelConfig
    from conceptvlm.model import ConceptMoE

    with pytest.raises(ConfigError, match="exceeds model.max_seq_len"):
        load_train_config(data={"model": {"max_seq_len": 64}, "data": {"seq_len": 65}})
    model = ConceptMoE(ModelConfig(vocab_size=16, d_model=16, n_heads=2, n_kv_heads=1, max_seq_len=8,
                                   moe={"n_experts": 2, "top_k": 1, "expert_hidden": 8}))
    model(torch.zeros(1, 8, dtype=torch.long))
    with pytest.raises(ValueError, match="training input of 9 positions exceeds model.max_seq_len=8"):
        model(torch.zeros(1, 9, dtype=torch.long))
    model.eval()(torch.zeros(1, 9, dtype=torch.long))  # evaluation may extrapolate (the longctx suite does)
