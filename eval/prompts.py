"""Multimodal prompt ids and batched answer generation shared by the VQA and grounding runners.

A prompt is ``bos`` and its parts (``data.templates``): text, and the image block
``image_start, image * n, image_end`` where the template says ``<image>`` (first, for a
plain string). The image itself travels in ``images``. ``n = image_tokens_per_image`` is
a parameter because it depends on the vision tower and projector (patches after pooling).
"""
from __future__ import annotations

from typing import Any, Optional, Sequence, Union

import torch

from conceptvlm.data.templates import IMAGE, IMAGE_PLACEHOLDER, Part, Text, encode_parts, fill_template

from .generate import GenerateFn, batches, greedy_generate

Prompt = Union[str, Sequence[Part]]


def question_first(model: torch.nn.Module) -> bool:
    """Whether ``model`` was built to read VQA and grounding prompts question first
    (``image.question_first``); models without the option read the image first."""
    return bool(getattr(getattr(model, "config", None), "question_first", False))


def filled_prompts(template: str, field: str, values: Sequence[str]) -> list[list[Part]]:
    """``template`` filled with each value; a template without ``<image>`` gets the image first."""
    if IMAGE_PLACEHOLDER not in template:
        template = IMAGE_PLACEHOLDER + template
    return [fill_template(template, **{field: v}) for v in values]


def image_prompt_ids(tokenizer: Any, prompt: Prompt, image_tokens_per_image: int,
                     with_image: bool = True) -> list[int]:
    """``bos`` and the prompt's parts; a string is one text after the image. Without
    ``with_image`` the image block is left out."""
    parts = [IMAGE, Text(prompt, loss=False)] if isinstance(prompt, str) else list(prompt)
    if not with_image:
        parts = [p for p in parts if p is not IMAGE]
    ids, _ = encode_parts(parts, tokenizer, image_tokens_per_image, add_bos=True, add_eos=False)
    return ids.tolist()


@torch.no_grad()
def generate_answers(model: torch.nn.Module, tokenizer: Any, texts: Sequence[Prompt],
                     images: Sequence[Optional[torch.Tensor]], *, image_tokens_per_image: int,
                     batch_size: int = 8, max_new_tokens: int = 16,
                     generate_fn: GenerateFn = greedy_generate,
                     stop_at_newline: bool = True) -> list[str]:
    """Greedy answers for image+text prompts, in batches; decoded, cut at the first
    newline (short-answer prompting) and stripped. The model runs in eval mode and is
    put back in the mode it came in."""
    prompts = [image_prompt_ids(tokenizer, t, image_tokens_per_image, im is not None)
               for t, im in zip(texts, images)]
    answers: list[str] = [""] * len(prompts)
    stop = (lambda r, ids: "\n" in tokenizer.decode(ids)) if stop_at_newline else None
    was_training = model.training
    model.eval()
    try:
        for rows in batches(range(len(prompts)), batch_size):
            out = generate_fn(model, [prompts[i] for i in rows], max_new_tokens=max_new_tokens,
                              eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id,
                              images=[images[i] for i in rows], stop=stop)
            for i, ids in zip(rows, out):
                text = tokenizer.decode(ids)
                answers[i] = (text.split("\n")[0] if stop_at_newline else text).strip()
    finally:
        model.train(was_training)
    return answers
