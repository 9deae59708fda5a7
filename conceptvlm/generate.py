"""Cached greedy generation: prefill the prompts once, then one token per step.

Same signature as ``conceptvlm.eval.generate.greedy_generate`` (the evaluators'
``GenerateFn``), so it drops into every runner. Works for :class:`ConceptMoE` and
:class:`ConceptVLM` (images go with the prefill).
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch

from .eval.generate import StopFn


@torch.no_grad()
def cached_generate(model: torch.nn.Module, prompts: Sequence[Sequence[int]], *,
                    max_new_tokens: Union[int, Sequence[int]], eos_id: Optional[int], pad_id: int,
                    images: Optional[Sequence[Optional[torch.Tensor]]] = None,
                    stop: Optional[StopFn] = None) -> list[list[int]]:
    """Greedy decoding with KV caches (token-level and concept-level) and the dechunk state.

    Prompts are right-padded into one prefill. Rows that finish keep feeding padding
    (``doc_id = -1``), which the caches store as invalid keys, so the other rows'
    logits are exactly those of decoding them alone. The eos token, if produced, is
    dropped from the result.
    """
    from .eval.generate import concat_images, model_device, pad_batch  # the evaluators' batching

    n = len(prompts)
    if n == 0:
        return []
    limits = [max_new_tokens] * n if isinstance(max_new_tokens, int) else list(max_new_tokens)
    out: list[list[int]] = [[] for _ in range(n)]
    active = torch.tensor([lim > 0 for lim in limits])
    if not active.any():
        return out
    dev = model_device(model)
    ids, doc, lengths = pad_batch(prompts, pad_id, dev)
    kwargs = {}
    imgs = concat_images(images, list(range(n)))
    if imgs is not None:
        kwargs["images"] = imgs.to(dev)
    res = model(ids, doc_ids=doc, use_cache=True, **kwargs)
    last = res.logits[torch.arange(n, device=dev), (lengths - 1).to(dev)]
    state = res.state
    while True:
        nxt = last.argmax(-1).tolist()
        for i in range(n):
            if not active[i]:
                continue
            if eos_id is not None and nxt[i] == eos_id:
                active[i] = False
                continue
            out[i].append(nxt[i])
            if len(out[i]) >= limits[i] or (stop is not None and stop(i, out[i])):
                active[i] = False
        if not active.any():
            return out
        step = torch.tensor([[nxt[i] if active[i] else pad_id] for i in range(n)], device=dev)
        step_doc = torch.where(active[:, None].to(dev), 0, -1)
        res = model(step, doc_ids=step_doc, state=state)
        state, last = res.state, res.logits[:, -1]
