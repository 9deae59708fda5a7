"""Kill-and-resume equals an uninterrupted run; a crash mid-save leaves `latest` on the
previous complete checkpoint; non-finite losses are skipped, counted, and stop the run."""
import math

import pytest

from conceptvlm.checkpoint import latest_tag
from conceptvlm.logging_utils import read_jsonl
from conceptvlm.train import NonFiniteLossError, train
from conceptvlm.train_config import load_train_config
from train_helpers import text_shards, train_yaml


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return text_shards(tmp_path_factory.mktemp("shards"))


class Killed(BaseException):
    """Stands in for SIGKILL: nothing after it runs (not even `except Exception`)."""


def _cfg(d, shards, *extra):
    d.mkdir(exist_ok=True)
    # cosine router: training samples boundaries, so equality also needs the RNG state back
    return load_train_config(train_yaml(d / "t.yaml", shards), ["train.steps=6", "train.save_every=3", *extra])


def kill_at_step_5(step, loss):  # `step` = optimizer steps done: dies inside step 5
    if step == 4:
        raise Killed
    return loss


def test_kill_and_resume_reproduces_uninterrupted_losses(tmp_path, shards):
    full = train(_cfg(tmp_path / "full", shards))["losses"]
    with pytest.raises(Killed):
        train(_cfg(tmp_path / "part", shards), loss_hook=kill_at_step_5)
    assert latest_tag(tmp_path / "part" / "run" / "checkpoints") == "step_00000003"
    resumed = train(_cfg(tmp_path / "part", shards))
    assert resumed["losses"] == full[3:]  # exactly, not approximately
    logged = read_jsonl(tmp_path / "part" / "run" / "metrics.jsonl")  # rows after step 3 were replaced
    assert [(r["step"], r["loss"]) for r in logged] == list(zip(range(1, 7), full))


def test_bf16_kill_and_resume_reproduces_uninterrupted_losses(tmp_path, shards):
    """bf16 weights with DeepSpeed's float32 master copy in the ZeRO optimizer state: the
    master copy must come back too, or every update after the resume drifts."""
    full = train(_cfg(tmp_path / "full", shards, "parallel.precision=bf16"))["losses"]
    with pytest.raises(Killed):
        train(_cfg(tmp_path / "part", shards, "parallel.precision=bf16"), loss_hook=kill_at_step_5)
    resumed = train(_cfg(tmp_path / "part", shards, "parallel.precision=bf16"))
    assert resumed["losses"] == full[3:]


def test_crash_mid_save_keeps_latest_on_the_last_complete_checkpoint(tmp_path, shards, monkeypatch):
    import conceptvlm.checkpoint as ck

    real = ck.write_manifest

    def dying_manifest(folder):
        if "step_00000006" in str(folder):
            raise Killed  # dies after every file was written, before the manifest and the renames
        return real(folder)

    monkeypatch.setattr(ck, "write_manifest", dying_manifest)
    with pytest.raises(Killed):
        train(_cfg(tmp_path / "r", shards))
    monkeypatch.setattr(ck, "write_manifest", real)
    ckpt = tmp_path / "r" / "run" / "checkpoints"
    assert latest_tag(ckpt) == "step_00000003"
    assert (ckpt / ".tmp-step_00000006").is_dir() and not (ckpt / "step_00000006").exists()
    resumed = train(_cfg(tmp_path / "r", shards))  # resumes from step 3, rewrites step 6
    assert resumed["steps"] == 6 and len(resumed["losses"]) == 3
    assert latest_tag(ckpt) == "step_00000006" and not (ckpt / ".tmp-step_00000006").exists()


def test_non_finite_loss_skips_counts_and_stops(tmp_path, shards):
    def one_nan(step, loss):
        return loss * float("nan") if step == 1 and not one_nan.done and not setattr(one_nan, "done", True) else loss

    one_nan.done = False
    result = train(_cfg(tmp_path / "a", shards, "train.save_every=0"), loss_hook=one_nan)
    assert result["steps"] == 6 and all(math.isfinite(x) for x in result["losses"])
    rows = read_jsonl(tmp_path / "a" / "run" / "metrics.jsonl")
    assert rows[-1]["nonfinite_skipped"] == 1

    def always_nan_from_3(step, loss):
        return loss * float("inf") if step >= 3 else loss

    with pytest.raises(NonFiniteLossError, match=r"3 non-finite losses in a row at step 3"):
        train(_cfg(tmp_path / "b", shards, "train.save_every=0", "train.max_nonfinite_in_row=3"),
              loss_hook=always_nan_from_3)
