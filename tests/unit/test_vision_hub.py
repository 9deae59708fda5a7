"""Vision towers by hub name, read offline: a hub-cache layout (models--org--name/snapshots/
REV + refs/main) is populated with a small tower, then loaded by name with HF_HUB_OFFLINE=1
through timm's and open_clip's own hub code."""
from __future__ import annotations

import json

import open_clip
import pytest
import safetensors.torch
import timm
import torch
from timm.models import save_for_hf

from conceptvlm.vision import VisionConfig, VisionTower
from test_vision_towers import TINY_CLIP, TINY_TIMM

REV = "1" * 40


def _snapshot(cache, repo: str):
    root = cache / f"models--{repo.replace('/', '--')}"
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(REV)
    snap = root / "snapshots" / REV
    snap.mkdir(parents=True)
    return snap


@pytest.fixture
def offline_cache(tmp_path, monkeypatch):
    import huggingface_hub.constants as c

    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)  # read at import: patch the live value too
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(cache))
    return cache


def test_timm_hub_name_loads_from_the_offline_cache(offline_cache):
    torch.manual_seed(3)
    ref = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=64, **TINY_TIMM).eval()
    save_for_hf(ref, str(_snapshot(offline_cache, "timm/conceptvlm-tiny-vit")),
                model_args=dict(img_size=64, **TINY_TIMM), safe_serialization=True)
    tower = VisionTower(VisionConfig(name="hf-hub:timm/conceptvlm-tiny-vit", image_size=64, feature_layer=-1)).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        want = ref.forward_intermediates(x, indices=[len(ref.blocks) - 1], norm=False, output_fmt="NLC",
                                         intermediates_only=True)[0]
        assert torch.allclose(tower(x), want, atol=1e-6)
    with pytest.raises(ValueError, match="cannot fetch the weights of 'hf-hub:timm/absent'"):
        VisionTower(VisionConfig(name="hf-hub:timm/absent", image_size=64))


def test_open_clip_model_and_pretrained_tag_load_from_the_offline_cache(offline_cache, tmp_path, monkeypatch):
    path = tmp_path / "conceptvlm-hub-tiny-clip.json"
    path.write_text(json.dumps(TINY_CLIP))
    open_clip.add_model_config(path)
    # The pretrained registry entry a released tag has: weights in a hub repository.
    monkeypatch.setitem(open_clip.pretrained._PRETRAINED, "conceptvlm-hub-tiny-clip",
                        {"acme": open_clip.pretrained._pcfg(hf_hub="acme/tiny-clip/")})
    torch.manual_seed(4)
    clip = open_clip.create_model("conceptvlm-hub-tiny-clip", pretrained=None, load_weights=False).eval()
    safetensors.torch.save_file(clip.state_dict(), str(_snapshot(offline_cache, "acme/tiny-clip")
                                                       / "open_clip_model.safetensors"))
    cfg = VisionConfig(name="conceptvlm-hub-tiny-clip", backend="open_clip", pretrained="acme", feature_layer=-1)
    tower = VisionTower(cfg).eval()
    got = dict(tower.model.named_parameters())["conv1.weight"]
    assert torch.equal(got, clip.visual.conv1.weight)
    with pytest.raises(ValueError, match="Failed to download weights for tag 'acme'"):
        monkeypatch.setitem(open_clip.pretrained._PRETRAINED, "conceptvlm-hub-tiny-clip",
                            {"acme": open_clip.pretrained._pcfg(hf_hub="acme/absent/")})
        VisionTower(cfg)


def test_pretrained_tag_is_for_open_clip_names():
    with pytest.raises(ValueError, match="an open_clip pretrained tag"):
        VisionConfig(name="vit_tiny_patch16_224", pretrained="webli")
    with pytest.raises(ValueError, match="already names the weights"):
        VisionConfig(name="hf-hub:timm/ViT-SO400M-14-SigLIP", backend="open_clip", pretrained="webli")
