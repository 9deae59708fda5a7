"""The second experiment protocol's rules, as small checkable functions (issue 16).

- **Trained length**: held-out text is scored in windows of at most the training row
  length (:func:`eval_window`); longer windows would score positions never trained.
- **No leakage**: the held-out split shares no run of ``RUN`` (64) characters with the
  training split. :class:`RunIndex` holds a rolling hash of every 64-character window of
  the training text; a held-out window with a hash in it is a shared run (64-bit hashes:
  a false hit is ~1e-12 likely per window pair class, never a miss).
- **Matched compute**: a chunked variant's realised held-out ratio must be within
  ``RATIO_TOL`` (5%) of its target (:func:`ratio_matched`), or its row is excluded from
  verdicts.
- **One pass**: steps are sized for one epoch of the training tokens
  (:func:`one_pass_steps`); mixing weights are proportional to source size, so every
  source runs out together.
"""
from __future__ import annotations

import math
from typing import Iterable, Optional, Sequence

import numpy as np

RUN = 64  # characters: a shared run this long counts as leaked text
RATIO_TOL = 0.05  # realised / target ratio within +-5% = compute matched


def eval_window(train_seq_len: int, requested: Optional[int] = None) -> int:
    """The held-out scoring window: the training row length, or a shorter ``requested``.
    A longer one is refused (length generalisation belongs in a table of its own)."""
    if requested is None:
        return int(train_seq_len)
    if requested > train_seq_len:
        raise ValueError(f"eval window {requested} exceeds the trained row length {train_seq_len}: positions beyond "
                         "it were never trained (score length generalisation separately)")
    return int(requested)


def windows_of(ids: Sequence[int], window: int) -> list[list[int]]:
    """``ids`` cut into consecutive pieces of at most ``window`` tokens (every token in one)."""
    return [list(ids[i:i + window]) for i in range(0, len(ids), window)]


# ------------------------------------------------------------------------------ leakage
_B = np.uint64(0x9E3779B97F4A7C15)  # odd, so it has an inverse mod 2**64


_POW: dict[str, np.ndarray] = {}  # B^i and B^-i, grown on demand (shared by all calls)


def _powers(n: int) -> tuple[np.ndarray, np.ndarray]:
    if len(_POW.get("fwd", ())) < n:
        m = max(n, 2 * len(_POW.get("fwd", ())), 4096)
        with np.errstate(over="ignore"):
            for key, base in (("fwd", int(_B)), ("inv", pow(int(_B), -1, 2 ** 64))):
                b = np.full(m, base, np.uint64)
                b[0] = 1
                _POW[key] = np.cumprod(b, dtype=np.uint64)
    return _POW["fwd"][:n], _POW["inv"][:n]


def window_hashes(text: str, run: int = RUN) -> np.ndarray:
    """64-bit polynomial hashes of every ``run``-character window of ``text`` (uint64,
    ``len(text) - run + 1`` of them; empty when shorter), all computed at once:
    with ``Q[i] = sum_{j<i} c_j B^-j`` the window at ``i`` hashes to ``(Q[i+run] - Q[i]) B^i``
    (arithmetic mod 2**64, which numpy's uint64 wrap-around does for us)."""
    n = len(text) - run + 1
    if n <= 0:
        return np.zeros(0, np.uint64)
    c = np.frombuffer(text.encode("utf-32-le"), np.uint32).astype(np.uint64) + np.uint64(1)
    fwd, inv = _powers(len(c))
    with np.errstate(over="ignore"):
        q = np.concatenate([np.zeros(1, np.uint64), np.cumsum(c * inv, dtype=np.uint64)])
        return (q[run:run + n] - q[:n]) * fwd[:n]


class RunIndex:
    """Hashes of every ``run``-character window of the training texts, for finding the
    held-out characters that sit in a run shared with training."""

    def __init__(self, texts: Iterable[str] = (), run: int = RUN) -> None:
        self.run = run
        parts = [window_hashes(t, run) for t in texts]
        # sorted, duplicates kept: np.unique is ~20x slower than a sort here and searchsorted needs no dedupe
        self._hashes = np.sort(np.concatenate(parts)) if parts else np.zeros(0, np.uint64)

    def shared_mask(self, text: str) -> np.ndarray:
        """Per character of ``text``: does it sit inside a ``run``-window also in training?"""
        h = window_hashes(text, self.run)
        mask = np.zeros(len(text), bool)
        if not len(h) or not len(self._hashes):
            return mask
        pos = np.searchsorted(self._hashes, h).clip(max=len(self._hashes) - 1)
        hit = self._hashes[pos] == h
        cover = np.zeros(len(text) + 1, np.int64)  # +1 at a hit window's start, -1 after its end
        starts = np.flatnonzero(hit)
        np.add.at(cover, starts, 1)
        np.add.at(cover, starts + self.run, -1)
        return np.cumsum(cover[:-1]) > 0

    def shares_run(self, text: str) -> bool:
        return bool(self.shared_mask(text).any())


def overlap(train_texts: Iterable[str], held_texts: Iterable[str], run: int = RUN,
            index: Optional[RunIndex] = None) -> dict:
    """How much held-out text sits in runs of ``run``+ characters shared with training:
    ``{"run", "chars", "shared_chars", "fraction", "docs", "docs_with_shared_run"}``."""
    idx = index if index is not None else RunIndex(train_texts, run)
    chars = shared = docs = hit = 0
    for text in held_texts:
        m = idx.shared_mask(text)
        chars += len(text)
        shared += int(m.sum())
        docs += 1
        hit += bool(m.any())
    return {"run": idx.run, "chars": chars, "shared_chars": shared, "fraction": shared / max(chars, 1), "docs": docs,
            "docs_with_shared_run": hit}


# ---------------------------------------------------------------------- matched compute
def ratio_matched(realised: Optional[float], target: float, tol: float = RATIO_TOL) -> bool:
    """A chunked variant is compute matched when ``|realised / target - 1| <= tol``."""
    if realised is None or not math.isfinite(realised) or target <= 0:
        return False
    return abs(realised / target - 1.0) <= tol + 1e-12


# ----------------------------------------------------------------------------- one pass
def one_pass_steps(train_tokens: int, tokens_per_step: int, epochs: float = 1.0) -> int:
    """Optimizer steps that see ``epochs`` passes over ``train_tokens`` (at least 1).
    Rounded down so that no document is seen more than ``ceil(epochs)`` times."""
    if tokens_per_step < 1:
        raise ValueError(f"tokens_per_step must be >= 1, got {tokens_per_step}")
    return max(1, int(train_tokens * epochs // tokens_per_step))


def size_weights(sizes: dict[str, int]) -> dict[str, float]:
    """Mixing weights proportional to each source's number of documents: the loader draws
    a source per document, so every source then runs out at about the same time."""
    total = sum(sizes.values())
    if total <= 0:
        raise ValueError("all sources are empty")
    return {k: v / total for k, v in sizes.items()}
