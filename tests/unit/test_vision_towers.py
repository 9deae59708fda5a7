"""Vision towers: local checkpoints reproduce in-memory features; layer, class token, freezing."""

from __future__ import annotations

import json

import open_clip
import pytest
import safetensors.torch
import timm
import torch

from conceptvlm.vision import (
    CheckpointError,
    ImageProcessor,
    VisionConfig,
    VisionTower,
    build_vision,
    tiny_vision_config,
)

TINY_TIMM = dict(patch_size=8, embed_dim=64, depth=3, num_heads=2)
# A CLIP small enough to build in milliseconds: 32x32 input, 8x8 patches, 2 blocks.
TINY_CLIP = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "patch_size": 8, "head_width": 16},
    "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 16, "heads": 2, "layers": 1},
}


def timm_config(**overrides) -> VisionConfig:
    fields = dict(name="vit_tiny_patch16_224", image_size=64, feature_layer=-2,
                  freeze="all", model_kwargs=dict(TINY_TIMM))
    fields.update(overrides)
    return VisionConfig(**fields)


def timm_reference(num_classes: int = 10) -> torch.nn.Module:
    """The full timm model a user would have trained: with its classifier head."""
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=num_classes,
                             img_size=64, **TINY_TIMM).eval()


def timm_features(model: torch.nn.Module, x: torch.Tensor, layer: int) -> torch.Tensor:
    return model.forward_intermediates(x, indices=[layer % len(model.blocks)], norm=False,
                                       output_fmt="NLC", intermediates_only=True)[0]


@pytest.fixture(scope="module")
def tiny_clip_name(tmp_path_factory) -> str:
    """Register the tiny CLIP as a named open_clip config, the way users add custom towers."""
    path = tmp_path_factory.mktemp("open_clip_cfg") / "conceptvlm-test-tiny-clip.json"
    path.write_text(json.dumps(TINY_CLIP))
    open_clip.add_model_config(path)
    return "conceptvlm-test-tiny-clip"


@pytest.fixture
def images() -> torch.Tensor:
    return torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("layout", ["safetensors", "pt_wrapped", "bin_module_prefix"])
def test_saved_timm_tower_gives_in_memory_features(tmp_path, images, layout):
    ref = timm_reference()
    state = ref.state_dict()  # includes head.* (a classifier the tower does not build)
    if layout == "safetensors":
        path = tmp_path / "vit.safetensors"
        safetensors.torch.save_file(state, str(path))
    elif layout == "pt_wrapped":
        path = tmp_path / "vit.pt"
        torch.save({"state_dict": state, "epoch": 3}, path)
    else:
        path = tmp_path / "pytorch_model.bin"
        torch.save({f"module.{k}": v for k, v in state.items()}, path)

    tower = VisionTower(timm_config(checkpoint=str(path))).eval()
    with torch.no_grad():
        got = tower(images)
        want = timm_features(ref, images, -2)
    assert got.shape == (2, 64, 64)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


@pytest.mark.parametrize("feature_layer,keep_cls", [(-1, False), (-2, True)])
def test_saved_open_clip_tower_gives_in_memory_features(tmp_path, tiny_clip_name, feature_layer, keep_cls):
    torch.manual_seed(0)
    clip = open_clip.create_model(tiny_clip_name, pretrained=None, load_weights=False).eval()
    path = tmp_path / "open_clip_full.pt"
    torch.save(clip.state_dict(), path)  # visual.* next to the text tower's keys

    config = VisionConfig(name=tiny_clip_name, backend="open_clip", checkpoint=str(path),
                          feature_layer=feature_layer, keep_cls_token=keep_cls)
    tower = VisionTower(config).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        got = tower(x)
        ref = clip.visual.forward_intermediates(x, indices=[feature_layer % 2], output_fmt="NLC",
                                                intermediates_only=True, output_extra_tokens=True)
    want = ref["image_intermediates"][0]
    if keep_cls:
        want = torch.cat([ref["image_intermediates_prefix"][0], want], dim=1)
    assert got.shape == (2, 16 + keep_cls, 32) and tower.grid == (4, 4) and tower.width == 32
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


