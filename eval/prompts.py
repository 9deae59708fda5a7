"""Multimodal prompt ids and batched answer generation shared by the VQA and grounding runners.

A prompt is ``bos, image_start, image * n, image_end`` followed by the prompt text; the
image itself travels in ``images``. ``n = image_tokens_per_image`` is a parameter because
it depends on the vision tower and projector (patches after pooling).
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import torch

from .generate import GenerateFn, batches, greedy_generate


def image_prompt_ids(tokenizer: Any, text: str, image_tokens_per_image: int,
                     with_image: bool = True) -> list[int]:
    """``[bos, image_start, image * n, image_end] + encode(text)`` (no image block when
    ``with_image`` is False)."""
    ids = [tokenizer.bos_id]
    if with_image:
        ids += [tokenizer.image_start_id] + [tokenizer.image_id] * image_tokens_per_image
        ids += [tokenizer.image_end_id]
    return ids + tokenizer.encode(text)


@torch.no_grad()
def generate_answers(model: torch.nn.Module, tokenizer: Any, texts: Sequence[str],
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
