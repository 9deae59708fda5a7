"""Boxes as text: the one format the templates write and the evaluators parse.

A box is written as four integers on a 0-999 grid relative to the image size,
``[x1, y1, x2, y2]`` (top-left and bottom-right corners), e.g. ``[112, 40, 530, 611]``.
Resolution-independent integers keep the answer short (a handful of tokens) and let
one model answer for images of any size; the grid loses at most 0.05% of the side.
"""
from __future__ import annotations

import re
from typing import Optional, Sequence

GRID = 999
_BOX_RE = re.compile(r"\[\s*(-?\d+)\s*,\s*(-?\d+)\s*,\s*(-?\d+)\s*,\s*(-?\d+)\s*\]")


def xywh_to_xyxy(box: Sequence[float]) -> tuple[float, float, float, float]:
    """COCO ``[x, y, w, h]`` to ``[x1, y1, x2, y2]``."""
    x, y, w, h = box
    return (float(x), float(y), float(x) + float(w), float(y) + float(h))


def format_box(box_xyxy: Sequence[float], width: int, height: int) -> str:
    """Pixel ``xyxy`` box -> ``"[x1, y1, x2, y2]"`` on the 0-999 grid."""
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    x1, y1, x2, y2 = box_xyxy
    if x2 < x1 or y2 < y1:
        raise ValueError(f"box {list(box_xyxy)} has x2 < x1 or y2 < y1 (expected pixel xyxy)")

    def q(v: float, size: int) -> int:
        return min(GRID, max(0, int(round(v / size * GRID))))

    return f"[{q(x1, width)}, {q(y1, height)}, {q(x2, width)}, {q(y2, height)}]"


def parse_box(text: str, width: int, height: int) -> Optional[tuple[float, float, float, float]]:
    """First ``[x1, y1, x2, y2]`` grid box in ``text`` -> pixel xyxy, or None if absent.

    Corners given in the wrong order are swapped rather than rejected; values are
    clamped to the grid. None means "unparseable" and evaluators count it as wrong.
    """
    m = _BOX_RE.search(text)
    if m is None:
        return None
    x1, y1, x2, y2 = (min(GRID, max(0, int(v))) for v in m.groups())
    x1, x2 = sorted((x1, x2))
    y1, y2 = sorted((y1, y2))
    return (x1 / GRID * width, y1 / GRID * height, x2 / GRID * width, y2 / GRID * height)
