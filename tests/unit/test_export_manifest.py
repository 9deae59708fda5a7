"""Exported model folders carry a manifest and are checked against it when loaded: damage
stops with one line, while what users legitimately do to an export (add a README, keep it
in a Hugging Face cache where files are symlinks to blobs, load one from before manifests)
still works."""
import shutil

import pytest
import torch

from conceptvlm.data.tokenizer import ByteTokenizer
from conceptvlm.errors import UserError
from conceptvlm.export import load_exported, load_weights, save_model_dir
from conceptvlm.manifest import MANIFEST, verify_manifest
from helpers import tiny_vlm


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    vlm = tiny_vlm(dtype=torch.float32)
    return save_model_dir(vlm.state_dict(), vlm.config, tmp_path_factory.mktemp("exp") / "export", ByteTokenizer()), vlm


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_an_export_has_a_manifest_and_loads_the_same_weights(exported):
    path, vlm = exported
    assert (path / MANIFEST).is_file() and verify_manifest(path) is None
    model, tok = load_exported(path)
    assert tok is not None
    for k, v in vlm.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k


def test_flipped_bytes_and_truncation_are_caught_by_the_manifest(exported, tmp_path):
    path, _ = exported
    flipped = _copy(path, tmp_path / "flipped")
    data = bytearray((flipped / "model.safetensors").read_bytes())
    data[-5] ^= 0x01  # one bit in the last tensor: safetensors alone would load it
    (flipped / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(UserError, match="model.safetensors does not match its sha256"):
        load_weights(flipped)
    cut = _copy(path, tmp_path / "cut")
    (cut / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="model.safetensors has .* bytes, the manifest says"):
        load_exported(cut)
    gone = _copy(path, tmp_path / "gone")
    (gone / "model.safetensors").unlink()
    with pytest.raises(UserError, match="holds no exported model"):
        load_exported(gone)
    with pytest.raises(UserError, match="file missing: model.safetensors"):
        load_weights(gone)


def test_added_files_edited_configs_symlinked_blobs_and_old_exports_still_load(exported, tmp_path):
    path, vlm = exported
    extra = _copy(path, tmp_path / "extra")
    (extra / "README.md").write_text("# my model\n")
    (extra / "config.yaml").write_text((extra / "config.yaml").read_text() + "# edited by hand\n")
    load_exported(extra)
    # a hub cache snapshot: every file a symlink into blobs/
    blobs, snap = tmp_path / "cache" / "blobs", tmp_path / "cache" / "snapshots" / "abc"
    blobs.mkdir(parents=True)
    snap.mkdir(parents=True)
    for i, f in enumerate(sorted(path.iterdir())):
        shutil.copy(f, blobs / f"blob{i}")
        (snap / f.name).symlink_to(blobs / f"blob{i}")
    load_exported(snap)
    # weights whose symlink is broken are named
    (snap / "model.safetensors").unlink()
    (snap / "model.safetensors").symlink_to(blobs / "missing")
    with pytest.raises(UserError, match="not a regular file: model.safetensors"):
        load_weights(snap)
    old = _copy(path, tmp_path / "old")
    (old / MANIFEST).unlink()
    model, _ = load_exported(old)
    assert torch.equal(next(iter(model.state_dict().values())), next(iter(vlm.state_dict().values())))


def test_training_checkpoints_stay_strict_and_manifest_names_stay_inside(exported, tmp_path):
    import json

    path, _ = exported
    strict = _copy(path, tmp_path / "strict")
    (strict / "stray.bin").write_bytes(b"x")
    assert verify_manifest(strict) == "file not in the manifest: stray.bin"
    assert verify_manifest(strict, only=["model.safetensors"]) is None
    # a manifest naming a file outside the folder vouches for nothing
    (tmp_path / "outside").write_bytes(b"y")
    manifest = json.loads((strict / MANIFEST).read_text())
    manifest["files"]["../outside"] = {"bytes": 1, "sha256": "0" * 64}
    (strict / MANIFEST).write_text(json.dumps(manifest))
    assert verify_manifest(strict, only=["../outside"]) == "file missing: ../outside"
    assert verify_manifest(strict, only=["elsewhere.bin"]) == "elsewhere.bin is not in the manifest"
