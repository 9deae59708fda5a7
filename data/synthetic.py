"""Synthetic shards: coloured shapes drawn with Pillow, for the demo and the tests.

A scene is 1-4 shapes (circle, square, triangle, diamond; 7 colours; small or large),
each in its own cell of a 3x3 grid (so positions have names: "top left", "center", ...),
on a plain or noisy background. Every sample is a pure function of ``(seed, kind,
index)``. The tasks need the image: colour, shape, count and position questions, boxes
for referring expressions, captions in reading order, and multi-image documents that
compare shape counts; the text kind has relations whose converse is predictable
("A is left of B. B is right of A."), so a tiny model can learn it but not trivially.
"""
from __future__ import annotations

import io
import itertools
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import webdataset as wds
from PIL import Image, ImageDraw

from .samples import KINDS

COLOURS = {
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (50, 90, 230), "yellow": (235, 210, 40),
    "purple": (150, 60, 200), "orange": (245, 140, 30), "white": (245, 245, 245),
}
SHAPES = ("circle", "square", "triangle", "diamond")
SIZES = {"small": 0.075, "large": 0.14}  # radius as a fraction of the image side
ROWS, COLS = ("top", "middle", "bottom"), ("left", "center", "right")
NUMBERS = ("zero", "one", "two", "three", "four")


def cell_name(cell: int) -> str:
    r, c = divmod(cell, 3)
    if r == 1 and c == 1:
        return "center"
    return COLS[c] if r == 1 else ROWS[r] if c == 1 else f"{ROWS[r]} {COLS[c]}"


@dataclass(frozen=True)
class Shape:
    shape: str
    colour: str
    size: str
    cell: int
    box: tuple[int, int, int, int]  # pixel xyxy

    @property
    def name(self) -> str:
        return f"{self.size} {self.colour} {self.shape}"


def make_scene(rng: random.Random, n: Optional[int] = None, image_size: int = 64) -> list[Shape]:
    """1-4 shapes in distinct grid cells, sorted in reading order."""
    n = n or rng.randint(1, 4)
    cells = sorted(rng.sample(range(9), n))
    side = image_size / 3
    shapes = []
    for cell in cells:
        size = rng.choice(tuple(SIZES))
        r = SIZES[size] * image_size
        jitter = max(0.0, side / 2 - r - 1)
        cy, cx = ((i + 0.5) * side + rng.uniform(-jitter, jitter) for i in divmod(cell, 3))
        box = (round(cx - r), round(cy - r), round(cx + r), round(cy + r))
        shapes.append(Shape(rng.choice(SHAPES), rng.choice(tuple(COLOURS)), size, cell, box))
    return shapes


# background style -> how captions and answers name it
BACKGROUNDS = {"dark": "black", "grey": "gray", "noise": "speckled"}


def draw_scene(scene: list[Shape], rng: random.Random, image_size: int = 64,
               style: Optional[str] = None) -> Image.Image:
    """Plain dark, plain grey, or noisy background (``style``, a key of
    :data:`BACKGROUNDS`; random if None); shapes drawn inside their boxes."""
    style = style or rng.choice(tuple(BACKGROUNDS))
    if style == "noise":
        noise = np.random.default_rng(rng.getrandbits(32)).normal(90, 30, (image_size, image_size, 3))
        img = Image.fromarray(noise.clip(0, 255).astype(np.uint8))
    else:
        img = Image.new("RGB", (image_size, image_size), (30, 30, 30) if style == "dark" else (110, 110, 110))
    draw = ImageDraw.Draw(img)
    for s in scene:
        x1, y1, x2, y2 = s.box
        fill = COLOURS[s.colour]
        cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
        if s.shape == "circle":
            draw.ellipse(s.box, fill=fill)
        elif s.shape == "square":
            draw.rectangle(s.box, fill=fill)
        elif s.shape == "triangle":
            draw.polygon([(cx, y1), (x2, y2), (x1, y2)], fill=fill)
        else:
            draw.polygon([(cx, y1), (x2, cy), (cx, y2), (x1, cy)], fill=fill)
    return img


