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
from .precision import upcast


def next_tokens(logits_BV: torch.Tensor, temperature: float = 0.0, top_p: float = 1.0,
                generators: Optional[Sequence[Optional[torch.Generator]]] = None) -> list[int]:
    """One token per row: the argmax when ``temperature == 0``, else a sample from
    ``softmax(logits / temperature)`` restricted to the smallest set of tokens whose
    probability reaches ``top_p`` (nucleus sampling). Row ``i`` draws from ``generators[i]``,
    so a row's tokens do not depend on the other rows of its batch."""
    if temperature <= 0:
        return logits_BV.argmax(-1).tolist()
    probs_BV = torch.softmax(upcast(logits_BV) / temperature, -1)
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

    Prompts are right-padded into one prefill. A row that finishes leaves the batch
    (:meth:`InferenceState.select`), so the rows still decoding pay for no one else; each
    row's logits are exactly those of decoding it alone. A row ends at eos (not yielded),
    at its ``max_new_tokens`` or when ``stop(row, generated)`` is true. ``seed`` (an int:
    row ``i`` uses ``seed + i``; or one seed per row) makes sampling reproducible.
    """
    from .eval.generate import concat_images, model_device, pad_batch  # the evaluators' batching

    n = len(prompts)
    if n == 0:
        return
    limits = [max_new_tokens] * n if isinstance(max_new_tokens, int) else list(max_new_tokens)
    out: list[list[int]] = [[] for _ in range(n)]
    alive = [i for i in range(n) if limits[i] > 0]  # prompt index of each row of the batch
    if not alive:
        return
    generators = _row_generators(n, seed) if temperature > 0 else None
    dev = model_device(model)
    ids, doc, lengths = pad_batch(prompts, pad_id, dev)
    kwargs = {}
    imgs = concat_images(images, list(range(n)))
    if imgs is not None:
        kwargs["images"] = imgs.to(dev)
    res = model(ids, doc_ids=doc, use_cache=True, **kwargs)
    last = res.logits[torch.arange(n, device=dev), (lengths - 1).to(dev)][alive]
    state = res.state if len(alive) == n else res.state.select(torch.tensor(alive, device=dev))
    while True:
        nxt = next_tokens(last, temperature, top_p,
                          [generators[i] for i in alive] if generators is not None else None)
        step_out: list[Optional[int]] = [None] * n
        keep = []  # rows of the batch that go on
        for row, (i, tok) in enumerate(zip(alive, nxt)):
            if eos_id is not None and tok == eos_id:
                continue
            out[i].append(tok)
            step_out[i] = tok
            if not (len(out[i]) >= limits[i] or (stop is not None and stop(i, out[i]))):
                keep.append(row)
        if any(t is not None for t in step_out):
            yield step_out
        if not keep:
            return
        if len(keep) < len(alive):
            state = state.select(torch.tensor(keep, device=dev))
            alive, nxt = [alive[r] for r in keep], [nxt[r] for r in keep]
        res = model(torch.tensor(nxt, device=dev)[:, None], state=state)
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
