"""Cached generation: prefill the prompts once, then one token per step.

:func:`stream_generate` is the one decoding loop (greedy, or temperature / top-p
sampling); it yields each step's tokens so a caller can print them as they come.
:func:`cached_generate` collects it and has the signature of the evaluators'
``GenerateFn`` (``conceptvlm.eval.generate``), so it drops into every runner;
``ConceptVLM.generate`` and ``conceptvlm generate`` use the same loop. Works for
:class:`ConceptMoE` and :class:`ConceptVLM` (images go with the prefill).
"""
from __future__ import annotations

from typing import Iterator, Optional, Sequence, Union

import torch

from .eval.generate import StopFn


def next_tokens(logits_BV: torch.Tensor, temperature: float = 0.0, top_p: float = 1.0,
                generators: Optional[Sequence[Optional[torch.Generator]]] = None) -> list[int]:
    """One token per row: the argmax when ``temperature == 0``, else a sample from
    ``softmax(logits / temperature)`` restricted to the smallest set of tokens whose
    probability reaches ``top_p`` (nucleus sampling). Row ``i`` draws from ``generators[i]``,
    so a row's tokens do not depend on the other rows of its batch."""
    if temperature <= 0:
        return logits_BV.argmax(-1).tolist()
    probs_BV = torch.softmax(logits_BV.float() / temperature, -1)
    out = []
    for i in range(probs_BV.shape[0]):
        p_V = probs_BV[i]
        if top_p < 1.0:
            p_sorted, order = p_V.sort(descending=True)
            # keep a token while the mass before it is below top_p (the first always stays)
            keep = (p_sorted.cumsum(0) - p_sorted) < top_p
            p_V = torch.zeros_like(p_V).scatter(0, order[keep], p_sorted[keep])
        g = generators[i] if generators is not None else None
        out.append(int(torch.multinomial(p_V.cpu(), 1, generator=g)))
    return out


def _row_generators(n: int, seed: Optional[Union[int, Sequence[int]]]) -> Optional[list[torch.Generator]]:
    if seed is None:
        return None
    seeds = [seed + i for i in range(n)] if isinstance(seed, int) else list(seed)
    return [torch.Generator().manual_seed(int(s)) for s in seeds]


@torch.no_grad()
def stream_generate(model: torch.nn.Module, prompts: Sequence[Sequence[int]], *,
                    max_new_tokens: Union[int, Sequence[int]], eos_id: Optional[int], pad_id: int,
                    images: Optional[Sequence[Optional[torch.Tensor]]] = None,
                    stop: Optional[StopFn] = None, temperature: float = 0.0, top_p: float = 1.0,
                    seed: Optional[Union[int, Sequence[int]]] = None) -> Iterator[list[Optional[int]]]:
    """Decode with KV caches (token-level and concept-level) and the dechunk state; yields,
    per step, each row's new token (None for a row that has finished).

    Prompts are right-padded into one prefill. Rows that finish keep feeding padding
    (``doc_id = -1``), which the caches store as invalid keys, so the other rows'
    logits are exactly those of decoding them alone. A row ends at eos (not yielded),
    at its ``max_new_tokens`` or when ``stop(row, generated)`` is true. ``seed`` (an int:
    row ``i`` uses ``seed + i``; or one seed per row) makes sampling reproducible.
    """
    from .eval.generate import concat_images, model_device, pad_batch  # the evaluators' batching

    n = len(prompts)
    if n == 0:
        return
    limits = [max_new_tokens] * n if isinstance(max_new_tokens, int) else list(max_new_tokens)
    out: list[list[int]] = [[] for _ in range(n)]
    active = torch.tensor([lim > 0 for lim in limits])
    if not active.any():
        return
    generators = _row_generators(n, seed) if temperature > 0 else None
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
        nxt = next_tokens(last, temperature, top_p, generators)
        step_out: list[Optional[int]] = [None] * n
        for i in range(n):
            if not active[i]:
                continue
            if eos_id is not None and nxt[i] == eos_id:
                active[i] = False
                continue
            out[i].append(nxt[i])
            step_out[i] = nxt[i]
            if len(out[i]) >= limits[i] or (stop is not None and stop(i, out[i])):
                active[i] = False
        if any(t is not None for t in step_out):
            yield step_out
        if not active.any():
            return
        step = torch.tensor([[nxt[i] if active[i] else pad_id] for i in range(n)], device=dev)
        step_doc = torch.where(active[:, None].to(dev), 0, -1)
        res = model(step, doc_ids=step_doc, state=state)
        state, last = res.state, res.logits[:, -1]


def cached_generate(model: torch.nn.Module, prompts: Sequence[Sequence[int]], *,
                    max_new_tokens: Union[int, Sequence[int]], eos_id: Optional[int], pad_id: int,
                    images: Optional[Sequence[Optional[torch.Tensor]]] = None,
                    stop: Optional[StopFn] = None, temperature: float = 0.0, top_p: float = 1.0,
                    seed: Optional[Union[int, Sequence[int]]] = None) -> list[list[int]]:
    """:func:`stream_generate` collected: the generated ids per prompt (eos dropped)."""
    out: list[list[int]] = [[] for _ in prompts]
    for step in stream_generate(model, prompts, max_new_tokens=max_new_tokens, eos_id=eos_id, pad_id=pad_id,
                                images=images, stop=stop, temperature=temperature, top_p=top_p, seed=seed):
        for i, tok in enumerate(step):
            if tok is not None:
                out[i].append(tok)
    return out
