"""Decoding state: everything incremental decoding carries from one call to the next.

One object per kind of layer, each with the methods that read and advance it:

* :class:`KVCache`: keys/values of one attention layer, and :class:`CacheIndex`, the
  per-row key counts and documents shared by the caches of a layer stack;
* :class:`TokenState`: the token-level layers (encoder, decoder: one cache each) and
  :class:`Previous`, the last real token of each row, which the chunk router, the forced
  boundaries and the in-document positions of the next tokens continue from;
* :class:`ConceptState`: the concept model's caches (one per loop x layer) and the
  dechunk EMA state ``z`` of each row's current concept;
* :class:`InferenceState`: the two, as ``ConceptMoE.forward(use_cache=True)`` returns
  them. :meth:`InferenceState.stateless` stands for "no decoding" (a full forward):
  no caches, nothing before, nothing kept.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .positions import segment_positions

NO_DOC = -(2**31)  # the document id of "nothing before"


REBOUND_EVERY = 64  # calls between re-reading the longest row of an uneven cache (one host sync)


@dataclass
class Slots:
    """Where one call's new keys go in every cache of a stack (:meth:`CacheIndex.plan`).

    Each row's valid keys are kept compact, in order, at ``[0, lengths[b])``; padding
    keys go after them, where the next call overwrites them. ``rows`` is a sub-batch
    (decoding, the concept model run only on the rows that start a concept).
    """

    index_BL: torch.Tensor  # [B', L] slot of each new key (B' = len(rows) for a sub-batch)
    start: Optional[int]  # every row's keys go to [start, start + L) (None: scattered)
    length: int  # keys a query reads after the append (>= every row's count)
    lengths: torch.Tensor  # [B] valid keys per row after the append
    rows: Optional[torch.Tensor] = None


class CacheIndex:
    """Bookkeeping shared by the KV caches of one layer stack (they hold the same keys).

    Per row: the document id of each cached key and the number of valid keys; on the
    host: ``length``, an upper bound of those counts that attention reads up to. A row
    that skips a call (padding, or no new concept) adds no key, so a concept cache holds
    ``L / R`` keys per row even when rows start concepts at different steps.
    """

    def __init__(self) -> None:
        self.doc: Optional[torch.Tensor] = None  # [B, capacity]
        self.lengths: Optional[torch.Tensor] = None  # [B]
        self.length = 0
        self.even = True  # every row holds exactly ``length`` keys
        self.uniform = True  # every row's keys are of one document
        self.row_doc: Optional[torch.Tensor] = None  # [B] that document (-1: no key yet)
        self.known_doc: Optional[int] = None  # ... or, while row_doc is None, the host knows it
        self._calls = 0

    def plan(self, doc_BL: torch.Tensor, valid_BL: torch.Tensor, all_valid: bool,
             rows: Optional[torch.Tensor] = None, known_doc: Optional[int] = None) -> Slots:
        """Reserve slots for these keys (``[B, L]``, or ``[len(rows), 1]`` for a sub-batch)
        and record their documents; every cache of the stack then appends at them.
        ``known_doc``: every new key is valid and of this document (host knowledge)."""
        Bq, L = doc_BL.shape
        dev = doc_BL.device
        if self.lengths is None:
            B = Bq if rows is None else int(rows.max()) + 1
            self.lengths = torch.zeros(B, dtype=torch.long, device=dev)
        self._calls += 1
        if not self.even and (self._calls % REBOUND_EVERY == 0):
            self.length = int(self.lengths.max())  # shrink the bound to the longest row
        old = self.lengths if rows is None else self.lengths[rows]
        self._track_documents(doc_BL, valid_BL, rows, known_doc)
        if rows is None and self.even and all_valid:
            start = self.length
            index = (start + torch.arange(L, device=dev)).expand(Bq, L)
            added = torch.full_like(old, L)
        else:
            start = None
            rank = torch.cumsum(valid_BL.long(), 1) - 1
            added = valid_BL.sum(1)
            pad_rank = torch.cumsum((~valid_BL).long(), 1) - 1
            index = torch.where(valid_BL, old[:, None] + rank, (old + added)[:, None] + pad_rank)
        lengths = old + added if rows is None else self.lengths.index_put((rows,), old + added)
        self._grow_doc(self.lengths.shape[0], self.length + L, dev)
        self.length += L
        if rows is None:
            self.doc.scatter_(1, index, torch.where(valid_BL, doc_BL, -1))
        else:
            self.doc[rows, index[:, 0]] = doc_BL[:, 0]
        self.even = self.even and all_valid and rows is None
        self.lengths = lengths
        return Slots(index, start, self.length, lengths, rows)

    def _track_documents(self, doc_BL: torch.Tensor, valid_BL: torch.Tensor, rows: Optional[torch.Tensor],
                         known_doc: Optional[int]) -> None:
        """Keep :attr:`uniform`: every row's valid keys share one document (then a query
        of that document sees all of them and needs no document mask)."""
        if not self.uniform:
            return
        if known_doc is not None and self.row_doc is None and self.known_doc in (None, known_doc):
            self.known_doc = known_doc  # every key so far is of this document: nothing to read
            return
        big = torch.iinfo(torch.long).max
        lo = torch.where(valid_BL, doc_BL, big).amin(1)
        hi = torch.where(valid_BL, doc_BL, -1).amax(1)
        has = hi >= 0
        row_doc = self.row_doc if self.row_doc is not None else \
            torch.full_like(self.lengths, -1 if self.known_doc is None else self.known_doc)
        self.known_doc = None
        before = row_doc if rows is None else row_doc[rows]
        ok = ~has | ((hi == lo) & ((before < 0) | (before == lo)))
        after = torch.where(has, hi, before)
        row_doc = after if rows is None else row_doc.index_put((rows,), after)
        first_with_keys = torch.where(row_doc >= 0, row_doc, big).min()
        uniform, last, first = torch.stack([ok.all().long(), row_doc.max(), first_with_keys]).tolist()  # one sync
        self.uniform = bool(uniform)
        if self.uniform and last == first:  # every row's keys are of one document: remember it on the host
            self.row_doc, self.known_doc = None, last
        else:
            self.row_doc = row_doc

    def _grow_doc(self, B: int, need: int, device: torch.device) -> None:
        if self.doc is None or need > self.doc.shape[1]:
            like = torch.empty(B, 1, dtype=torch.long, device=device)
            self.doc = _grown(self.doc, like, 1, _capacity(need, self.doc), self.length)

    def docs(self) -> torch.Tensor:
        """``[B, length]`` document ids of the keys a query reads (-1: no key)."""
        return self.doc[:, :self.length]

    def select(self, rows: torch.Tensor) -> "CacheIndex":
        out = CacheIndex()
        if self.lengths is not None:
            out.doc, out.lengths = self.doc[rows], self.lengths[rows]
            out.row_doc = self.row_doc[rows] if self.row_doc is not None else None
        out.length, out.even, out.uniform, out._calls = self.length, self.even, self.uniform, self._calls
        out.known_doc = self.known_doc
        return out


def _capacity(need: int, old: Optional[torch.Tensor], dim: int = 1) -> int:
    """Head-room so the decode steps after a prefill do not copy the cache."""
    return max(need + 256, 2 * (0 if old is None else old.shape[dim]))


class KVCache:
    """Keys/values of one attention layer, ``[B, H, capacity, d]``.

    Keys go where the stack's :class:`CacheIndex` planned (:class:`Slots`): each row's
    valid keys compact at the front. Storage grows by doubling, so an append costs
    amortised O(new keys), not a copy of everything cached.
    """

    def __init__(self) -> None:
        self._k = self._v = None
        self.length = 0

    def append(self, k: torch.Tensor, v: torch.Tensor, slots: Slots) -> tuple[torch.Tensor, torch.Tensor]:
        """Add ``k, v [B, H, L, d]`` (``[len(rows), H, 1, d]`` for a sub-batch) at ``slots``;
        return the whole cache ``[B, H, slots.length, d]`` (keys past a row's count are
        not its keys: the caller masks them)."""
        if self._k is None or slots.length > self._k.shape[2]:
            B = slots.lengths.shape[0]
            shape = (B, k.shape[1], _capacity(slots.length, self._k, 2), k.shape[3])
            self._k, self._v = (_grown(old, new.new_empty(shape), 2, shape[2], self.length)
                                for old, new in ((self._k, k), (self._v, v)))
        if slots.rows is not None:
            at = slots.index_BL[:, 0]
            self._k[slots.rows, :, at], self._v[slots.rows, :, at] = k[:, :, 0], v[:, :, 0]
        elif slots.start is not None:
            e = slots.start + k.shape[2]
            self._k[:, :, slots.start:e], self._v[:, :, slots.start:e] = k, v
        else:
            idx = slots.index_BL[:, None, :, None].expand_as(k)
            self._k.scatter_(2, idx, k)
            self._v.scatter_(2, idx, v)
        self.length = slots.length
        return self._k[:, :, :self.length], self._v[:, :, :self.length]

    def row(self, b: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Views of row ``b``'s first ``n`` keys and values, ``[1, H, n, d]`` (no copy)."""
        return self._k[b:b + 1, :, :n], self._v[b:b + 1, :, :n]

    def nbytes(self, n_keys: int) -> int:
        """Bytes of ``n_keys`` keys and values (the stack's valid keys: not padding, not
        spare capacity; the counts live in the stack's :class:`CacheIndex`)."""
        if self._k is None:
            return 0
        return 2 * self._k.shape[1] * self._k.shape[3] * self._k.element_size() * n_keys

    def select(self, rows: torch.Tensor) -> "KVCache":
        out = KVCache()
        if self._k is not None:
            out._k, out._v = self._k[rows], self._v[rows]
        out.length = self.length
        return out


