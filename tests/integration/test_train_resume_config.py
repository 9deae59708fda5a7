"""Resuming with a changed config: it says where it resumed and what changed; a new
learning rate and schedule are applied; optimizer, data-order and model changes that
cannot apply are refused in one line."""
import shutil

import pytest

from conceptvlm.checkpoint import CheckpointError
from conceptvlm.config import ConfigError
from conceptvlm.logging_utils import read_jsonl
from conceptvlm.train import lr_lambda, train
from conceptvlm.train_config import load_train_config
from train_helpers import text_shards, train_yaml


@pytest.fixture(scope="module")
def first(tmp_path_factory):
    d = tmp_path_factory.mktemp("first")
    train(_cfg(d, text_shards(d / "shards"), "train.steps=3"))
    return d


def _cfg(d, shards, *extra):
    return load_train_config(train_yaml(d / "t.yaml", shards), list(extra))


def _resume(first, tmp_path, *extra):
    d = tmp_path / "again"
    shutil.copytree(first, d)
    return d, _cfg(d, f"{first}/shards/text-{{000000..000001}}.tar", *extra)  # the same shard spec


def test_resume_reports_and_applies_a_new_learning_rate_and_schedule(first, tmp_path, capsys):
    d, cfg = _resume(first, tmp_path, "train.steps=5", "optim.lr=1e-3", "optim.warmup_steps=0")
    capsys.readouterr()
    result = train(cfg)
    out = capsys.readouterr().out
    assert "resumed from step 3 (checkpoint " in out and "step_00000003" in out
    assert "optim.lr: 0.003 -> 0.001" in out and "train.steps: 3 -> 5" in out and "optim.warmup_steps: 2 -> 0" in out
    assert result["steps"] == 5 and len(result["losses"]) == 2
    f = lr_lambda(cfg)
    rows = {r["step"]: r for r in read_jsonl(d / "run" / "metrics.jsonl")}
    for step in (4, 5):
        assert rows[step]["lr"] == pytest.approx(1e-3 * f(step), rel=1e-9)


@pytest.mark.parametrize("override, error, named", [
    ("optim.weight_decay=0.1", ConfigError, "optim.weight_decay: 0.0 -> 0.1"),
    ("data.seq_len=32", ConfigError, "cannot resume the data stream"),
    ("model.d_model=64", CheckpointError, "model.d_model: 32 -> 64"),
])
def test_resume_refuses_changes_that_cannot_apply(first, tmp_path, override, error, named):
    d, cfg = _resume(first, tmp_path, "train.steps=5", override)
    before = (d / "run" / "metrics.jsonl").read_text()
    with pytest.raises(error) as e:
        train(cfg)
    assert named in str(e.value) and "\n" not in str(e.value)
    assert (d / "run" / "metrics.jsonl").read_text() == before
