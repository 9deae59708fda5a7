"""Text suite: log-likelihood scoring, perplexity / bits-per-byte, multiple choice.

Tokenization notes
------------------
* Every scored sequence starts with ``bos_id``, so the first real token is predicted too.
* **Bits-per-byte counts the UTF-8 bytes of the original text**, not tokens:
  ``bpb = -sum(log p(token)) / (ln 2 * bytes)``. Two tokenizers on the same corpus give
  comparable bpb (perplexity is per token, so it is only comparable for one tokenizer).
  This is the harness's ``bits_per_byte`` too.
* Documents longer than ``max_length`` are scored in strided windows
  (``lm_eval.utils.get_rolling_token_windows``): every token is predicted exactly once,
  each window after the first predicts ``stride`` new tokens with the remaining
  ``max_length - stride`` tokens as context; the last window is filled up with context
  to ``max_length``. ``stride == max_length`` gives the harness HF model's windows.
* A (context, continuation) pair is split like the harness does: trailing spaces of the
  context move to the continuation, the pair is encoded whole and the continuation is
  what follows the context's tokens.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import torch
from lm_eval.utils import get_rolling_token_windows

from .generate import batches, forward_logits

Window = tuple[list[int], list[int]]
"""``(input_ids, targets)``: feed ``input_ids``, score its last ``len(targets)`` positions."""


@torch.no_grad()
def score_windows(model: torch.nn.Module, windows: Sequence[Window], *, pad_id: int,
                  batch_size: int = 8) -> list[tuple[float, bool]]:
    """Sum of target log-probabilities and "all targets greedy" for each window.

    Windows are batched longest-first (right padding, ``doc_ids = -1`` on padding) and
    the results returned in the input order.
    """
    order = sorted(range(len(windows)), key=lambda i: -len(windows[i][0]))
    results: list[Optional[tuple[float, bool]]] = [None] * len(windows)
    for rows in batches(order, batch_size):
        logits_BLV, lengths = forward_logits(model, [windows[i][0] for i in rows], pad_id)
        logp_BLV = torch.log_softmax(logits_BLV.double(), dim=-1)
        for b, i in enumerate(rows):
            inp, tgt = windows[i]
            if len(tgt) > len(inp):
                raise ValueError("a window must have at least as many inputs as targets")
            n, T = int(lengths[b]), len(tgt)
            logp_TV = logp_BLV[b, n - T:n]
            tgt_T = torch.tensor(tgt, dtype=torch.long)
            total = float(logp_TV.gather(1, tgt_T[:, None]).sum())
            greedy = bool((logp_TV.argmax(-1) == tgt_T).all())
            results[i] = (total, greedy)
    return results  # type: ignore[return-value]


def encode_pair(tokenizer: Any, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """``(bos + context ids, continuation ids)`` split the way the harness splits them."""
    n_space = len(context) - len(context.rstrip(" "))
    if n_space:
        continuation = context[-n_space:] + continuation
        context = context[:-n_space]
    whole = tokenizer.encode(context + continuation)
    ctx = tokenizer.encode(context) if context else []
    return [tokenizer.bos_id] + whole[:len(ctx)], whole[len(ctx):]


def loglikelihood(model: torch.nn.Module, tokenizer: Any, requests: Sequence[tuple[str, str]],
                  *, max_length: int = 2048, batch_size: int = 8) -> list[tuple[float, bool]]:
    """``log p(continuation | context)`` and whether greedy decoding gives it, per pair.

    The model sees at most ``max_length`` tokens: the context is cut from the left.
    """
    windows: list[Window] = []
    for context, continuation in requests:
        ctx, cont = encode_pair(tokenizer, context, continuation)
        if not cont:
            raise ValueError(f"empty continuation for context {context[:40]!r}")
        windows.append(((ctx + cont)[:-1][-max_length:], cont))
    return score_windows(model, windows, pad_id=tokenizer.pad_id, batch_size=batch_size)


def rolling_windows(token_ids: Sequence[int], bos_id: int, max_length: int,
                    stride: Optional[int] = None) -> list[Window]:
    """Strided windows that predict every token of ``token_ids`` exactly once."""
    stride = max_length if stride is None else stride
    if not 1 <= stride <= max_length:
        raise ValueError(f"stride must be in [1, max_length={max_length}], got {stride}")
    return [(list(a), list(b)) for a, b in get_rolling_token_windows(
        token_list=list(token_ids), prefix_token=bos_id, max_seq_len=max_length,
        context_len=max_length - stride + 1)]


def rolling_loglikelihood(model: torch.nn.Module, tokenizer: Any, texts: Sequence[str], *,
                          max_length: int = 2048, stride: Optional[int] = None,
                          batch_size: int = 8) -> list[tuple[float, int]]:
    """``(sum log p(tokens | bos), number of tokens)`` of each whole document."""
    windows: list[Window] = []
    owner: list[int] = []
    n_tokens = []
    for d, text in enumerate(texts):
        ids = tokenizer.encode(text)
        n_tokens.append(len(ids))
        for w in rolling_windows(ids, tokenizer.bos_id, max_length, stride):
            windows.append(w)
            owner.append(d)
    scores = score_windows(model, windows, pad_id=tokenizer.pad_id, batch_size=batch_size)
    totals = [0.0] * len(texts)
    for d, (lp, _) in zip(owner, scores):
        totals[d] += lp
    return list(zip(totals, n_tokens))


def read_corpus(path: Union[str, Path], text_key: str = "text") -> list[str]:
    """Documents of a corpus: ``.jsonl`` -> one per line (field ``text_key``); a
    ``.json`` list of strings or of objects; any other file -> the whole file;
    a directory -> its files in name order."""
    path = Path(path)
    if path.is_dir():
        return [d for p in sorted(path.iterdir()) if p.is_file() for d in read_corpus(p, text_key)]
    if path.suffix == ".jsonl":
        with open(path, encoding="utf-8") as f:
            return [json.loads(line)[text_key] for line in f if line.strip()]
    if path.suffix == ".json":
        data = json.loads(path.read_text(encoding="utf-8"))
        return [d if isinstance(d, str) else d[text_key] for d in data]
    return [path.read_text(encoding="utf-8")]


def perplexity(model: torch.nn.Module, tokenizer: Any, texts: Sequence[str], *,
               max_length: int = 2048, stride: Optional[int] = None,
               batch_size: int = 8) -> dict:
    """Corpus perplexity (per token), bits-per-byte and word perplexity, plus per-document
    numbers. Totals are summed over documents before dividing (token-weighted)."""
    scores = rolling_loglikelihood(model, tokenizer, texts, max_length=max_length,
                                   stride=stride, batch_size=batch_size)
    items = []
    for text, (lp, n) in zip(texts, scores):
        nbytes = len(text.encode("utf-8"))
        items.append({"logprob": lp, "tokens": n, "bytes": nbytes,
                      "words": len(re.split(r"\s+", text)),
                      "bits_per_byte": -lp / (math.log(2) * nbytes) if nbytes else None})
    lp = sum(i["logprob"] for i in items)
    tokens = sum(i["tokens"] for i in items)
    nbytes = sum(i["bytes"] for i in items)
    words = sum(i["words"] for i in items)
    summary = {
        "documents": len(items), "tokens": tokens, "bytes": nbytes,
        "nll_per_token": -lp / tokens, "perplexity": math.exp(-lp / tokens),
        "bits_per_byte": -lp / (math.log(2) * nbytes), "word_perplexity": math.exp(-lp / words),
        "max_length": max_length, "stride": stride if stride is not None else max_length,
    }
    return {"summary": summary, "items": items}


@dataclass
class MultipleChoiceItem:
    """One question: ``context``, candidate ``choices`` and the index of the right one."""
    context: str
    choices: list[str]
    label: int


def multiple_choice(model: torch.nn.Module, tokenizer: Any,
                    items: Sequence[Union[MultipleChoiceItem, dict]], *, delimiter: str = " ",
                    max_length: int = 2048, batch_size: int = 8) -> dict:
    """Log-likelihood multiple choice, as the harness scores it.

    Each choice is scored as ``log p(delimiter + choice | context)``.
    ``acc``: argmax of the log-likelihoods; ``acc_norm``: argmax of log-likelihood divided
    by the choice's length in characters (harness ``acc_norm``). Ties go to the first.
    """
    items = [i if isinstance(i, MultipleChoiceItem) else MultipleChoiceItem(**i) for i in items]
    requests = [(it.context, delimiter + c) for it in items for c in it.choices]
    lls = [lp for lp, _ in loglikelihood(model, tokenizer, requests, max_length=max_length,
                                         batch_size=batch_size)]
    out, k = [], 0
    for it in items:
        ll = lls[k:k + len(it.choices)]
        k += len(it.choices)
        norm = [v / len(c) for v, c in zip(ll, it.choices)]
        pred = max(range(len(ll)), key=lambda j: (ll[j], -j))
        pred_norm = max(range(len(norm)), key=lambda j: (norm[j], -j))
        out.append({"context": it.context, "loglikelihoods": ll, "label": it.label,
                    "pred": pred, "pred_norm": pred_norm,
                    "acc": float(pred == it.label), "acc_norm": float(pred_norm == it.label)})
    n = max(len(out), 1)
    summary = {"n": len(out), "acc": sum(o["acc"] for o in out) / n,
               "acc_norm": sum(o["acc_norm"] for o in out) / n}
    return {"summary": summary, "items": out}
