"""A fast, quiet first run: a single-process CPU training run compiles no DeepSpeed op
(an empty TORCH_EXTENSIONS_DIR stays empty) and prints none of the known-harmless CPU
warnings; a multi-rank CPU run says it is compiling before it does."""
import importlib
import subprocess
import sys

import pytest

from helpers import fresh_process_env
from train_helpers import REPO, text_shards, train_yaml


@pytest.mark.slow
def test_single_process_training_builds_no_op_and_is_quiet(tmp_path):
    cfg = train_yaml(tmp_path / "train.yaml", text_shards(tmp_path / "shards", num=40), train={"steps": 2})
    ext = tmp_path / "torch_extensions"
    ext.mkdir()
    env = fresh_process_env(TORCH_EXTENSIONS_DIR=str(ext), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "conceptvlm.train", "--config", str(cfg)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert list(ext.iterdir()) == []
    for noise in ("Setting accelerator to CPU", "No CUDA runtime is found", "built successfully"):
        assert noise not in proc.stdout + proc.stderr


def test_shm_op_only_for_several_cpu_ranks(monkeypatch, capsys):
    from conceptvlm import quiet

    ds_torch = importlib.import_module("deepspeed.comm.torch")
    original = ds_torch.build_shm_op
    monkeypatch.setattr(ds_torch, "build_shm_op", original)  # restored after the test
    monkeypatch.delenv(quiet.SHM_ENV, raising=False)
    monkeypatch.setattr(quiet, "shm_op_cached", lambda: False)
    quiet.prepare_deepspeed_comm(world_size=2)
    assert ds_torch.build_shm_op is original
    assert "compiling its shared-memory collectives op" in capsys.readouterr().err
    quiet.prepare_deepspeed_comm(world_size=1)
    assert ds_torch.build_shm_op is not original and ds_torch.build_shm_op() is None
    monkeypatch.setattr(ds_torch, "build_shm_op", original)
    monkeypatch.setenv(quiet.SHM_ENV, "0")
    quiet.prepare_deepspeed_comm(world_size=2)
    assert ds_torch.build_shm_op() is None and capsys.readouterr().err == ""
