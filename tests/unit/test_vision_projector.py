"""Projector: reductions set the image token count; pixel-shuffle and pooling do what they say."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conceptvlm.vision import Projector, VisionTower, build_vision, tiny_vision_config


@pytest.mark.parametrize("kind", ["mlp", "linear"])
@pytest.mark.parametrize("reduction,factor,tokens,grid", [
    ("none", 1, 48, (6, 8)),
    ("pixel_shuffle", 2, 12, (3, 4)),
    ("avg_pool", 2, 12, (3, 4)),
])
def test_shapes_for_each_reduction(kind, reduction, factor, tokens, grid):
    proj = Projector(16, 24, (6, 8), kind=kind, reduction=reduction, factor=factor)
    out = proj(torch.randn(3, 48, 16))
    assert out.shape == (3, tokens, 24)
    assert proj.tokens_per_image == tokens and proj.output_grid == grid


def test_pixel_shuffle_concatenates_each_r_by_r_neighbourhood():
    proj = Projector(2, 8, (4, 4), kind="linear", reduction="pixel_shuffle", factor=2)
    with torch.no_grad():  # identity projection exposes the shuffled features
        proj.proj.weight.copy_(torch.eye(8))
        proj.proj.bias.zero_()
    x = torch.arange(32.0).reshape(1, 16, 2)  # patch (r, c) holds [2*(4r+c), 2*(4r+c)+1]
    out = proj(x)
    # Output cell (1, 0) covers patches (2,0), (2,1), (3,0), (3,1) in (dy, dx) order.
    patches = [8, 9, 12, 13]
    want = torch.tensor([v for p in patches for v in (2 * p, 2 * p + 1)], dtype=torch.float32)
    torch.testing.assert_close(out[0, 2], want)


def test_avg_pool_matches_torch_avg_pool2d():
    proj = Projector(5, 5, (4, 6), kind="linear", reduction="avg_pool", factor=2)
    with torch.no_grad():
        proj.proj.weight.copy_(torch.eye(5))
        proj.proj.bias.zero_()
    x = torch.randn(2, 24, 5)
    grid_NDHW = x.transpose(1, 2).reshape(2, 5, 4, 6)
    want = F.avg_pool2d(grid_NDHW, 2).flatten(2).transpose(1, 2)
    torch.testing.assert_close(proj(x), want)


def test_mlp_is_linear_gelu_linear():
    proj = Projector(16, 32, (2, 2))
    assert [type(m).__name__ for m in proj.proj] == ["Linear", "GELU", "Linear"]
    assert proj.proj[0].in_features == 16 and proj.proj[2].out_features == 32


def test_grid_not_divisible_by_factor():
    with pytest.raises(ValueError, match="patch grid 7x8 is not divisible by reduction factor 2"):
        Projector(16, 32, (7, 8), reduction="pixel_shuffle", factor=2)
    with pytest.raises(ValueError, match="needs factor >= 2"):
        Projector(16, 32, (8, 8), reduction="avg_pool", factor=1)


def test_wrong_input_shape():
    with pytest.raises(ValueError, match=r"expects \[N, 16, 8\].*got \[1, 15, 8\]"):
        Projector(8, 8, (4, 4))(torch.randn(1, 15, 8))


def test_for_tower_follows_the_config_and_keeps_a_class_token():
    tower = VisionTower(tiny_vision_config(keep_cls_token=True))
    proj = Projector.for_tower(tower, lm_width=48)
    assert proj.tokens_per_image == 65
    assert proj(tower(torch.zeros(1, 3, 64, 64))).shape == (1, 65, 48)


def test_tower_plus_projector_end_to_end_trains():
    tower, processor = build_vision(tiny_vision_config(reduction="pixel_shuffle", reduction_factor=2))
    proj = Projector.for_tower(tower, lm_width=32)
    from PIL import Image

    pixels = processor.batch([Image.new("RGB", (50, 70), "blue"), Image.new("L", (1, 1))])
    out = proj(tower(pixels))
    assert out.shape == (2, proj.tokens_per_image, 32) and proj.tokens_per_image == 16
    out.square().mean().backward()
    assert tower.model.patch_embed.proj.weight.grad is not None  # tiny tower trains (freeze='none')