def _select_caches(caches: list[Optional[KVCache]], rows: torch.Tensor) -> list[Optional[KVCache]]:
    return [c.select(rows) if c is not None else None for c in caches]


def _grown(old: Optional[torch.Tensor], like: torch.Tensor, dim: int, cap: int, used: int) -> torch.Tensor:
    shape = list(like.shape)
    shape[dim] = cap
    buf = like.new_zeros(shape)
    if old is not None and used:
        buf.narrow(dim, 0, used).copy_(old.narrow(dim, 0, used))
    return buf


@dataclass
class Previous:
    """The last real token before the current chunk of each row."""

    h: torch.Tensor  # [B, D] its encoder state (the router compares against it)
    doc: torch.Tensor  # [B]
    modality: torch.Tensor  # [B]
    valid: torch.Tensor  # [B] bool (False: nothing came before)
    segment_pos: torch.Tensor  # [B] its index inside its forced segment (fixed router)
    pos: torch.Tensor  # [B] its position inside its document (RoPE)

    @classmethod
    def nothing(cls, B: int, D: int, device: torch.device, dtype: torch.dtype) -> "Previous":
        """Nothing before: no document, no modality, invalid, and positions that make the
        next token's ``-1 + 1 = 0``."""
        minus_one = torch.full((B,), -1, dtype=torch.long, device=device)
        return cls(h=torch.zeros(B, D, dtype=dtype, device=device),
                   doc=torch.full((B,), NO_DOC, dtype=torch.long, device=device), modality=minus_one,
                   valid=torch.zeros(B, dtype=torch.bool, device=device), segment_pos=minus_one, pos=minus_one)

    def select(self, rows: torch.Tensor) -> "Previous":
        return Previous(self.h[rows], self.doc[rows], self.modality[rows], self.valid[rows],
                        self.segment_pos[rows], self.pos[rows])

    @torch.no_grad()
    def after(self, h_BLD: torch.Tensor, doc_BL: torch.Tensor, valid_BL: torch.Tensor, modality_BL: torch.Tensor,
              forced_BL: torch.Tensor, pos_BL: torch.Tensor) -> "Previous":
        """The last real token once these tokens are seen (rows without one keep theirs)."""
        B, L = doc_BL.shape
        seg_BL = segment_positions(forced_BL, self.segment_pos)
        if L == 1:  # a decode step: the token itself, where it is real
            has_B = valid_BL[:, 0]
            last = lambda x_BL: x_BL[:, 0]  # noqa: E731
        else:
            idx_B = torch.where(valid_BL, torch.arange(L, device=doc_BL.device), -1).max(1).values
            has_B = idx_B >= 0
            at_B, rows = idx_B.clamp_min(0), torch.arange(B, device=doc_BL.device)
            last = lambda x_BL: x_BL[rows, at_B]  # noqa: E731

        def pick(x_BL: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
            new = last(x_BL)
            return torch.where(has_B.view(-1, *([1] * (new.dim() - 1))), new, old)

        return Previous(h=pick(h_BLD.detach(), self.h), doc=pick(doc_BL, self.doc),
                        modality=pick(modality_BL, self.modality), valid=has_B | self.valid,
                        segment_pos=pick(seg_BL, self.segment_pos), pos=pick(pos_BL, self.pos))


@dataclass
class TokenState:
    """Token-level layers: a KV cache per encoder and decoder layer (None: not cached),
    their shared :class:`CacheIndex`, and the previous token of each row (None until
    the first call)."""

    encoder: list[Optional[KVCache]]
    decoder: list[Optional[KVCache]]
    index: Optional[CacheIndex] = None
    prev: Optional[Previous] = None
    keeps: bool = True  # False: a full forward, nothing to remember

    def previous(self, B: int, D: int, device: torch.device, dtype: torch.dtype) -> Previous:
        """What came before this call's tokens."""
        return self.prev if self.prev is not None else Previous.nothing(B, D, device, dtype)

    def advance(self, prev: Previous, h_BLD: torch.Tensor, doc_BL: torch.Tensor, valid_BL: torch.Tensor,
                modality_BL: torch.Tensor, forced_BL: torch.Tensor, pos_BL: torch.Tensor) -> None:
        """Remember the last real token of this call (the caches advanced themselves)."""
        if self.keeps:
            self.prev = prev.after(h_BLD, doc_BL, valid_BL, modality_BL, forced_BL, pos_BL)

    def select(self, rows: torch.Tensor) -> "TokenState":
        return TokenState(_select_caches(self.encoder, rows), _select_caches(self.decoder, rows),
                          self.index.select(rows) if self.index is not None else None,
                          self.prev.select(rows) if self.prev is not None else None, self.keeps)


@dataclass
class ConceptState:
    """Concept-level layers: a KV cache per loop x concept layer, their shared
    :class:`CacheIndex`, and the dechunk EMA state of each row's current concept
    (None: none yet, the EMA starts from 0)."""

    caches: list[Optional[KVCache]]
    index: Optional[CacheIndex] = None
    z_BD: Optional[torch.Tensor] = None
    keeps: bool = True

    def advance(self, z_last_BD: torch.Tensor) -> None:
        if self.keeps:
            self.z_BD = z_last_BD.detach()

    def select(self, rows: torch.Tensor) -> "ConceptState":
        return ConceptState(_select_caches(self.caches, rows),
                            self.index.select(rows) if self.index is not None else None,
                            self.z_BD[rows] if self.z_BD is not None else None, self.keeps)


@dataclass
class InferenceState:
    """What ``ConceptMoE.forward(use_cache=True)`` carries between calls."""

    tokens: TokenState
    concepts: ConceptState
    caching: bool = True

    @classmethod
    def new(cls, n_encoder: int, n_concept_slots: int, n_decoder: int) -> "InferenceState":
        """Empty caches for incremental decoding."""
        return cls(TokenState([KVCache() for _ in range(n_encoder)], [KVCache() for _ in range(n_decoder)],
                              CacheIndex()),
                   ConceptState([KVCache() for _ in range(n_concept_slots)], CacheIndex()))

    @classmethod
    def stateless(cls, n_encoder: int, n_concept_slots: int, n_decoder: int) -> "InferenceState":
        """A full forward: no caches, nothing before, nothing kept."""
        return cls(TokenState([None] * n_encoder, [None] * n_decoder, keeps=False),
                   ConceptState([None] * n_concept_slots, keeps=False), caching=False)

    def select(self, rows: torch.Tensor) -> "InferenceState":
        """The state of these rows only (``rows``: a 1-D index tensor, repeats allowed),
        e.g. to drop finished sequences from a batch or to tile one prefilled row.
        Copies the selected rows; the original is unchanged."""
        rows = rows.to(torch.long)
        return InferenceState(self.tokens.select(rows), self.concepts.select(rows), self.caching)

    def kv_bytes(self) -> dict[str, int]:
        """Bytes of keys and values held, per stack and in total."""
        def held(caches: list[Optional[KVCache]], index: Optional[CacheIndex]) -> int:
            n_keys = int(index.lengths.sum()) if index is not None and index.lengths is not None else 0
            return sum(c.nbytes(n_keys) for c in caches if c is not None)

        parts = {"encoder": held(self.tokens.encoder, self.tokens.index),
                 "concept": held(self.concepts.caches, self.concepts.index),
                 "decoder": held(self.tokens.decoder, self.tokens.index)}
        parts["total"] = sum(parts.values())
        return parts


__all__ = ["Slots", "CacheIndex", "KVCache", "Previous", "TokenState", "ConceptState", "InferenceState"]
