"""Long-context suite: passkey retrieval, needle-in-a-haystack, loss by position.

Prompts are generated locally and deterministically from ``seed``: the same (task,
length, depth, sample, seed) always gives the same token ids. A prompt of length ``L``
has exactly ``L`` tokens (prefix + filler + needle at ``depth`` of the filler + question),
built by concatenating separately encoded pieces so that the length is exact for any
tokenizer. ``depth`` 0 puts the needle first, 1 last.
"""
from __future__ import annotations

import math
import random
import re
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import torch

from .generate import GenerateFn, batches, forward_logits, greedy_generate
from .io import write_json

DEFAULT_LENGTHS = (1024, 2048, 4096, 8192, 16384, 32768)
DEFAULT_DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)

_PASSKEY_PREFIX = ("There is important info hidden inside a lot of irrelevant text. "
                   "Find it and memorize it. I will quiz you about the important information there.")
_PASSKEY_FILLER = " The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
_PASSKEY_NEEDLE = " The pass key is {key}. Remember it. {key} is the pass key."
_PASSKEY_QUESTION = " What is the pass key? The pass key is"

_WORDS = ("river stone garden window morning paper silver orange quiet market bridge cloud "
          "letter forest candle harbor winter yellow engine pocket ladder meadow violin "
          "blanket castle pencil thunder island mirror basket").split()
_NEEDLE_PREFIX = "Below is a long text. Somewhere in it is a special magic number; remember it."
_NEEDLE = " The special magic number for {city} is: {value}."
_NEEDLE_QUESTION = " What is the special magic number for {city}? The special magic number for {city} is:"
_CITIES = ("Lisbon", "Nairobi", "Osaka", "Quito", "Tallinn", "Hobart", "Bergen", "Cusco")


