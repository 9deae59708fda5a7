"""Vision side of ConceptVLM: towers, image preprocessing and the projector into the LM.

    tower, processor = build_vision(tiny_vision_config())
    pixels = processor.batch(["cat.jpg", png_bytes])      # [N, 3, H, W]
    features = tower(pixels)                              # [N, P, Dv]
    tokens = Projector.for_tower(tower, lm_width)(features)  # [N, tokens_per_image, D]
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

from .config import VisionConfig, tiny_vision_config

if TYPE_CHECKING:
    from .checkpoint import CheckpointError
    from .projector import Projector
    from .towers import VisionTower
    from .transforms import ImageError, ImageProcessor

# Imported on first use: the model config imports VisionConfig, and a text-only run
# should not pay for the image stack (PIL, the transforms) at start-up.
_LAZY = {"CheckpointError": "checkpoint", "Projector": "projector", "VisionTower": "towers",
         "ImageError": "transforms", "ImageProcessor": "transforms"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def build_vision(config: VisionConfig) -> tuple["VisionTower", "ImageProcessor"]:
    """Build the tower (weights from ``config.checkpoint`` if set) and its matching processor."""
    from .towers import VisionTower
    from .transforms import ImageProcessor

    tower = VisionTower(config)
    return tower, ImageProcessor.from_tower(tower)


__all__ = [
    "CheckpointError",
    "ImageError",
    "ImageProcessor",
    "Projector",
    "VisionConfig",
    "VisionTower",
    "build_vision",
    "tiny_vision_config",
]
