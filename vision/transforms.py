"""`ImageProcessor`: any image (PIL, path, bytes; any mode, any size) -> the tower's input tensor.

Resizing, cropping and normalisation come from the tower's own backend (timm's
``create_transform`` on its data config, open_clip's ``image_transform_v2`` on its
``preprocess_cfg``), so the constants always match the weights. This module adds what
those transforms assume has already happened: decoding, mode conversion to RGB, and
turning bad input into one error type, `ImageError`, that names the image.
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Union

import numpy as np
import torch
from PIL import Image, ImageOps

if TYPE_CHECKING:
    from .towers import VisionTower

ImageInput = Union[Image.Image, str, os.PathLike, bytes, bytearray, memoryview]

# PIL's own decompression-bomb threshold (~89 MP): larger inputs are rejected, not decoded.
DEFAULT_MAX_PIXELS = Image.MAX_IMAGE_PIXELS or 89_478_485
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")


class ImageError(ValueError):
    """An image that cannot be decoded or converted; ``name`` is its path or given name."""

    def __init__(self, name: str, reason: str) -> None:
        self.name = name
        self.reason = reason
        super().__init__(f"image {name}: {reason}")


class ImageProcessor:
    """Decode and convert images to RGB, then apply the tower's eval transform.

    ``processor(image) -> [3, H, W]`` float tensor; ``processor.batch(images) -> [N, 3, H, W]``.
    Accepts PIL images, file paths and encoded bytes. Transparent images are composited
    on white; 16-bit and float images are rescaled to 8 bits; JPEG-encoded huge images are
    decoded at reduced scale. Unreadable input raises `ImageError`.
    """

    def __init__(
        self,
        transform: Callable[[Image.Image], torch.Tensor],
        image_size: tuple[int, int],
        max_pixels: int = DEFAULT_MAX_PIXELS,
    ) -> None:
        self.transform = transform
        self.image_size = (int(image_size[0]), int(image_size[1]))
        self.max_pixels = int(max_pixels)

    def __repr__(self) -> str:
        return f"ImageProcessor(image_size={self.image_size}, transform={self.transform})"

    @classmethod
    def from_tower(cls, tower: VisionTower, max_pixels: int = DEFAULT_MAX_PIXELS) -> ImageProcessor:
        """The processor matching ``tower`` (its backend and data config)."""
        return cls.from_data_config(tower.config.backend, tower.data_config, max_pixels=max_pixels)

    @classmethod
    def from_data_config(
        cls, backend: str, data_config: dict[str, Any], max_pixels: int = DEFAULT_MAX_PIXELS
    ) -> ImageProcessor:
        """Build from a timm data config (``backend='timm'``) or an open_clip ``preprocess_cfg``."""
        if backend == "timm":
            from timm.data import create_transform

            transform = create_transform(**data_config, is_training=False)
            size = tuple(data_config["input_size"][1:])
        elif backend == "open_clip":
            from open_clip.transform import PreprocessCfg, image_transform_v2

            cfg = PreprocessCfg(**data_config)
            transform = image_transform_v2(cfg, is_train=False)
            size = (cfg.size, cfg.size) if isinstance(cfg.size, int) else tuple(cfg.size)
        else:
            raise ValueError(f"unknown vision backend {backend!r}; expected 'timm' or 'open_clip'")
        return cls(transform, size, max_pixels=max_pixels)

    def __call__(self, image: ImageInput, name: str | None = None) -> torch.Tensor:
        """One image -> ``[3, H, W]`` float tensor. ``name`` labels errors (default: the path)."""
        return self.transform(self.load(image, name))

    def batch(self, images: Sequence[ImageInput], names: Sequence[str] | None = None) -> torch.Tensor:
        """Several images -> ``[N, 3, H, W]``; the first bad one raises `ImageError`."""
        if names is not None and len(names) != len(images):
            raise ValueError(f"got {len(images)} images but {len(names)} names")
        if not images:
            return torch.empty(0, 3, *self.image_size)
        return torch.stack([
            self(image, names[i] if names is not None else _default_name(image, i))
            for i, image in enumerate(images)
        ])

    def load(self, image: ImageInput, name: str | None = None) -> Image.Image:
        """Decode ``image`` into an RGB PIL image (EXIF orientation applied), without resizing."""
        name = name if name is not None else _default_name(image)
        if isinstance(image, Image.Image):
            img = image
        else:
            img = self._open(image, name)
        try:
            self._check_pixels(img, name)
            img.load()  # PIL decodes lazily: truncated data only fails here
            img = ImageOps.exif_transpose(img) or img
            rgb = _to_rgb(img)
        except ImageError:
            raise
        except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as err:
            raise ImageError(name, f"corrupt or unsupported image ({type(err).__name__}: {err})") from err
        if rgb is image:
            rgb = rgb.copy()  # never hand the caller's own object to in-place code downstream
        return self._shrink(rgb)

    def _open(self, source: Any, name: str) -> Image.Image:
        if isinstance(source, (str, os.PathLike)):
            try:
                with open(source, "rb") as f:
                    # Read the whole file so no handle stays open behind PIL's lazy decode.
                    source = f.read()
            except OSError as err:
                raise ImageError(name, f"cannot read file ({err.strerror or err})") from err
        if not isinstance(source, (bytes, bytearray, memoryview)):
            raise ImageError(
                name, f"unsupported input type {type(source).__name__}; pass a PIL image, a path or bytes"
            )
        try:
            img = Image.open(io.BytesIO(bytes(source)))
        except Image.UnidentifiedImageError as err:
            raise ImageError(name, "not a recognised image format") from err
        except Image.DecompressionBombError as err:
            raise ImageError(name, f"too large to decode safely ({err})") from err
        except (OSError, SyntaxError, ValueError) as err:
            raise ImageError(name, f"corrupt image header ({type(err).__name__}: {err})") from err
        self._check_pixels(img, name)  # from the header, before decoding anything
        # JPEG can decode at 1/2, 1/4, 1/8 scale: huge photos never need full resolution.
        side = 2 * max(self.image_size)
        img.draft(None, (side, side))
        return img

    def _check_pixels(self, img: Image.Image, name: str) -> None:
        if img.width * img.height > self.max_pixels:
            raise ImageError(name, f"{img.width}x{img.height} exceeds the limit of {self.max_pixels} pixels")

    def _shrink(self, img: Image.Image) -> Image.Image:
        """Box-reduce images over 4x the target side to about 2x before the transform's resize.

        Why: bicubic resizing a 10k-pixel image straight to 224 is slow; a cheap integer
        box reduction first keeps the final resize antialiased and fast.
        """
        factor = min(img.size) // (2 * max(self.image_size))
        return img.reduce(factor) if factor >= 2 else img


def _to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB: alpha composited on white, high bit-depth rescaled to 8 bits."""
    if img.mode == "RGB":
        return img
    if img.mode in _SIXTEEN_BIT_MODES or img.mode in ("I", "F"):
        return Image.fromarray(_to_uint8(img)).convert("RGB")  # 2-D uint8 -> mode L
    has_alpha = img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info
    if has_alpha:
        # Plain convert("RGB") drops alpha and exposes whatever colour sits under
        # transparent pixels (often black); white matches how the image is displayed.
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
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


def _default_name(image: Any, index: int | None = None) -> str:
    if isinstance(image, (str, os.PathLike)):
        return os.fspath(image)
    where = f" #{index}" if index is not None else ""
    if isinstance(image, Image.Image):
        filename = getattr(image, "filename", "")
        return filename or f"<PIL image{where}>"
    if isinstance(image, (bytes, bytearray, memoryview)):
        return f"<{len(image)} bytes{where}>"
    return f"<{type(image).__name__}{where}>"
