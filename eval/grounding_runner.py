"""Grounding suite: referring expression -> greedy box text -> parsed box -> Acc@0.5."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import torch

from conceptvlm.data.boxes import parse_box
from conceptvlm.data.templates import grounding_template

from .generate import GenerateFn, greedy_generate
from .grounding import score_items
from .io import write_json
from .prompts import filled_prompts, generate_answers, question_first

DEFAULT_GROUNDING_PROMPT = grounding_template()
"""The training template (``data.templates``); ``{expression}`` is filled in and the
answer is expected in ``data.boxes`` box text. A model built question first gets
``grounding_template(question_first=True)`` instead."""


@dataclass
class GroundingSample:
    """One referring expression. ``bbox``: ground truth in pixel xyxy of the *original*
    image of size ``width`` x ``height`` (answers are on the 0-999 grid of that image)."""
    id: Any
    image: Optional[torch.Tensor]
    expression: str
    bbox: Sequence[float]
    width: int
    height: int
    split: Optional[str] = None
    extra: dict = field(default_factory=dict)


def run_grounding(model: torch.nn.Module, tokenizer: Any, samples: Sequence[GroundingSample], *,
                  image_tokens_per_image: int, prompt: Optional[str] = None,
                  batch_size: int = 8, max_new_tokens: int = 24, threshold: float = 0.5,
                  generate_fn: GenerateFn = greedy_generate,
                  out_path: Optional[Union[str, Path]] = None) -> dict:
    """Generate a box per expression, parse it and score Acc@``threshold`` per split.

    Returns (and writes to ``out_path``) ``{"summary": ..., "items": [...]}``;
    ``summary["unparseable"]`` counts answers with no box (scored wrong). ``prompt``: a
    template with ``{expression}`` and ``<image>`` (first when absent); by default the one
    the model was trained with.
    """
    prompt = prompt or grounding_template(question_first(model))
    answers = generate_answers(model, tokenizer, filled_prompts(prompt, "expression", [s.expression for s in samples]),
                               [s.image for s in samples], image_tokens_per_image=image_tokens_per_image,
                               batch_size=batch_size, max_new_tokens=max_new_tokens, generate_fn=generate_fn)
    items = []
    for s, a in zip(samples, answers):
        box = parse_box(a, s.width, s.height)
        items.append({"id": s.id, "expression": s.expression, "answer": a,
                      "pred_box": list(box) if box is not None else None,
                      "bbox": [float(v) for v in s.bbox], "split": s.split,
                      "width": s.width, "height": s.height, **s.extra})
    summary = score_items(items, threshold)
    result = {"summary": {**summary, "prompt": prompt,
                          "image_tokens_per_image": image_tokens_per_image},
              "items": items}
    if out_path is not None:
        write_json(result, out_path)
    return result
