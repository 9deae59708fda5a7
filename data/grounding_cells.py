"""Grounding a tiny model can learn: "Where is the red shape?" -> the 8x8 patch cell of
its centre (issue 16).

A scene is 1-3 large shapes of distinct colours, centres anywhere on a 64x64 image (not
on the 3x3 grid of :mod:`.synthetic`), far enough apart not to touch. The answer names
the centre's cell of the 8x8 patch grid (8-pixel patches of the tiny tower) as
``"r{row} c{col}"``; every candidate answer is then one of 64 strings of equal token
length, so a model can be scored by likelihood over all 64 cells. Samples are VQA
samples (``KEY.jpg`` + ``KEY.json`` with ``question`` and ``answer``) and train with the
ordinary ``vqa`` reader; the JSON also keeps ``row``, ``col`` and the scene.
Every sample is a pure function of ``(seed, index)``.
"""
from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any, Union

from .synthetic import COLOURS, SHAPES, SIZES, Shape, _jpeg, draw_scene, write_indexed_shards

GRID = 8  # cells per side: the tiny tower's 8x8 patch grid on 64x64 images
QUESTION = "Where is the {colour} shape?"


def cell_answer(row: int, col: int) -> str:
    return f"r{row} c{col}"


def all_cell_answers(grid: int = GRID) -> list[str]:
    """The candidate answers in cell order (``row * grid + col``)."""
    return [cell_answer(r, c) for r in range(grid) for c in range(grid)]


def make_cell_scene(rng: random.Random, image_size: int = 64) -> list[Shape]:
    """1-3 large shapes, distinct colours, centres at least one diameter apart."""
    n = rng.randint(1, 3)
    r = SIZES["large"] * image_size
    colours = rng.sample(sorted(COLOURS), n)
    centres: list[tuple[float, float]] = []
    while len(centres) < n:
        c = (rng.uniform(r, image_size - r), rng.uniform(r, image_size - r))
        if all((c[0] - o[0]) ** 2 + (c[1] - o[1]) ** 2 >= (2 * r + 1) ** 2 for o in centres):
            centres.append(c)
    return [Shape(rng.choice(SHAPES), colour, "large", -1, (round(x - r), round(y - r), round(x + r), round(y + r)))
            for colour, (x, y) in zip(colours, centres)]


def centre_cell(shape: Shape, image_size: int = 64, grid: int = GRID) -> tuple[int, int]:
    x1, y1, x2, y2 = shape.box
    side = image_size / grid
    return (min(grid - 1, int((y1 + y2) / 2 // side)), min(grid - 1, int((x1 + x2) / 2 // side)))


def cell_sample(index: int, seed: int = 0, image_size: int = 64) -> dict[str, Any]:
    """One sample: a ``webdataset`` dict with ``jpg`` and ``json``."""
    rng = random.Random(f"cells:{seed}:{index}")
    scene = make_cell_scene(rng, image_size)
    target = rng.choice(scene)
    row, col = centre_cell(target, image_size)
    img = draw_scene(scene, rng, image_size, style=rng.choice(("dark", "grey")))
    meta = {"question": QUESTION.format(colour=target.colour), "answer": cell_answer(row, col), "row": row,
            "col": col, "colour": target.colour, "scene": [[s.shape, s.colour, list(s.box)] for s in scene]}
    return {"__key__": f"{index:08d}", "jpg": _jpeg(img), "json": json.dumps(meta).encode()}


def write_cell_shards(out_dir: Union[str, Path], num: int, shard_size: int = 1000, seed: int = 0,
                      start_index: int = 0, image_size: int = 64) -> list[str]:
    """``num`` samples as ``OUT/cells-000000.tar``, ...; held-out splits use another
    ``start_index`` (the same seed, disjoint indices)."""
    return write_indexed_shards(out_dir, "cells", lambda i: cell_sample(i, seed, image_size), num, shard_size,
                                start_index)