def caption(scene: list[Shape], background: Optional[str] = None) -> str:
    """"A large red circle at the top left and a small blue square in the center." With
    ``background`` (a key of :data:`BACKGROUNDS`) the sentence ends "..., on a black background."."""
    phrases = [f"a {s.name} {'in the' if s.cell == 4 else 'at the'} {cell_name(s.cell)}" for s in scene]
    text = phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]
    if background is not None:
        text += f", on a {BACKGROUNDS[background]} background"
    return text[0].upper() + text[1:] + "."


def _unique(scene: list[Shape], **attrs: str) -> bool:
    return sum(all(getattr(s, k) == v for k, v in attrs.items()) for s in scene) == 1


# question type -> VQAv2 answer type
QUESTION_TYPES = {"count": "number", "count_shape": "number", "colour": "other", "shape": "other",
                  "where": "other", "exists": "yes/no", "exists_colour": "yes/no", "background": "other"}


def vqa(scene: list[Shape], rng: random.Random, background: str) -> tuple[str, str, list[str], str]:
    """(question, answer, 10 annotator answers, question type), VQAv2 style: annotators
    mostly agree, with some noise; the type is a key of :data:`QUESTION_TYPES`.

    The types range from global appearance (background, whether a colour is present:
    what a tiny model learns first) to shape recognition, counting and position."""
    options: list[tuple[str, str, tuple[str, ...], str]] = [
        ("How many shapes are there?", str(len(scene)), tuple("1234"), "count"),
        ("What color is the background?", BACKGROUNDS[background], tuple(BACKGROUNDS.values()), "background"),
    ]
    colour = rng.choice(scene).colour if rng.random() < 0.5 else rng.choice(tuple(COLOURS))
    present = any(s.colour == colour for s in scene)
    options.append((f"Is there a {colour} object?", "yes" if present else "no", ("yes", "no"), "exists_colour"))
    shape = rng.choice(SHAPES)
    options.append((f"How many {shape}s are there?", str(sum(s.shape == shape for s in scene)), tuple("01234"), "count_shape"))
    target = rng.choice(scene)
    if _unique(scene, shape=target.shape):
        options.append((f"What color is the {target.shape}?", target.colour, tuple(COLOURS), "colour"))
    if _unique(scene, colour=target.colour):
        options.append((f"What shape is the {target.colour} object?", target.shape, SHAPES, "shape"))
    if _unique(scene, colour=target.colour, shape=target.shape):
        where = tuple(cell_name(c) for c in range(9))
        options.append((f"Where is the {target.colour} {target.shape}?", cell_name(target.cell), where, "where"))
    colour, shape = (target.colour, target.shape) if rng.random() < 0.5 else (rng.choice(tuple(COLOURS)), rng.choice(SHAPES))
    present = any(s.colour == colour and s.shape == shape for s in scene)
    options.append((f"Is there a {colour} {shape}?", "yes" if present else "no", ("yes", "no"), "exists"))
    question, answer, space, qtype = rng.choice(options)
    answers = [answer if i < 6 or rng.random() < 0.8 else rng.choice(space) for i in range(10)]
    rng.shuffle(answers)
    return question, answer, answers, qtype


def referring_expression(scene: list[Shape], target: Shape, rng: random.Random) -> str:
    """The shortest kinds of description that pick ``target`` out, one at random."""
    forms = [f"the {target.shape} at the {cell_name(target.cell)}"]  # cells are distinct: always unique
    if _unique(scene, shape=target.shape):
        forms.append(f"the {target.shape}")
    if _unique(scene, colour=target.colour):
        forms.append(f"the {target.colour} object")
    if _unique(scene, colour=target.colour, shape=target.shape):
        forms.append(f"the {target.colour} {target.shape}")
    if _unique(scene, size=target.size, colour=target.colour, shape=target.shape):
        forms.append(f"the {target.name}")
    return rng.choice(forms)


def relation_text(scene: list[Shape], rng: random.Random) -> str:
    """English-like text with learnable structure: a caption, relations and their converses,
    and a count."""
    sentences = [caption(scene)]
    pairs = list(itertools.combinations(scene, 2))
    rng.shuffle(pairs)
    for a, b in pairs[:3]:
        if rng.random() < 0.5:
            a, b = b, a
        (ra, ca), (rb, cb) = divmod(a.cell, 3), divmod(b.cell, 3)
        if ca != cb:
            rel, conv = ("left of", "right of") if ca < cb else ("right of", "left of")
        else:
            rel, conv = ("above", "below") if ra < rb else ("below", "above")
        sentences.append(f"The {a.colour} {a.shape} is {rel} the {b.colour} {b.shape}.")
        sentences.append(f"So the {b.colour} {b.shape} is {conv} the {a.colour} {a.shape}.")
    n = len(scene)
    sentences.append(f"There {'is' if n == 1 else 'are'} {NUMBERS[n]} shape{'s' if n > 1 else ''} in total.")
    return " ".join(sentences)


