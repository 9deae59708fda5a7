"""Vision side of ConceptVLM: towers, image preprocessing and the projector into the LM.

    tower, processor = build_vision(tiny_vision_config())
    pixels = processor.batch(["cat.jpg", png_bytes])      # [N, 3, H, W]
    features = tower(pixels)                              # [N, P, Dv]
    tokens = Projector.for_tower(tower, lm_width)(features)  # [N, tokens_per_image, D]
"""

from __future__ import annotations

from .checkpoint import CheckpointError
from .config import VisionConfig, tiny_vision_config
from .projector import Projector
from .towers import VisionTower
from .transforms import ImageError, ImageProcessor


def build_vision(config: VisionConfig) -> tuple[VisionTower, ImageProcessor]:
    """Build the tower (weights from ``config.checkpoint`` if set) and its matching processor."""
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
