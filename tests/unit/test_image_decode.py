"""One decode path: a shard image and the same file given to ImageProcessor become the same tensor;
the pixel limit is checked from the header, before anything is decoded."""
from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image, ImageFile

from conceptvlm.data.decode import BACKGROUND, ImageError, decode_image
from conceptvlm.data.pipeline import DataConfig, Source, build_loader
from conceptvlm.data.tokenizer import load_tokenizer
from conceptvlm.vision import ImageProcessor, VisionTower, tiny_vision_config

TOK = load_tokenizer(None)


def _encode(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def _gradient(w: int = 40, h: int = 24) -> np.ndarray:
    x = np.linspace(0, 1, w)[None, :] * np.ones((h, 1))
    return x


def odd_images() -> dict[str, bytes]:
    g = _gradient()
    rgb = np.stack([g * 255, (1 - g) * 255, np.full_like(g, 80)], -1).astype(np.uint8)
    alpha = (g * 255).astype(np.uint8)
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: rotate 90 degrees clockwise to display
    palette = Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    palette.info["transparency"] = 0
    return {
        "gray16.png": _encode(Image.fromarray((g * 65535).astype(np.uint16))),
        "rgba.png": _encode(Image.fromarray(np.dstack([rgb, alpha]), "RGBA")),
        "la.png": _encode(Image.fromarray(np.dstack([rgb[..., 0], alpha]), "LA")),
        "p_transparent.png": _encode(palette, transparency=0),
        "cmyk.jpg": _encode(Image.fromarray(rgb).convert("CMYK"), "JPEG", quality=95),
        "exif_rotated.jpg": _encode(Image.fromarray(rgb), "JPEG", quality=95, exif=exif),
    }


@pytest.fixture(scope="module")
def processor() -> ImageProcessor:
    return ImageProcessor.from_tower(VisionTower(tiny_vision_config()))


def test_shard_reader_and_image_processor_give_equal_tensors(tmp_path, processor):
    images = odd_images()
    with wds.TarWriter(str(tmp_path / "odd.tar")) as sink:
        for i, (name, data) in enumerate(images.items()):
            ext = name.rsplit(".", 1)[1]
            sink.write({"__key__": f"{i:03d}", ext: data, "json": json.dumps({"caption": name}).encode()})
    cfg = DataConfig(seq_len=64, batch_size=len(images), image_tokens_per_image=4, epochs=1, shuffle_buffer=0)
    loader = build_loader([Source(str(tmp_path / "odd.tar"), "caption")], TOK, cfg, image_transform=processor)
    batch = next(iter(loader))
    assert loader.counters.skipped == 0
    expected = torch.stack([processor(data, name=name) for name, data in images.items()])
    torch.testing.assert_close(batch["images"], expected, rtol=0, atol=0)


def test_the_odd_images_decode_as_displayed():
    images = odd_images()
    gray = np.asarray(decode_image(images["gray16.png"], "g"))[..., 0]
    assert abs(gray.mean() - 127.5) < 2 and gray.max() == 255  # scaled, not saturated at 255
    rgba = np.asarray(decode_image(images["rgba.png"], "r"))
    assert tuple(rgba[0, 0]) == BACKGROUND  # fully transparent column: the documented background
    assert decode_image(images["exif_rotated.jpg"], "e").size == (24, 40)  # orientation applied
    cmyk = np.asarray(decode_image(images["cmyk.jpg"], "c"), dtype=int)
    assert abs(cmyk[12, 39, 0] - 255) < 8 and abs(cmyk[12, 0, 1] - 255) < 8  # colours survive CMYK


def test_pixel_limit_is_checked_before_decoding(monkeypatch, tmp_path, processor):
    huge = _encode(Image.new("1", (10_000, 10_000)))  # 100 megapixels in ~12 KB
    assert len(huge) < 20_000
    decoded = []
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: decoded.append(self.size))
    with pytest.raises(ImageError, match="10000x10000 exceeds the limit") as info:
        decode_image(huge, "bomb.png")
    assert info.value.kind == "too_large"
    with pytest.raises(ImageError, match="bomb.png: 10000x10000 exceeds"):
        processor(huge, name="bomb.png")
    with wds.TarWriter(str(tmp_path / "bomb.tar")) as sink:
        sink.write({"__key__": "bomb", "png": huge, "txt": b"a caption"})
        sink.write({"__key__": "fine", "png": _encode(Image.new("RGB", (8, 8))), "txt": b"a caption"})
    cfg = DataConfig(seq_len=64, batch_size=1, image_tokens_per_image=4, image_size=16, epochs=1, shuffle_buffer=0)
    loader = build_loader([Source(str(tmp_path / "bomb.tar"), "caption")], TOK, cfg)  # default transform
    monkeypatch.undo()  # the good image must decode
    monkeypatch.setattr(ImageFile.ImageFile, "load", _spy(ImageFile.ImageFile.load, decoded))
    assert len(list(loader)) == 1
    assert loader.counters["skipped/too_large"] == 1
    assert set(decoded) == {(8, 8)}  # only the good image was ever decoded


def _spy(load, sizes: list):
    def spied(self):
        sizes.append(self.size)
        return load(self)
    return spied


def test_formats_outside_the_allow_list_are_not_opened():
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n"
    with pytest.raises(ImageError, match="not a recognised image format"):
        decode_image(eps, "x.jpg")
