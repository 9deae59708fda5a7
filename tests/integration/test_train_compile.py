"""``train.compile: true`` in the DeepSpeed train loop: the eager losses, the eager
checkpoint and export names, and resume in both directions; refused where it cannot work."""
import pytest
import torch
from safetensors.torch import load_file

from conceptvlm.config import ConfigError
from conceptvlm.export import WEIGHTS
from conceptvlm.safe_load import safe_torch_load
from conceptvlm.train import deepspeed_config, train
from conceptvlm.train_config import load_train_config
from train_helpers import text_shards, train_yaml


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return text_shards(tmp_path_factory.mktemp("shards"), num=60)


def _cfg(d, shards, *extra):
    d.mkdir(exist_ok=True)
    return load_train_config(train_yaml(d / "t.yaml", shards),
                             ["train.steps=4", "train.save_every=2", "train.export_at_end=true", *extra])


def _module_keys(run) -> set[str]:
    state = sorted((run / "checkpoints").glob("step_*/mp_rank_00_model_states.pt"))[-1]
    return set(safe_torch_load(state, map_location="cpu")["module"])


@pytest.mark.slow  # compiles two kinds of block: about a minute on two shared cores
def test_compiled_training_matches_eager_with_the_same_checkpoint_names(tmp_path, shards):
    torch._dynamo.reset()
    eager = train(_cfg(tmp_path / "eager", shards))["losses"]
    # Compiled for half the run, then resumed eagerly from its checkpoint: the names match.
    half = train(_cfg(tmp_path / "mixed", shards, "train.compile=true", "train.steps=2", "train.keep_last=1"))
    torch.testing.assert_close(half["losses"], eager[:2], rtol=1e-5, atol=0)
    assert _module_keys(tmp_path / "mixed" / "run") == _module_keys(tmp_path / "eager" / "run")
    rest = train(_cfg(tmp_path / "mixed", shards))["losses"]
    torch.testing.assert_close(rest, eager[2:], rtol=1e-5, atol=0)
    # A compiled run resumed from the eager run's last checkpoint, and its export.
    resumed = train(_cfg(tmp_path / "eager", shards, "train.compile=true", "train.steps=5"))["losses"]
    assert len(resumed) == 1 and resumed[0] > 0
    exported = load_file(str(tmp_path / "eager" / "run" / "export" / WEIGHTS))
    assert all("_orig_mod" not in k for k in exported) and len(exported) > 0


def test_compile_is_refused_with_expert_parallelism_and_zero3(tmp_path):
    shards = text_shards(tmp_path / "s", num=4)
    with pytest.raises(ConfigError, match="train.compile=true does not support parallel.ep_size=2"):
        _cfg(tmp_path / "ep", shards, "train.compile=true", "parallel.ep_size=2")
    cfg = _cfg(tmp_path / "z3", shards, "train.compile=true", "parallel.zero_stage=3")
    with pytest.raises(ConfigError, match="train.compile=true with ZeRO stage 3"):
        deepspeed_config(cfg)
