"""Faults against checkpoints: planted pickles are refused without running, damaged or
missing files and a broken ``latest`` fall back to the newest good checkpoint (losses
as if nothing happened), none good stops the run, a re-save survives a crash between
its steps, and non-finite weights are never saved."""
import json
import os
import shutil

import pytest
import torch

import conceptvlm.checkpoint as ck
from conceptvlm.checkpoint import CheckpointError, NonFiniteWeightsError, choose_checkpoint, latest_tag
from conceptvlm.logging_utils import read_jsonl
from conceptvlm.manifest import verify_manifest, write_manifest
from conceptvlm.train import NonFiniteLossError, train
from conceptvlm.train_config import load_train_config
from train_helpers import text_shards, train_yaml


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return text_shards(tmp_path_factory.mktemp("shards"))


def _cfg(d, shards, *extra):
    d.mkdir(exist_ok=True)
    return load_train_config(train_yaml(d / "t.yaml", shards),
                             ["train.steps=6", "train.save_every=3", "train.keep_last=0", *extra])


@pytest.fixture(scope="module")
def done(tmp_path_factory, shards):
    """A finished 6-step run with checkpoints at steps 3 and 6, and its losses."""
    d = tmp_path_factory.mktemp("done")
    losses = train(_cfg(d, shards))["losses"]
    return d, losses


def _copy(done, tmp_path):
    src, losses = done
    dst = tmp_path / "run_copy"  # _cfg(dst) writes a YAML whose out_dir is the copy's
    shutil.copytree(src, dst)
    return dst, dst / "run" / "checkpoints", losses