def test_open_clip_visual_only_safetensors_via_model_kwargs(tmp_path):
    """A custom open_clip tower given inline (no registered config), weights saved from `visual`."""
    torch.manual_seed(0)
    kwargs = {k: TINY_CLIP[k] for k in ("embed_dim", "vision_cfg", "text_cfg")}
    clip = open_clip.create_model("ViT-B-32", pretrained=None, load_weights=False, **kwargs).eval()
    path = tmp_path / "visual.safetensors"
    safetensors.torch.save_file(clip.visual.state_dict(), str(path))

    config = VisionConfig(name="ViT-B-32", backend="open_clip", checkpoint=str(path),
                          feature_layer=-1, model_kwargs=kwargs)
    tower, processor = build_vision(config)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        want = clip.visual.forward_intermediates(x, indices=[1], output_fmt="NLC",
                                                 intermediates_only=True)["image_intermediates"][0]
        torch.testing.assert_close(tower(x), want, rtol=0, atol=1e-6)
    # The processor uses open_clip's own preprocessing: CLIP mean/std, the tower's size.
    white = processor(_white_image())
    mean = torch.tensor(open_clip.OPENAI_DATASET_MEAN)
    std = torch.tensor(open_clip.OPENAI_DATASET_STD)
    assert white.shape == (3, 32, 32)
    torch.testing.assert_close(white[:, 0, 0], (1 - mean) / std, rtol=0, atol=1e-5)


def test_mismatched_checkpoint_error_names_file_and_keys(tmp_path):
    path = tmp_path / "other_vit.safetensors"
    other = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64, patch_size=8,
                              embed_dim=32, depth=3, num_heads=2)
    safetensors.torch.save_file(other.state_dict(), str(path))
    with pytest.raises(CheckpointError, match="other_vit.safetensors.*shape mismatch"):
        VisionTower(timm_config(checkpoint=str(path)))

    partial = tmp_path / "partial.pt"
    state = timm_reference().state_dict()
    del state["blocks.2.mlp.fc1.weight"]
    torch.save(state, partial)
    with pytest.raises(CheckpointError, match=r"partial.pt.*1 missing key\(s\): blocks.2.mlp.fc1.weight"):
        VisionTower(timm_config(checkpoint=str(partial)))


def test_missing_or_unreadable_checkpoint_names_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.safetensors"):
        VisionTower(timm_config(checkpoint=str(tmp_path / "nowhere.safetensors")))
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="junk.pt"):
        VisionTower(timm_config(checkpoint=str(junk)))


def test_checkpoint_position_embedding_is_resampled_to_a_new_image_size(tmp_path, images):
    path = tmp_path / "vit64.safetensors"
    safetensors.torch.save_file(timm_reference().state_dict(), str(path))
    tower = VisionTower(timm_config(checkpoint=str(path), image_size=96))
    assert tower.grid == (12, 12)
    assert tower(torch.zeros(1, 3, 96, 96)).shape == (1, 144, 64)


@pytest.mark.parametrize("feature_layer,keep_cls,blocks_used", [
    (-1, False, 3), (-2, False, 2), (0, True, 1), (-3, True, 1),
])
def test_feature_layer_and_class_token_shapes(images, feature_layer, keep_cls, blocks_used):
    tower = VisionTower(timm_config(feature_layer=feature_layer, keep_cls_token=keep_cls))
    out = tower(images)
    assert tower.grid == (8, 8) and tower.num_patches == 64 and tower.width == 64
    assert tower.num_tokens == 64 + keep_cls
    assert out.shape == (2, tower.num_tokens, tower.width)
    assert len(tower.blocks) == blocks_used  # later blocks are pruned away


