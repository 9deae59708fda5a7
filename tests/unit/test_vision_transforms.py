"""ImageProcessor: every input kind and mode becomes the tower's input; bad input names itself."""

from __future__ import annotations

import io
import time

import numpy as np
import pytest
import torch
from PIL import Image

from conceptvlm.vision import ImageError, ImageProcessor, VisionTower, tiny_vision_config


@pytest.fixture(scope="module")
def processor() -> ImageProcessor:
    return ImageProcessor.from_tower(VisionTower(tiny_vision_config()))


def encode(img: Image.Image, fmt: str = "PNG", **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kwargs)
    return buf.getvalue()


def gradient(size=(48, 32)) -> Image.Image:
    w, h = size
    arr = np.zeros((h, w, 3), dtype=np.uint8)
    arr[..., 0] = np.linspace(0, 255, w, dtype=np.uint8)[None, :]
    arr[..., 1] = np.linspace(0, 255, h, dtype=np.uint8)[:, None]
    return Image.fromarray(arr)


def test_uses_the_towers_own_data_config(processor):
    # timm's data config for this ViT: 64x64 after a 0.9 center crop, mean = std = 0.5.
    assert processor.image_size == (64, 64)
    white = processor(Image.new("RGB", (10, 10), "white"))
    torch.testing.assert_close(white, torch.ones(3, 64, 64))


@pytest.mark.parametrize("mode", ["RGBA", "LA", "L", "1", "P", "CMYK", "YCbCr", "I;16", "I", "F"])
def test_any_mode_becomes_rgb(processor, mode):
    img = gradient().convert("RGBA" if mode == "LA" else "RGB")
    img = img.convert(mode) if mode not in ("I;16", "I", "F") else Image.new(mode, (48, 32))
    rgb = processor.load(img)
    assert rgb.mode == "RGB" and rgb.size == (48, 32)
    out = processor(img)
    assert out.shape == (3, 64, 64) and out.dtype == torch.float32 and torch.isfinite(out).all()


def test_transparent_pixels_become_white_not_black(processor):
    img = Image.new("RGBA", (4, 4), (255, 0, 0, 0))  # fully transparent red
    assert processor.load(img).getpixel((0, 0)) == (255, 255, 255)
    palette = Image.new("P", (4, 4), 0)
    palette.putpalette([0, 0, 0] * 256)
    palette.info["transparency"] = 0
    assert processor.load(palette).getpixel((0, 0)) == (255, 255, 255)


def test_sixteen_bit_images_are_rescaled_not_clipped(processor):
    arr = np.array([[65535, 32768, 0]], dtype=np.uint16)
    img = Image.fromarray(arr)  # mode I;16
    assert img.mode == "I;16"
    row = [processor.load(img).getpixel((x, 0))[0] for x in range(3)]
    assert row == [255, 128, 0]
    png16 = Image.open(io.BytesIO(encode(img)))  # 16-bit PNGs decode as mode "I"
    assert [processor.load(png16).getpixel((x, 0))[0] for x in range(3)] == [255, 128, 0]


def test_paths_bytes_and_pil_give_the_same_tensor(processor, tmp_path):
    img = gradient()
    path = tmp_path / "grad.png"
    img.save(path)
    from_pil = processor(img)
    torch.testing.assert_close(processor(path), from_pil)
    torch.testing.assert_close(processor(str(path)), from_pil)
    torch.testing.assert_close(processor(encode(img)), from_pil)
    batch = processor.batch([img, path, encode(img)])
    assert batch.shape == (3, 3, 64, 64)
    assert processor.batch([]).shape == (0, 3, 64, 64)


def test_exif_orientation_is_applied(processor):
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    data = encode(Image.new("RGB", (40, 20)), "JPEG", exif=exif)
    assert processor.load(data).size == (20, 40)


def test_tiny_and_huge_images(processor):
    assert processor(Image.new("RGB", (1, 1), "red")).shape == (3, 64, 64)
    assert processor(Image.new("L", (1, 300))).shape == (3, 64, 64)
    # A 6000x4000 JPEG is decoded at reduced scale (draft); a big PIL image is box-reduced.
    jpeg = encode(gradient((6000, 4000)), "JPEG", quality=70)
    big = gradient((5000, 3000))
    start = time.perf_counter()
    assert processor(jpeg).shape == (3, 64, 64)
    assert processor(big).shape == (3, 64, 64)
    assert time.perf_counter() - start < 2.0


def test_too_many_pixels_is_rejected_by_name():
    small_limit = ImageProcessor.from_tower(VisionTower(tiny_vision_config()), max_pixels=10_000)
    with pytest.raises(ImageError, match=r"image poster.png: 200x100 exceeds the limit of 10000 pixels"):
        small_limit(encode(Image.new("RGB", (200, 100))), name="poster.png")


def test_corrupt_file_raises_image_error_naming_the_path(processor, tmp_path):
    path = tmp_path / "broken.jpg"
    path.write_bytes(encode(gradient((256, 256)), "JPEG")[:300])  # truncated mid-scan
    with pytest.raises(ImageError, match="broken.jpg") as info:
        processor(path)
    assert isinstance(info.value, ValueError) and info.value.name == str(path)
    with pytest.raises(ImageError, match="missing.png.*cannot read file"):
        processor(tmp_path / "missing.png")


def test_non_image_bytes_raise_image_error_naming_the_blob(processor):
    blob = b"%PDF-1.7 definitely not pixels" * 10
    with pytest.raises(ImageError, match="image sample-0042.jpg: not a recognised image format"):
        processor(blob, name="sample-0042.jpg")
    with pytest.raises(ImageError, match=r"<300 bytes #1>"):
        processor.batch([gradient(), blob])  # unnamed: the batch position identifies it
    with pytest.raises(ImageError, match="unsupported input type ndarray"):
        processor(np.zeros((4, 4, 3), dtype=np.uint8))