def _jpeg(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def synthetic_sample(kind: str, index: int, seed: int = 0, image_size: int = 64) -> dict[str, Any]:
    """One webdataset sample (``{"__key__", ext: bytes|str|dict}``), a function of its arguments."""
    rng = random.Random(f"{seed}:{kind}:{index}")
    key = f"{index:08d}"
    if kind == "text":
        return {"__key__": key, "txt": relation_text(make_scene(rng, image_size=image_size), rng)}
    if kind == "interleaved":
        scenes = [make_scene(rng, image_size=image_size) for _ in range(rng.randint(2, 3))]
        ordinals = ("first", "second", "third")
        texts: list[Optional[str]] = []
        images: list[Optional[str]] = []
        sample: dict[str, Any] = {"__key__": key}
        for i, scene in enumerate(scenes):
            style = rng.choice(tuple(BACKGROUNDS))
            texts += [f"The {ordinals[i]} picture.", None, caption(scene, style)]
            images += [None, f"{i}.jpg", None]
            sample[f"{i}.jpg"] = _jpeg(draw_scene(scene, rng, image_size, style))
        a, b = len(scenes[-2]), len(scenes[-1])
        more = "more shapes than" if b > a else "fewer shapes than" if b < a else "as many shapes as"
        texts.append(f"The {ordinals[len(scenes) - 1]} picture has {more} the {ordinals[len(scenes) - 2]}.")
        images.append(None)
        sample["json"] = {"texts": texts, "images": images}
        return sample
    scene = make_scene(rng, image_size=image_size)
    style = rng.choice(tuple(BACKGROUNDS))
    sample = {"__key__": key, "jpg": _jpeg(draw_scene(scene, rng, image_size, style))}
    if kind == "caption":
        text = caption(scene, style)
        sample.update(txt=text, json={"caption": text, "width": image_size, "height": image_size})
    elif kind == "vqa":
        question, answer, answers, qtype = vqa(scene, rng, style)
        sample["json"] = {"question": question, "answer": answer, "answers": answers, "question_type": qtype,
                          "answer_type": QUESTION_TYPES[qtype]}
    elif kind == "grounding":
        target = rng.choice(scene)
        sample["json"] = {"expression": referring_expression(scene, target, rng), "box": list(target.box),
                          "box_format": "xyxy", "width": image_size, "height": image_size}
    else:
        raise ValueError(f"unknown kind {kind!r}; expected one of {KINDS}")
    return sample


def write_synthetic_shards(kind: str, out_dir: Union[str, Path], num: int = 1000, shard_size: int = 1000,
                           seed: int = 0, image_size: int = 64, start_index: int = 0) -> list[str]:
    """Write ``num`` samples as ``OUT/KIND-000000.tar``, ... (``shard_size`` per shard);
    returns the shard paths. ``start_index`` offsets the sample indices (a held-out split
    with the same seed: ``start_index=10**6``)."""
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; expected one of {KINDS}")
    return write_indexed_shards(out_dir, kind, lambda i: synthetic_sample(kind, i, seed, image_size), num,
                                shard_size, start_index)


def write_indexed_shards(out_dir: Union[str, Path], prefix: str, make_sample, num: int, shard_size: int,
                         start_index: int = 0) -> list[str]:
    """``make_sample(i)`` for ``i`` in ``[start_index, start_index + num)`` as
    ``OUT/PREFIX-000000.tar``, ... (``shard_size`` per shard); returns the shard paths."""
    if num < 1 or shard_size < 1:
        raise ValueError(f"num and shard_size must be >= 1, got {num}, {shard_size}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written: list[str] = []
    with wds.ShardWriter(str(out / f"{prefix}-%06d.tar"), maxcount=shard_size, verbose=0, post=written.append) as sink:
        for i in range(start_index, start_index + num):
            sink.write(make_sample(i))
    return written