def test_kept_class_token_is_the_models_class_token(images):
    ref = timm_reference()
    tower = VisionTower(timm_config(keep_cls_token=True, feature_layer=-1))
    tower.model.load_state_dict({k: v for k, v in ref.state_dict().items() if not k.startswith("head")},
                                strict=False)
    with torch.no_grad():
        patches, prefix = ref.forward_intermediates(images, indices=[2], return_prefix_tokens=True,
                                                    output_fmt="NLC", intermediates_only=True)[0]
        out = tower(images)
    torch.testing.assert_close(out[:, 0], prefix[:, 0], rtol=0, atol=1e-6)
    torch.testing.assert_close(out[:, 1:], patches, rtol=0, atol=1e-6)


def test_feature_layer_out_of_range():
    with pytest.raises(ValueError, match="feature_layer=-4 is out of range.*3 blocks"):
        VisionTower(timm_config(feature_layer=-4))


def test_freeze_last_n_trains_exactly_the_last_blocks(images):
    # 3 blocks, features from the penultimate: blocks 0 and 1 are used, block 1 trains.
    tower = VisionTower(timm_config(freeze="last_n", train_last_n=1))
    trainable = {n for n, p in tower.named_parameters() if p.requires_grad}
    expected = {f"model.{n}" for n, _ in tower.model.blocks[1].named_parameters(prefix="blocks.1")}
    assert trainable == expected and len(expected) > 0

    tower(images).square().mean().backward()
    for name, p in tower.named_parameters():
        assert (p.grad is not None) == (name in expected), name


def test_freeze_all_and_none():
    frozen = VisionTower(timm_config(freeze="all")).train()
    assert not any(p.requires_grad for p in frozen.parameters())
    assert not frozen.model.training  # a frozen tower stays deterministic under .train()
    trainable = VisionTower(timm_config(freeze="none")).train()
    assert all(p.requires_grad for p in trainable.parameters()) and trainable.model.training


def test_train_last_n_larger_than_the_used_blocks():
    with pytest.raises(ValueError, match="train_last_n=3 .* only 2 block"):
        VisionTower(timm_config(freeze="last_n", train_last_n=3))


def test_wrong_image_size_and_unsupported_models():
    tower = VisionTower(tiny_vision_config())
    with pytest.raises(ValueError, match=r"expects images of shape \[N, 3, 64, 64\]"):
        tower(torch.zeros(1, 3, 32, 32))
    with pytest.raises(ValueError, match="not a ViT-style tower"):
        VisionTower(VisionConfig(name="resnet10t", feature_layer=-1))
    with pytest.raises(ValueError, match="cannot build timm model 'no_such_vit'"):
        VisionTower(VisionConfig(name="no_such_vit"))


def test_tiny_config_builds_the_demo_tower_and_processor():
    tower, processor = build_vision(tiny_vision_config())
    assert isinstance(processor, ImageProcessor) and processor.image_size == tower.image_size == (64, 64)
    assert tower.grid == (8, 8) and tower.width == 64 and len(tower.blocks) == 2
    assert tower(processor.batch([_white_image()])).shape == (1, 64, 64)


def _white_image():
    from PIL import Image

    return Image.new("RGB", (40, 30), (255, 255, 255))


