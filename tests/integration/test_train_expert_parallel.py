"""Expert parallelism through the real launcher on 2 CPU ranks equals one process on the
same global batch: losses, gradient norms (so expert gradients are reduced over the
right group and scaled right), global expert loads, and the exported (gathered) model."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conceptvlm.export import load_exported
from conceptvlm.logging_utils import read_jsonl
from conceptvlm.train import free_port, train
from conceptvlm.train_config import load_train_config
from train_helpers import REPO, text_shards, train_yaml

pytestmark = pytest.mark.slow

KEYS = ("loss", "lm_loss", "balance_loss", "z_loss", "ratio_loss", "grad_norm", "tokens")


@pytest.mark.parametrize("chunk", [
    {"router": "fixed"},
    # learned router with the ratio loss over the global batch; no sampling, so both runs
    # see identical concepts
    {"router": "cosine", "sample_in_training": False},
], ids=["fixed", "cosine"])
def test_ep2_on_two_ranks_matches_one_process(tmp_path, chunk):
    shards = text_shards(tmp_path / "shards")
    cfg_file = train_yaml(tmp_path / "t.yaml", shards, model={"chunk": chunk},
                          optim={"lr": 1.0e-2}, train={"export_at_end": True})
    common = ["parallel.zero_stage=2"]

    one = load_train_config(cfg_file, common + ["data.virtual_ranks=2", f"train.out_dir={tmp_path / 'one'}"])
    train(one)

    launcher = Path(sys.executable).with_name("deepspeed")
    env = dict(os.environ, DS_ACCELERATOR="cpu", CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    cmd = [str(launcher), "--num_gpus", "2", "--master_port", str(free_port()), "--module", "conceptvlm.train",
           "--config", str(cfg_file), *common, "parallel.ep_size=2", f"train.out_dir={tmp_path / 'ep2'}"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    a, b = read_jsonl(tmp_path / "one" / "metrics.jsonl"), read_jsonl(tmp_path / "ep2" / "metrics.jsonl")
    assert len(a) == len(b) == 4
    for ra, rb in zip(a, b):
        for k in KEYS:
            assert rb[k] == pytest.approx(ra[k], rel=1e-5, abs=1e-6), (ra["step"], k)
        for layer in range(4):
            key = f"expert_load/layer{layer}/shares"
            assert rb[key] == pytest.approx(ra[key], abs=1e-12)  # global counts, not one rank's
    diff = max(abs(ra["loss"] - rb["loss"]) for ra, rb in zip(a, b))
    print(f"max |loss(ep=2, 2 ranks) - loss(1 process)| over 4 steps: {diff:.3g}")

    m1, _ = load_exported(tmp_path / "one" / "export")
    m2, _ = load_exported(tmp_path / "ep2" / "export")  # experts gathered from both ranks
    s1, s2 = m1.state_dict(), m2.state_dict()
    assert s1.keys() == s2.keys()
    for k in s1:
        torch.testing.assert_close(s2[k], s1[k], rtol=1e-4, atol=1e-5, msg=k)
    ckpt = sorted((tmp_path / "ep2" / "checkpoints").glob("step_*"))[-1]
    assert len(list(ckpt.glob("layer_*_expert_*_model_states.pt"))) == 4 * 4  # DeepSpeed's per-expert files
    assert {p.name for p in ckpt.glob("trainer_rank*.json")} == {"trainer_rank00000.json", "trainer_rank00001.json"}
