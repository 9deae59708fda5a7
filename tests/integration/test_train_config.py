"""A bad config key or value fails before any work, with a message naming it."""
import pytest

from conceptvlm.config import ConfigError
from conceptvlm.train import main
from conceptvlm.train_config import load_train_config
from train_helpers import REPO, train_yaml


@pytest.mark.parametrize("override, named", [
    ("optim.lrr=1e-3", "optim.lrr"),                 # unknown key
    ("optim.lr=fast", "optim.lr"),                   # wrong type
    ("model.chunk.router=magic", "chunk.router"),    # bad value (ModelConfig check)
    ("parallel.ep_size=3", "parallel.ep_size"),      # does not divide n_experts
    ("train.freeze=5", "train.freeze"),              # not a list
])
def test_bad_key_or_value_names_it_before_any_work(tmp_path, capsys, override, named):
    cfg = train_yaml(tmp_path / "t.yaml", "missing-{000000..000001}.tar")
    rc = main(["--config", str(cfg), override])
    assert rc == 2
    assert named in capsys.readouterr().err
    assert not (tmp_path / "run").exists()  # nothing was started


def test_zero3_with_expert_parallelism_is_refused_at_start(tmp_path, capsys):
    cfg = train_yaml(tmp_path / "t.yaml", "missing.tar")
    rc = main(["--config", str(cfg), "parallel.zero_stage=3", "parallel.ep_size=2"])
    err = capsys.readouterr().err
    assert rc == 2 and "ZeRO stage 3" in err and "ep_size=2" in err
    assert not (tmp_path / "run").exists()


def test_shipped_train_configs_load():
    for name in ("tiny_text", "tiny_vlm", "tiny_vlm_align"):
        cfg = load_train_config(REPO / f"configs/train/{name}.yaml")
        assert cfg.model.d_model == 64
    with pytest.raises(ConfigError, match="model_file not found"):
        load_train_config(None, ["model_file=nope.yaml"])


def test_train_command_registers_on_the_console_script_parser(tmp_path):
    import argparse

    from conceptvlm.train import add_train_parser, run

    parser = argparse.ArgumentParser(prog="conceptvlm")
    add_train_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["train", "--config", "x.yaml", "optim.lr=1e-3", "--local_rank=1"])
    assert args.func is run and args.overrides == ["optim.lr=1e-3"] and args.config == "x.yaml"