def test_open_clip_tower_with_a_timm_trunk(tmp_path):
    """open_clip towers such as SigLIP or EVA wrap a timm trunk; weights load via `visual.trunk.*`."""
    torch.manual_seed(0)
    kwargs = {
        "embed_dim": 32,
        "vision_cfg": {"timm_model_name": "test_vit", "timm_model_pretrained": False,
                       "timm_pool": "", "timm_proj": "linear", "image_size": 160},
        "text_cfg": TINY_CLIP["text_cfg"],
    }
    clip = open_clip.create_model("ViT-B-32", pretrained=None, load_weights=False, **kwargs).eval()
    path = tmp_path / "siglip_like.pt"
    torch.save({"state_dict": clip.state_dict()}, path)

    config = VisionConfig(name="ViT-B-32", backend="open_clip", checkpoint=str(path), keep_cls_token=True,
                          freeze="last_n", train_last_n=2, model_kwargs=kwargs)
    tower, processor = build_vision(config)
    assert tower.grid == (10, 10) and tower.width == 64 and len(tower.blocks) == 5
    assert processor.image_size == tower.image_size == (160, 160)
    trainable = {n.split(".")[2] for n, p in tower.named_parameters() if p.requires_grad}
    assert trainable == {"3", "4"}  # model.blocks.{3,4}.*: the last two blocks in use
    x = torch.randn(1, 3, 160, 160)
    with torch.no_grad():
        ref = clip.visual.forward_intermediates(x, indices=[4], output_fmt="NLC", intermediates_only=True,
                                                output_extra_tokens=True)
        want = torch.cat([ref["image_intermediates_prefix"][0][:, :1], ref["image_intermediates"][0]], 1)
        torch.testing.assert_close(tower.eval()(x), want, rtol=0, atol=1e-6)

    with pytest.raises(ValueError, match="built for 160x160 images, not image_size=64"):
        VisionTower(VisionConfig(name="ViT-B-32", backend="open_clip", image_size=64, model_kwargs=kwargs))


def _sincos_reference(rows: int, cols: int, dim: int) -> torch.Tensor:
    """Slow, obvious 2D sin-cos table: per patch (r, c), [sin(r w), sin(c w), cos(r w), cos(c w)]
    over dim/4 frequencies w = 10000^(-i / (dim/4))."""
    q = dim // 4
    w = [10000.0 ** (-i / q) for i in range(q)]
    out = torch.zeros(rows * cols, dim)
    for r in range(rows):
        for c in range(cols):
            out[r * cols + c] = torch.tensor([*(torch.sin(torch.tensor(r * x)) for x in w),
                                              *(torch.sin(torch.tensor(c * x)) for x in w),
                                              *(torch.cos(torch.tensor(r * x)) for x in w),
                                              *(torch.cos(torch.tensor(c * x)) for x in w)])
    return out


def test_sincos2d_starts_a_random_timm_tower_at_the_2d_table(images):
    tower = VisionTower(timm_config(pos_embed_init="sincos2d", freeze="none"))
    table = tower.model.pos_embed[0]  # [class + 64 patches, 64]
    assert torch.equal(table[0], torch.zeros(64))  # the class position carries no place
    torch.testing.assert_close(table[1:], _sincos_reference(8, 8, 64), atol=1e-5, rtol=0)
    assert tower.model.pos_embed.requires_grad  # a starting point, still learned
    default = VisionTower(timm_config())
    assert default.model.pos_embed.std() < 0.05  # the library's own draw


def test_sincos2d_starts_a_random_open_clip_tower_at_the_2d_table(tiny_clip_name):
    tower = VisionTower(VisionConfig(name=tiny_clip_name, backend="open_clip", feature_layer=-1,
                                     pos_embed_init="sincos2d"))
    table = tower.model.positional_embedding  # [class + 16 patches, 32]
    assert torch.equal(table[0], torch.zeros(32))
    torch.testing.assert_close(table[1:], _sincos_reference(4, 4, 32), atol=1e-5, rtol=0)


@pytest.mark.parametrize("weights", [dict(checkpoint="vit.safetensors"), dict(name="hf-hub:timm/vit_tiny")])
def test_sincos2d_is_refused_with_pretrained_weights(weights):
    with pytest.raises(ValueError, match="pos_embed_init='sincos2d' initialises a tower built with random"):
        timm_config(pos_embed_init="sincos2d", **weights)
    with pytest.raises(ValueError, match="pos_embed_init"):
        timm_config(pos_embed_init="learned")
