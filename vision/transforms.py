"""`ImageProcessor`: any image (PIL, path, bytes; any mode, any size) -> the tower's input tensor.

Resizing, cropping and normalisation come from the tower's own backend (timm's
``create_transform`` on its data config, open_clip's ``image_transform_v2`` on its
``preprocess_cfg``), so the constants always match the weights. What those transforms
assume has already happened (decoding, pixel limit, EXIF orientation, mode conversion to
RGB) is ``conceptvlm.data.decode``, the same code the shard readers run, so training and
inference see the same pixels. Bad input raises one error type, `ImageError`, naming the image.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Union

import torch
from PIL import Image

from conceptvlm.data.decode import DEFAULT_MAX_PIXELS, ImageError, check_pixels, decode_image, to_rgb_image

if TYPE_CHECKING:
    from .towers import VisionTower

ImageInput = Union[Image.Image, str, os.PathLike, bytes, bytearray, memoryview]

class ImageProcessor:
    """Decode and convert images to RGB, then apply the tower's eval transform.

    ``processor(image) -> [3, H, W]`` float tensor; ``processor.batch(images) -> [N, 3, H, W]``.
    Accepts PIL images, file paths and encoded bytes. Transparent images are composited
    on white; 16-bit and float images are rescaled to 8 bits; JPEG-encoded huge images are
    decoded at reduced scale (``draft_side``); the pixel limit is checked from the header
    before decoding. Unreadable input raises `ImageError`.
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

    @property
    def draft_side(self) -> int:
        """Pixels per side worth decoding: JPEG ``draft`` and ``_shrink`` stop at twice the target."""
        return 2 * max(self.image_size)

    def load(self, image: ImageInput, name: str | None = None) -> Image.Image:
        """Decode ``image`` into an RGB PIL image (EXIF orientation applied), without resizing."""
        name = name if name is not None else _default_name(image)
        if isinstance(image, Image.Image):
            check_pixels(image, name, self.max_pixels)
            rgb = to_rgb_image(image, name)
        else:
            rgb = decode_image(self._read(image, name), name, self.max_pixels, self.draft_side)
        return self._shrink(rgb)

    def _read(self, source: Any, name: str) -> bytes:
        if isinstance(source, (str, os.PathLike)):
            try:
                with open(source, "rb") as f:
                    # Read the whole file so no handle stays open behind PIL's lazy decode.
                    return f.read()
            except OSError as err:
                raise ImageError(name, f"cannot read file ({err.strerror or err})") from err
        if not isinstance(source, (bytes, bytearray, memoryview)):
            raise ImageError(
                name, f"unsupported input type {type(source).__name__}; pass a PIL image, a path or bytes"
            )
        return bytes(source)

    def _shrink(self, img: Image.Image) -> Image.Image:
        """Box-reduce images over 4x the target side to about 2x before the transform's resize.

        Why: bicubic resizing a 10k-pixel image straight to 224 is slow; a cheap integer
        box reduction first keeps the final resize antialiased and fast.
        """
        factor = min(img.size) // (2 * max(self.image_size))
        return img.reduce(factor) if factor >= 2 else img


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
