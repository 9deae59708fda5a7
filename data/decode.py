"""Encoded image bytes -> RGB PIL image: the one decode path of training and inference.

Shard readers (``samples.py``) and ``conceptvlm.vision.ImageProcessor`` both call
:func:`decode_image`, so a model sees the same pixels when it trains on a shard and when
it is asked about the same file later. What it does, in order:

1. **Header only**: identify the format (raster formats in ``FORMATS`` only; PIL would
   otherwise also open e.g. EPS, which runs Ghostscript) and check ``width * height``
   against ``max_pixels`` *before* any pixel is decoded: a 12 KB PNG can claim 100
   megapixels and cost ~500 MB to decode.
2. **Decode**, JPEG at a reduced scale (``draft``) when the caller only needs
   ``draft_side`` pixels per side; truncated data fails here.
3. **EXIF orientation** applied (phone photos are stored sideways).
4. **To RGB**: alpha (RGBA, LA, PA, palette transparency) is composited on ``BACKGROUND``
   (white, as viewers show transparent images); 16-bit and float images are scaled to 8
   bits (65535 -> 255, never saturated); every other mode (L, 1, P, CMYK, YCbCr, ...)
   through PIL's ``convert("RGB")``.

Failures raise :class:`ImageError` naming the image, with ``kind`` a counter key
(``bad_image``, ``empty_image``, ``too_large``).
"""
from __future__ import annotations

import io
import warnings
from typing import Optional

import numpy as np
from PIL import Image, ImageOps

# PIL's own decompression-bomb threshold (~89 MP): larger inputs are rejected, not decoded.
DEFAULT_MAX_PIXELS = 89_478_485
BACKGROUND = (255, 255, 255)
FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
_ROTATED = (5, 6, 7, 8)  # EXIF orientations that swap width and height


class ImageError(ValueError):
    """An image that cannot be decoded or converted; ``name`` is its path or given name,
    ``kind`` the bad-sample counter key it is skipped under in shard readers."""

    def __init__(self, name: str, reason: str, kind: str = "bad_image") -> None:
        self.name = name
        self.reason = reason
        self.kind = kind
        super().__init__(f"image {name}: {reason}")


def open_image(data: bytes, name: str, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Read the header only: the format is known and the size is within ``max_pixels``."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # we check below
            img = Image.open(io.BytesIO(bytes(data)), formats=FORMATS)
    except Image.UnidentifiedImageError as err:
        raise ImageError(name, "not a recognised image format") from err
    except Image.DecompressionBombError as err:
        raise ImageError(name, f"too large to decode safely ({err})", "too_large") from err
    except (OSError, SyntaxError, ValueError, TypeError, EOFError) as err:
        raise ImageError(name, f"corrupt image header ({type(err).__name__}: {err})") from err
    check_pixels(img, name, max_pixels)
    return img


def check_pixels(img: Image.Image, name: str, max_pixels: int) -> None:
    """``ImageError`` (kind ``too_large`` / ``empty_image``) unless ``0 < w * h <= max_pixels``."""
    if img.width * img.height > max_pixels:
        raise ImageError(name, f"{img.width}x{img.height} exceeds the limit of {max_pixels} pixels", "too_large")
    if img.width == 0 or img.height == 0:
        raise ImageError(name, f"has size {img.width}x{img.height}", "empty_image")


def decode_image_sized(data: bytes, name: str, max_pixels: int = DEFAULT_MAX_PIXELS,
                       draft_side: Optional[int] = None) -> tuple[Image.Image, tuple[int, int]]:
    """Like :func:`decode_image`, plus the full-resolution ``(width, height)`` as displayed
    (EXIF orientation applied): boxes refer to it even when ``draft`` decoded fewer pixels."""
    img = open_image(data, name, max_pixels)
    full = img.size
    try:
        if img.getexif().get(0x0112) in _ROTATED:
            full = (full[1], full[0])
    except Exception:  # an unreadable EXIF block: the orientation step below ignores it too
        pass
    if draft_side:
        # JPEG can decode at 1/2, 1/4, 1/8 scale: huge photos never need full resolution.
        img.draft(None, (draft_side, draft_side))
    return to_rgb_image(img, name), full


def decode_image(data: bytes, name: str, max_pixels: int = DEFAULT_MAX_PIXELS,
                 draft_side: Optional[int] = None) -> Image.Image:
    """Encoded bytes -> RGB image, fully decoded (see the module docstring for the steps)."""
    return decode_image_sized(data, name, max_pixels, draft_side)[0]


def to_rgb_image(img: Image.Image, name: str) -> Image.Image:
    """Decode (if still lazy), apply EXIF orientation, convert to RGB; errors name ``name``."""
    try:
        img.load()  # PIL decodes lazily: truncated data only fails here
        rgb = to_rgb(ImageOps.exif_transpose(img) or img)
    except (OSError, SyntaxError, ValueError, TypeError, EOFError, Image.DecompressionBombError) as err:
        raise ImageError(name, f"corrupt or unsupported image ({type(err).__name__}: {err})") from err
    if rgb is img:
        rgb = rgb.copy()  # never hand the caller's own object on (nor edit its info below)
    rgb.info.pop("exif", None)  # orientation is applied: never apply it twice downstream
    return rgb


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB: alpha composited on ``BACKGROUND``, high bit-depth scaled to 8 bits."""
    if img.mode == "RGB":
        return img
    if img.mode in _SIXTEEN_BIT_MODES or img.mode in ("I", "F"):
        return Image.fromarray(_to_uint8(img)).convert("RGB")  # 2-D uint8 -> mode L
    if img.mode in _ALPHA_MODES or "transparency" in img.info:
        # Plain convert("RGB") drops alpha and exposes whatever colour sits under
        # transparent pixels (often black); white matches how the image is displayed.
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, BACKGROUND + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")  # L, 1, P, CMYK, YCbCr, LAB, HSV


def _to_uint8(img: Image.Image) -> np.ndarray:
    """Rescale a 16/32-bit integer or float single-channel image to uint8."""
    arr = np.nan_to_num(np.asarray(img, dtype=np.float64))
    peak = float(arr.max()) if arr.size else 0.0
    if img.mode in _SIXTEEN_BIT_MODES:
        scale = 65535.0
    elif img.mode == "F" and peak <= 1.0:
        scale = 1.0  # float images in [0, 1]
    elif peak <= 255:
        scale = 255.0  # already 8-bit values in a wide container
    elif peak <= 65535:
        scale = 65535.0  # 16-bit PNGs open as mode "I"
    else:
        scale = peak
    return np.clip(arr * (255.0 / scale), 0, 255).round().astype(np.uint8)
