"""VisionConfig validation: a bad value fails at construction with a message naming the field."""

from __future__ import annotations

import time

import pytest

from conceptvlm.vision import VisionConfig, VisionTower, tiny_vision_config


def test_tiny_config_builds_fast():
    VisionTower(tiny_vision_config())  # first build pays timm's import
    start = time.perf_counter()
    tower = VisionTower(tiny_vision_config())
    assert time.perf_counter() - start < 0.5
    assert tower.image_size == (64, 64) and tower.grid == (8, 8)


def test_overrides_and_path_checkpoint(tmp_path):
    cfg = tiny_vision_config(freeze="last_n", train_last_n=1, checkpoint=tmp_path / "w.safetensors")
    assert cfg.train_last_n == 1 and cfg.checkpoint == str(tmp_path / "w.safetensors")


@pytest.mark.parametrize("fields,message", [
    (dict(name=""), "name must be a non-empty"),
    (dict(backend="jax"), "backend must be one of 'timm', 'open_clip'; got 'jax'"),
    (dict(image_size=0), "image_size must be >= 1"),
    (dict(feature_layer=True), "feature_layer must be an int"),
    (dict(keep_cls_token="yes"), "keep_cls_token must be a bool"),
    (dict(freeze="some"), "freeze must be one of"),
    (dict(freeze="last_n"), "freeze='last_n' needs train_last_n >= 1"),
    (dict(freeze="all", train_last_n=2), "train_last_n=2 is only used with freeze='last_n'"),
    (dict(projector="qformer"), "projector must be one of 'mlp', 'linear'"),
    (dict(reduction="pixel_shuffle"), "needs reduction_factor >= 2"),
    (dict(reduction_factor=2), "has no effect with reduction='none'"),
    (dict(keep_cls_token=True, reduction="avg_pool", reduction_factor=2), "keep_cls_token=True cannot"),
    (dict(model_kwargs=dict(pretrained=True)), "must not set 'pretrained'"),
    (dict(checkpoint=3), "checkpoint must be a local file path"),
])
def test_invalid_values_are_rejected_with_the_field_named(fields, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        VisionConfig(**{"name": "vit_tiny_patch16_224", **fields})
