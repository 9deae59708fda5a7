"""Samples -> token ids and labels: the prompt templates and the image-token layout.

A document is a list of parts: ``Text(text, loss)`` or ``IMAGE``. Encoding it gives

    bos, <parts...>, eos

where each ``IMAGE`` becomes ``image_start_id, image_id * n, image_end_id`` (``n =
image_tokens_per_image``; the model replaces the ``image_id`` embeddings with projected
patches, in order). Labels are aligned with ``input_ids`` (not shifted) and are -100
on bos, image tokens, markers and parts with ``loss=False`` (instruction prompts), so
instruction samples train only on the answer. ``eos`` is trained when the last text
part is (the model learns to stop after an answer).

Templates are fixed strings: the evaluators build the same prompt with ``vqa_prompt`` /
``grounding_prompt`` and compare what the model writes after it. Boxes are written with
``conceptvlm.data.boxes.format_box`` (0-999 grid) and read back with ``parse_box``.

Question-first layout (``image.question_first``): VQA and grounding prompts put the
question before the image, ``Question: {question}<image> Answer:``. The model is causal,
so only then can the image's patches attend to the question: a tiny model asked "where
is the red shape?" learned to match the colour to the patches only this way (image first,
its loss sat at the prior through 2,600 steps; question first it passed the gate).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Union

import numpy as np

from .boxes import format_box

IGNORE = -100
IMAGE_PLACEHOLDER = "<image>"  # only for encode_prompt(); data documents use IMAGE parts
VQA_TEMPLATE = "Question: {question} Answer:"  # after the image
GROUNDING_TEMPLATE = "Locate: {expression}. Box:"


def vqa_template(question_first: bool = False) -> str:
    """The VQA prompt with ``<image>`` where the image goes."""
    return "Question: {question}<image> Answer:" if question_first else IMAGE_PLACEHOLDER + VQA_TEMPLATE


def grounding_template(question_first: bool = False) -> str:
    """The grounding prompt with ``<image>`` where the image goes."""
    return "Locate: {expression}.<image> Box:" if question_first else IMAGE_PLACEHOLDER + GROUNDING_TEMPLATE


@dataclass(frozen=True)
class Text:
    text: str
    loss: bool = True


class _ImageSlot:
    def __repr__(self) -> str:
        return "IMAGE"


IMAGE = _ImageSlot()
Part = Union[Text, _ImageSlot]


def caption_parts(caption: str, prompt: Optional[str] = None) -> list[Part]:
    """Image then caption (loss on the caption); with ``prompt`` an instruction sample."""
    parts: list[Part] = [IMAGE]
    if prompt:
        parts.append(Text(prompt, loss=False))
        caption = " " + caption
    return parts + [Text(caption, loss=True)]


def fill_template(template: str, **fields: str) -> list[Part]:
    """Prompt parts (no loss) of ``template``: ``IMAGE`` where it says ``<image>``, the
    text between filled with ``fields`` (none given: taken as it is, braces and all). The
    template is split before it is filled, so a field that itself contains ``<image>``
    stays text and cannot add an image slot."""
    parts: list[Part] = []
    for i, piece in enumerate(template.split(IMAGE_PLACEHOLDER)):
        if i > 0:
            parts.append(IMAGE)
        if piece:
            parts.append(Text(piece.format(**fields) if fields else piece, loss=False))
    return parts


def vqa_prompt(question: str, question_first: bool = False) -> list[Part]:
    return fill_template(vqa_template(question_first), question=question)


def vqa_parts(question: str, answer: str, question_first: bool = False) -> list[Part]:
    # The leading space makes the answer tokenise as a continuation, as at generation time.
    return vqa_prompt(question, question_first) + [Text(" " + answer, loss=True)]


def grounding_prompt(expression: str, question_first: bool = False) -> list[Part]:
    return fill_template(grounding_template(question_first), expression=expression)


def grounding_parts(expression: str, box_xyxy: Sequence[float], width: int, height: int,
                    question_first: bool = False) -> list[Part]:
    """Referring expression -> box on the 0-999 grid of the (original) image."""
    return grounding_prompt(expression, question_first) + [Text(" " + format_box(box_xyxy, width, height), loss=True)]


def interleaved_parts(items: Sequence[Union[str, _ImageSlot]]) -> list[Part]:
    """Texts and images in document order; texts are trained, separated by newlines."""
    parts: list[Part] = []
    for i, item in enumerate(items):
        if item is IMAGE:
            parts.append(IMAGE)
        else:
            parts.append(Text(str(item) + ("\n" if i + 1 < len(items) else ""), loss=True))
    return parts


def text_parts(text: str) -> list[Part]:
    return [Text(text, loss=True)]


def encode_parts(
    parts: Sequence[Part],
    tokenizer,
    image_tokens_per_image: int,
    add_bos: bool = True,
    add_eos: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """Parts -> ``(input_ids, labels)``, int64 arrays of equal length (see module doc)."""
    n = int(image_tokens_per_image)
    if n < 1:
        raise ValueError(f"image_tokens_per_image must be >= 1, got {n}")
    image_ids = np.array([tokenizer.image_start_id] + [tokenizer.image_id] * n + [tokenizer.image_end_id], np.int64)
    image_labels = np.full(n + 2, IGNORE, np.int64)
    ids: list[np.ndarray] = []
    labels: list[np.ndarray] = []
    if add_bos:
        ids.append(np.array([tokenizer.bos_id], np.int64))
        labels.append(np.array([IGNORE], np.int64))
    last_loss = False
    for part in parts:
        if part is IMAGE:
            ids.append(image_ids)
            labels.append(image_labels)
            last_loss = False
            continue
        tok = np.asarray(tokenizer.encode(part.text), np.int64)
        ids.append(tok)
        labels.append(tok if part.loss else np.full(len(tok), IGNORE, np.int64))
        last_loss = part.loss
    if add_eos:
        ids.append(np.array([tokenizer.eos_id], np.int64))
        labels.append(np.array([tokenizer.eos_id if last_loss else IGNORE], np.int64))
    if not ids:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    return np.concatenate(ids), np.concatenate(labels)


def encode_prompt(text: str, tokenizer, image_tokens_per_image: int) -> list[int]:
    """A prompt string with ``<image>`` placeholders -> ids (bos, no eos), for generation."""
    ids, _ = encode_parts(fill_template(text), tokenizer, image_tokens_per_image, add_bos=True, add_eos=False)
    return ids.tolist()


def count_images(parts: Sequence[Part]) -> int:
    return sum(1 for p in parts if p is IMAGE)
