"""The DeepSpeed train loop on one GPU: bf16 chosen by ``precision: auto``, a run killed
after a checkpoint and resumed to the losses of an uninterrupted run, ZeRO-3. Skipped
without a GPU (``tests/integration/test_train_resume.py`` checks resume on the CPU)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "integration"))
from train_helpers import REPO, text_shards, train_yaml  # noqa: E402

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


class Killed(BaseException):
    """Stands in for SIGKILL: nothing after it runs."""


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return text_shards(tmp_path_factory.mktemp("shards"), num=120)


def _cfg(d: Path, shards: str, *extra: str):
    from conceptvlm.train_config import load_train_config

    d.mkdir(exist_ok=True)
    return load_train_config(train_yaml(d / "t.yaml", shards), ["train.steps=8", "train.save_every=4", *extra])


def test_bf16_run_killed_and_resumed_gives_the_uninterrupted_losses(tmp_path, shards):
    from conceptvlm.train import train, use_bf16

    cfg = _cfg(tmp_path / "full", shards)
    assert use_bf16(cfg)  # precision auto on a bf16 GPU
    full = train(cfg)["losses"]
    assert len(full) == 8 and all(map(torch.isfinite, torch.tensor(full)))

    def kill_in_step_6(step, loss):
        if step == 5:
            raise Killed
        return loss

    with pytest.raises(Killed):
        train(_cfg(tmp_path / "part", shards), loss_hook=kill_in_step_6)
    resumed = train(_cfg(tmp_path / "part", shards))["losses"]
    print("bf16 losses", full, "resumed from step 4", resumed)
    # GPU kernels may sum in a different order from run to run (atomics): close, and
    # exactly equal where the kernels are deterministic.
    torch.testing.assert_close(torch.tensor(resumed), torch.tensor(full[4:]), rtol=1e-3, atol=0)


def test_zero3_bf16_trains(tmp_path, shards):
    from conceptvlm.train import train

    cfg = _cfg(tmp_path / "z3", shards, f"parallel.deepspeed_config={REPO / 'configs/deepspeed/zero3.json'}",
               "train.save_every=0")
    losses = train(cfg)["losses"]
    assert len(losses) == 8 and all(map(torch.isfinite, torch.tensor(losses)))
    assert losses[-1] < losses[0]
