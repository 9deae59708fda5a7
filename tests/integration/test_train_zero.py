"""ZeRO 0/1/2/3 each train (with gradient accumulation; activation checkpointing on
stages 2 and 3) and export the same model: stages change memory layout, not the math."""
import math

import pytest
import torch

from conceptvlm.export import load_exported
from conceptvlm.train import train
from conceptvlm.train_config import load_train_config
from train_helpers import text_shards, train_yaml


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return text_shards(tmp_path_factory.mktemp("shards"))


def test_zero_stages_train_and_export_identically(tmp_path, shards):
    runs = {}
    for stage in (0, 1, 2, 3):
        d = tmp_path / f"z{stage}"
        d.mkdir()
        cfg = load_train_config(train_yaml(d / "t.yaml", shards), [
            f"parallel.zero_stage={stage}", "optim.grad_accum=2", "train.export_at_end=true",
            f"parallel.activation_checkpointing={str(stage >= 2).lower()}",
            "model.chunk.router=fixed"])  # no sampling: stages must agree to float noise
        result = train(cfg)
        assert result["steps"] == 4 and all(math.isfinite(x) for x in result["losses"])
        model, tok = load_exported(d / "run" / "export")
        runs[stage] = (result["losses"], model.state_dict())
        assert tok is not None and tok.vocab_size == 262
    ref_losses, ref_state = runs[0]
    assert ref_losses[-1] < ref_losses[0]
    for stage in (1, 2, 3):
        losses, state = runs[stage]
        assert losses == pytest.approx(ref_losses, rel=1e-5, abs=1e-5), stage
        assert state.keys() == ref_state.keys()
        for k in ref_state:
            torch.testing.assert_close(state[k], ref_state[k], rtol=1e-4, atol=1e-5, msg=f"stage {stage}: {k}")