class Payload:
    """A pickle that creates ``marker`` when unpickled."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def _plant(path, marker):
    torch.save({"module": Payload(marker)}, path)


# ----------------------------------------------------------------------------- nothing loaded runs code
@pytest.mark.parametrize("victim", ["mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt"])
def test_planted_pickle_in_deepspeed_files_is_refused_and_never_runs(done, tmp_path, shards, victim):
    d, ckpt, _ = _copy(done, tmp_path)
    marker = tmp_path / "pwned"
    folder = ckpt / "step_00000006"
    _plant(folder / victim, marker)
    write_manifest(folder)  # the manifest is integrity, not a signature: loading itself must be safe
    with pytest.raises(CheckpointError) as e:
        train(_cfg(d, shards))
    assert not marker.exists()
    msg = str(e.value)
    assert "\n" not in msg and victim in msg and "refused" in msg and "posix.mkdir" in msg


def test_pickled_trainer_state_of_older_versions_is_refused_and_never_runs(done, tmp_path, shards):
    d, ckpt, _ = _copy(done, tmp_path)
    marker = tmp_path / "pwned"
    for name in ("step_00000003", "step_00000006"):  # the old layout: no manifest, trainer_rank*.pt
        folder = ckpt / name
        for f in folder.glob("trainer_rank*"):
            f.unlink()
        (folder / "manifest.json").unlink()
        _plant(folder / "trainer_rank00000.pt", marker)
    with pytest.raises(CheckpointError) as e:
        train(_cfg(d, shards))
    assert not marker.exists()
    msg = str(e.value)
    assert "\n" not in msg and "trainer_rank00000.pt" in msg and "older conceptvlm" in msg
    assert len(read_jsonl(d / "run" / "metrics.jsonl")) == 6  # nothing was overwritten


# ----------------------------------------------------------------------------- verified, with fallback
def _flip(path, offset=-100):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def _truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


DAMAGE = {
    "flipped model bytes": lambda f: _flip(f / "mp_rank_00_model_states.pt"),
    "truncated optimizer": lambda f: _truncate(f / "zero_pp_rank_0_mp_rank_00_optim_states.pt"),
    "deleted trainer state": lambda f: (f / "trainer_rank00000.safetensors").unlink(),
    "missing manifest": lambda f: (f / "manifest.json").unlink(),
    "garbage manifest": lambda f: (f / "manifest.json").write_text("{not json"),
}


@pytest.mark.parametrize("fault", list(DAMAGE))
def test_damaged_checkpoint_is_detected_and_skipped(done, tmp_path, fault, capsys):
    _, ckpt, _ = _copy(done, tmp_path)
    DAMAGE[fault](ckpt / "step_00000006")
    assert verify_manifest(ckpt / "step_00000003") is None
    assert choose_checkpoint(ckpt) == "step_00000003"
    out = capsys.readouterr().out
    assert "warning: resuming from step_00000003" in out and "step_00000006:" in out


def test_fallback_resumes_with_the_losses_of_an_uninterrupted_run(done, tmp_path, shards, capsys):
    d, ckpt, losses = _copy(done, tmp_path)
    _flip(ckpt / "step_00000006" / "mp_rank_00_model_states.pt")
    capsys.readouterr()
    resumed = train(_cfg(d, shards))
    out = capsys.readouterr().out
    assert "does not match its sha256" in out and "resumed from step 3" in out
    assert resumed["losses"] == losses[3:]
    tag = latest_tag(ckpt)  # step_00000006.1: a new name, the damaged folder went after the flip
    assert [p.name for p in ckpt.glob("step_00000006*")] == [tag] and verify_manifest(ckpt / tag) is None
    assert [r["loss"] for r in read_jsonl(d / "run" / "metrics.jsonl")] == losses


LATEST = {
    "garbage": lambda p: p.write_bytes(b"\x00\xffgarbage\n"),
    "empty": lambda p: p.write_text(""),
    "deleted": lambda p: p.unlink(),
    "names a missing folder": lambda p: p.write_text("step_00000009"),
    "names a folder outside": lambda p: p.write_text("../../run"),
}


@pytest.mark.parametrize("fault", list(LATEST))
def test_broken_latest_falls_back_to_the_newest_good_checkpoint(done, tmp_path, fault, capsys):
    _, ckpt, _ = _copy(done, tmp_path)
    LATEST[fault](ckpt / "latest")
    assert choose_checkpoint(ckpt) == "step_00000006"
    assert "warning: resuming from step_00000006" in capsys.readouterr().out


def test_no_good_checkpoint_stops_instead_of_starting_from_step_0(done, tmp_path, shards):
    d, ckpt, _ = _copy(done, tmp_path)
    for name in ("step_00000003", "step_00000006"):
        _flip(ckpt / name / "mp_rank_00_model_states.pt")
    (ckpt / "latest").write_text("garbage")
    before = (d / "run" / "metrics.jsonl").read_text()
    with pytest.raises(CheckpointError, match="no usable checkpoint") as e:
        train(_cfg(d, shards))
    assert "\n" not in str(e.value) and "step_00000003" in str(e.value) and "step_00000006" in str(e.value)
    assert (d / "run" / "metrics.jsonl").read_text() == before
    # only the pointer left: still not a fresh start
    for name in ("step_00000003", "step_00000006"):
        shutil.rmtree(ckpt / name)
    with pytest.raises(CheckpointError, match="does not exist|not a checkpoint name"):
        choose_checkpoint(ckpt)


# ----------------------------------------------------------------------------- atomic re-save
class Killed(BaseException):
    """Stands in for SIGKILL."""


@pytest.mark.parametrize("at", ["folder rename", "latest", "removing the old folder"])
def test_resaving_a_step_survives_a_crash_at_any_point(done, tmp_path, shards, monkeypatch, at):
    """Rerunning the finished job saves step 6 again (as step_00000006.1): kill it when the
    new folder is renamed into place, when `latest` is replaced, or before the old folder
    goes. Each time a complete step-6 checkpoint is chosen without any fallback, and the
    next run leaves one step-6 folder."""
    d, ckpt, losses = _copy(done, tmp_path)
    real_replace, real_prune = os.replace, ck._prune

    def dying_replace(src, dst, *a, **k):
        name = os.path.basename(os.fspath(dst))
        if (at == "folder rename" and name.startswith("step_00000006.")) or (at == "latest" and name == "latest"):
            raise Killed
        return real_replace(src, dst, *a, **k)

    def dying_prune(*a, **k):
        raise Killed

    monkeypatch.setattr(ck.os, "replace", dying_replace)
    monkeypatch.setattr(ck, "_prune", dying_prune if at == "removing the old folder" else real_prune)
    with pytest.raises(Killed):
        train(_cfg(d, shards))
    monkeypatch.setattr(ck.os, "replace", real_replace)
    monkeypatch.setattr(ck, "_prune", real_prune)
    tag = choose_checkpoint(ckpt, warn=pytest.fail)  # `latest` names a good folder: no warning
    assert ck.parse_name(tag)[0] == 6
    assert train(_cfg(d, shards))["losses"] == []  # nothing left to train: not a restart
    six = [p.name for p in ckpt.glob("step_00000006*")]
    assert six == [latest_tag(ckpt)] and not list(ckpt.glob(".tmp-*"))
    assert [r["loss"] for r in read_jsonl(d / "run" / "metrics.jsonl")] == losses


# ----------------------------------------------------------------------------- non-finite
class _NanGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return g * float("nan")


def test_non_finite_weights_are_never_saved(tmp_path, shards):
    def nan_grads_in_step_2(step, loss):  # a finite loss whose gradients are NaN
        return _NanGrad.apply(loss) if step == 1 else loss

    # ZeRO-1/2 skip a step whose gradients overflow; ZeRO-0 applies it
    with pytest.raises(NonFiniteWeightsError, match="step 2"):
        train(_cfg(tmp_path, shards, "train.steps=3", "train.save_every=1", "parallel.zero_stage=0"),
              loss_hook=nan_grads_in_step_2)
    ckpt = tmp_path / "run" / "checkpoints"
    assert latest_tag(ckpt) == "step_00000001"
    assert sorted(p.name for p in ckpt.iterdir() if p.is_dir()) == ["step_00000001"]


def test_diverging_router_is_a_skipped_micro_batch_not_a_crash(tmp_path, shards):
    """lr=1e30 with the cosine router: NaN probabilities used to stop torch.bernoulli."""
    with pytest.raises(NonFiniteLossError, match="non-finite losses in a row"):
        train(_cfg(tmp_path, shards, "optim.lr=1e30", "optim.warmup_steps=0", "model.chunk.router=cosine",
                   "train.save_every=0"))
    assert not (tmp_path / "run" / "checkpoints" / "latest").exists()


def test_manifest_lists_every_file_and_the_trainer_state_is_json(done):
    d, _ = done
    folder = d / "run" / "checkpoints" / "step_00000006"
    listed = json.loads((folder / "manifest.json").read_text())["files"]
    assert set(listed) == {p.name for p in folder.iterdir()} - {"manifest.json"}
    state = json.loads((folder / "trainer_rank00000.json").read_text())
    assert state["step"] == 6 and not list(folder.glob("trainer_rank*.pt"))


@pytest.mark.parametrize("stage", [0, 3])
def test_resume_under_each_zero_stage_loads_safely_and_reproduces_losses(tmp_path, shards, stage):
    """ZeRO-1 is covered by test_train_resume.py (ZeRO-2 writes the same files); ZeRO-0 and
    ZeRO-3 write other ones (optimizer in the model states; partitioned model states), all
    read through the safe loader."""
    full = train(_cfg(tmp_path / "full", shards, f"parallel.zero_stage={stage}"))["losses"]
    part = _cfg(tmp_path / "part", shards, f"parallel.zero_stage={stage}", "train.steps=3")
    train(part)
    resumed = train(_cfg(tmp_path / "part", shards, f"parallel.zero_stage={stage}"))["losses"]
    assert resumed == full[3:]
