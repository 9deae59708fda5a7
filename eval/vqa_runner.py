"""VQA suite: prompt -> greedy short answer -> official VQAv2 accuracy, one JSON."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import torch

from conceptvlm.data.templates import vqa_template
from .generate import GenerateFn, greedy_generate
from .io import write_json
from .prompts import filled_prompts, generate_answers, question_first
from .vqa import normalize_prediction, summarize, vqa_accuracy

DEFAULT_VQA_PROMPT = vqa_template()
"""The training template (``data.templates``, "<image>Question: {question} Answer:"): short
answers, as the VQA instruction samples teach; ``{question}`` is filled in. A model built
question first gets ``vqa_template(question_first=True)`` instead."""


@dataclass
class VQASample:
    """One question about one image (``image``: ``[3, H, W]`` after the tower's transform)."""
    question_id: Any
    image: Optional[torch.Tensor]
    question: str
    answers: list[str]
    answer_type: Optional[str] = None
    question_type: Optional[str] = None
    extra: dict = field(default_factory=dict)


def run_vqa(model: torch.nn.Module, tokenizer: Any, samples: Sequence[VQASample], *,
            image_tokens_per_image: int, prompt: Optional[str] = None,
            batch_size: int = 8, max_new_tokens: int = 10,
            generate_fn: GenerateFn = greedy_generate,
            out_path: Optional[Union[str, Path]] = None) -> dict:
    """Generate an answer per sample and score it with :func:`vqa_accuracy`.

    Returns (and writes to ``out_path``) ``{"summary": ..., "items": [...]}``; each item
    has ``question_id, question, prediction, normalized, answers, accuracy``, so the
    items are also an official results file (``question_id`` + ``prediction``).
    ``prompt``: a template with ``{question}`` and ``<image>`` where the image goes (first
    when absent); by default the one the model was trained with.
    """
    prompt = prompt or vqa_template(question_first(model))
    preds = generate_answers(model, tokenizer, filled_prompts(prompt, "question", [s.question for s in samples]),
                             [s.image for s in samples], image_tokens_per_image=image_tokens_per_image,
                             batch_size=batch_size, max_new_tokens=max_new_tokens, generate_fn=generate_fn)
    items = [{"question_id": s.question_id, "question": s.question, "prediction": p,
              "normalized": normalize_prediction(p), "answers": s.answers,
              "answer_type": s.answer_type, "question_type": s.question_type,
              "accuracy": vqa_accuracy(p, s.answers), **s.extra}
             for s, p in zip(samples, preds)]
    result = {"summary": {**summarize(items), "prompt": prompt,
                          "image_tokens_per_image": image_tokens_per_image},
              "items": items}
    if out_path is not None:
        write_json(result, out_path)
    return result