def _assemble(tokenizer: Any, length: int, depth: float, prefix: str, needle: str,
              question: str, filler: Callable[[int], str]) -> list[int]:
    """bos + prefix + filler[:k] + needle + filler[k:] + question, exactly ``length`` ids."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    head = [tokenizer.bos_id] + tokenizer.encode(prefix)
    ndl, q = tokenizer.encode(needle), tokenizer.encode(question)
    budget = length - len(head) - len(ndl) - len(q)
    if budget < 0:
        raise ValueError(f"length {length} is too short for the prompt ({length - budget} ids)")
    fill: list[int] = []
    i = 0
    while len(fill) < budget:
        fill += tokenizer.encode(filler(i))
        i += 1
    fill = fill[:budget]
    k = int(round(depth * budget))
    return head + fill[:k] + ndl + fill[k:] + q


def passkey_prompt(tokenizer: Any, length: int, depth: float, seed: int = 0,
                   sample: int = 0) -> tuple[list[int], str]:
    """Passkey retrieval prompt of ``length`` ids and its answer (a 5-digit key)."""
    rng = random.Random(f"passkey-{seed}-{length}-{depth}-{sample}")
    key = str(rng.randint(10000, 99999))
    ids = _assemble(tokenizer, length, depth, _PASSKEY_PREFIX, _PASSKEY_NEEDLE.format(key=key),
                    _PASSKEY_QUESTION, lambda i: _PASSKEY_FILLER)
    return ids, key


def needle_prompt(tokenizer: Any, length: int, depth: float, seed: int = 0,
                  sample: int = 0) -> tuple[list[int], str]:
    """Needle-in-a-haystack prompt: a haystack of seeded random sentences, one
    "special magic number" needle; the answer is the 7-digit number."""
    rng = random.Random(f"needle-{seed}-{length}-{depth}-{sample}")
    city, value = rng.choice(_CITIES), str(rng.randint(1_000_000, 9_999_999))
    hay_seed = rng.random()

    def sentence(i: int) -> str:
        r = random.Random(f"{hay_seed}-{i}")
        words = [r.choice(_WORDS) for _ in range(r.randint(5, 11))]
        return " " + " ".join(words).capitalize() + "."

    ids = _assemble(tokenizer, length, depth, _NEEDLE_PREFIX,
                    _NEEDLE.format(city=city, value=value),
                    _NEEDLE_QUESTION.format(city=city), sentence)
    return ids, value


PROMPTS = {"passkey": passkey_prompt, "needle": needle_prompt}


def is_correct(generated: str, answer: str) -> bool:
    """The first number in the generated text is the answer."""
    m = re.search(r"\d+", generated)
    return m is not None and m.group(0) == answer


def plot_heatmap(accuracy: dict, lengths: Sequence[int], depths: Sequence[float],
                 path: Union[str, Path], title: str = "") -> Path:
    """Accuracy heatmap (depth rows x length columns) as a PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grid = [[accuracy[str(L)][str(d)] for L in lengths] for d in depths]
    fig, ax = plt.subplots(figsize=(1.2 * len(lengths) + 2, 0.6 * len(depths) + 1.5))
    im = ax.imshow(grid, vmin=0.0, vmax=1.0, cmap="RdYlGn", aspect="auto")
    ax.set_xticks(range(len(lengths)), [f"{L // 1024}k" if L >= 1024 else str(L) for L in lengths])
    ax.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths])
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("needle depth")
    for r, row in enumerate(grid):
        for c, v in enumerate(row):
            ax.text(c, r, f"{v:.2f}", ha="center", va="center", fontsize=8)
    fig.colorbar(im, ax=ax, label="accuracy")
    ax.set_title(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


@torch.no_grad()
def run_retrieval(model: torch.nn.Module, tokenizer: Any, task: str = "passkey", *,
                  lengths: Sequence[int] = DEFAULT_LENGTHS,
                  depths: Sequence[float] = DEFAULT_DEPTHS, samples: int = 1, seed: int = 0,
                  batch_size: int = 1, max_new_tokens: int = 12,
                  generate_fn: GenerateFn = greedy_generate,
                  ratio_fn: Optional[Callable[[Any], Any]] = None,
                  out_path: Optional[Union[str, Path]] = None,
                  heatmap_path: Optional[Union[str, Path]] = None) -> dict:
    """Accuracy per (length, depth) of ``task`` (``"passkey"`` or ``"needle"``).

    ``summary["accuracy"][str(length)][str(depth)]`` is the fraction correct over
    ``samples`` prompts. ``ratio_fn(model_output)``, if given, is applied to one full
    forward per length (e.g. to read the realised compression ratio) and reported in
    ``summary["ratio"][str(length)]``.
    """
    make = PROMPTS[task]
    cells = [(L, d, s) for L in lengths for d in depths for s in range(samples)]
    prompts = [make(tokenizer, L, d, seed, s) for L, d, s in cells]
    model.eval()
    items = []
    for rows in batches(range(len(cells)), batch_size):
        gen = generate_fn(model, [prompts[i][0] for i in rows], max_new_tokens=max_new_tokens,
                          eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id)
        for i, ids in zip(rows, gen):
            L, d, s = cells[i]
            text = tokenizer.decode(ids)
            items.append({"length": L, "depth": d, "sample": s, "answer": prompts[i][1],
                          "generated": text, "correct": is_correct(text, prompts[i][1])})
    acc = {str(L): {str(d): sum(it["correct"] for it in items
                                if it["length"] == L and it["depth"] == d) / samples
                    for d in depths} for L in lengths}
    summary: dict = {"task": task, "lengths": list(lengths), "depths": list(depths),
                     "samples": samples, "seed": seed, "accuracy": acc,
                     "overall": sum(it["correct"] for it in items) / max(len(items), 1)}
    if ratio_fn is not None:
        device = next(iter(model.parameters()), torch.empty(0)).device
        summary["ratio"] = {}
        for L in lengths:
            ids = torch.tensor([make(tokenizer, L, depths[0], seed, 0)[0]], device=device)
            summary["ratio"][str(L)] = ratio_fn(model(ids, doc_ids=torch.zeros_like(ids)))
    if heatmap_path is not None:
        summary["heatmap"] = str(plot_heatmap(acc, lengths, depths, heatmap_path, title=task))
    result = {"summary": summary, "items": items}
    if out_path is not None:
        write_json(result, out_path)
    return result


def position_buckets(max_length: int) -> list[int]:
    """Bucket edges ``0, 1, 2, 4, ..., max_length`` (powers of two)."""
    edges = [0] + [2 ** k for k in range(int(math.log2(max(max_length, 1))) + 1)]
    return edges + ([max_length] if edges[-1] < max_length else [])


@torch.no_grad()
def loss_by_position(model: torch.nn.Module, tokenizer: Any, texts: Sequence[str], *,
                     max_length: int = 32768, edges: Optional[Sequence[int]] = None,
                     batch_size: int = 1) -> dict:
    """Mean next-token NLL (nats) per position bucket ``[edges[i], edges[i+1])``.

    Each document is ``bos + encode(text)`` cut to ``max_length + 1`` ids; position ``t``
    is the prediction of id ``t + 1`` from ids ``0..t``.
    """
    edges = list(edges) if edges is not None else position_buckets(max_length)
    seqs = [([tokenizer.bos_id] + tokenizer.encode(t))[:max_length + 1] for t in texts]
    seqs = [s for s in seqs if len(s) >= 2]
    total = torch.zeros(len(edges) - 1, dtype=torch.float64)
    count = torch.zeros(len(edges) - 1, dtype=torch.long)
    model.eval()
    for rows in batches(range(len(seqs)), batch_size):
        logits_BLV, lengths = forward_logits(model, [seqs[i][:-1] for i in rows], tokenizer.pad_id)
        logp_BLV = torch.log_softmax(logits_BLV.double(), -1)
        for b, i in enumerate(rows):
            n = int(lengths[b])
            tgt = torch.tensor(seqs[i][1:], dtype=torch.long)
            nll_T = -logp_BLV[b, :n].gather(1, tgt[:, None]).squeeze(1)
            bucket = torch.bucketize(torch.arange(n), torch.tensor(edges[1:]), right=True)
            keep = bucket < len(edges) - 1
            total.index_add_(0, bucket[keep], nll_T[keep])
            count.index_add_(0, bucket[keep], torch.ones_like(bucket[keep]))
    buckets = [{"start": edges[k], "end": edges[k + 1], "tokens": int(count[k]),
                "nll": float(total[k] / count[k]) if count[k] else None}
               for k in range(len(edges) - 1)]
    return {"summary": {"edges": edges, "documents": len(seqs)}, "buckets": buckets}
