"""Decoding state: everything incremental decoding carries from one call to the next.

One object per kind of layer, each with the methods that read and advance it:

* :class:`KVCache`: keys/values of one attention layer;
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


class KVCache:
    """Keys/values of one attention layer, appended along the sequence dim.

    Storage grows by doubling so an append costs amortised O(new tokens), not a copy
    of everything cached. Per-key document id and validity are kept so masks for new
    queries can be built against the whole cache (padding and other documents stay
    invisible during generation too).
    """

    def __init__(self) -> None:
        self._k = self._v = self._doc = self._valid = None
        self.length = 0
        self.uniform = True  # every cached key valid and of the same document (per row)

    def append(self, k: torch.Tensor, v: torch.Tensor, doc: torch.Tensor, valid: torch.Tensor,
               uniform: bool = False):
        """Add ``k, v [B, H, L, d]`` with ``doc, valid [B, L]``; return views of the whole cache.

        ``uniform``: the caller's verdict (:attr:`Visibility.cache_uniform`) that every
        key is now valid and of one document per row.
        """
        n = k.shape[2]
        need = self.length + n
        if self._k is None or need > self._k.shape[2]:
            # Head-room at the prefill so the first decode steps do not copy the cache.
            cap = max(need + 256, 2 * (0 if self._k is None else self._k.shape[2]))
            grow = lambda old, new_like, dim: _grown(old, new_like, dim, cap, self.length)  # noqa: E731
            self._k, self._v = grow(self._k, k, 2), grow(self._v, v, 2)
            self._doc, self._valid = grow(self._doc, doc, 1), grow(self._valid, valid, 1)
        s, e = self.length, need
        self._k[:, :, s:e], self._v[:, :, s:e] = k, v
        self._doc[:, s:e], self._valid[:, s:e] = doc, valid
        self.uniform = uniform
        self.length = need
        return self._k[:, :, :e], self._v[:, :, :e], self._doc[:, :e], self._valid[:, :e]

    def doc_valid(self, extra: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Document ids and validity of the cached keys (plus ``extra`` slots past the end)."""
        return self._doc[:, :self.length + extra], self._valid[:, :self.length + extra]

    def nbytes(self) -> int:
        """Bytes of the keys and values held (not the spare capacity)."""
        if self._k is None:
            return 0
        per = self._k.shape[0] * self._k.shape[1] * self._k.shape[3] * self._k.element_size()
        return 2 * per * self.length


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

    @torch.no_grad()
    def after(self, h_BLD: torch.Tensor, doc_BL: torch.Tensor, valid_BL: torch.Tensor, modality_BL: torch.Tensor,
              forced_BL: torch.Tensor, pos_BL: torch.Tensor) -> "Previous":
        """The last real token once these tokens are seen (rows without one keep theirs)."""
        B, L = doc_BL.shape
        idx_B = torch.where(valid_BL, torch.arange(L, device=doc_BL.device), -1).max(1).values
        has_B = idx_B >= 0
        at_B, rows = idx_B.clamp_min(0), torch.arange(B, device=doc_BL.device)
        seg_BL = segment_positions(forced_BL, self.segment_pos)

        def pick(x_BL: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
            new = x_BL[rows, at_B]
            return torch.where(has_B.view(-1, *([1] * (new.dim() - 1))), new, old)

        return Previous(h=pick(h_BLD.detach(), self.h), doc=pick(doc_BL, self.doc),
                        modality=pick(modality_BL, self.modality), valid=has_B | self.valid,
                        segment_pos=pick(seg_BL, self.segment_pos), pos=pick(pos_BL, self.pos))


@dataclass
class TokenState:
    """Token-level layers: a KV cache per encoder and decoder layer (None: not cached),
    and the previous token of each row (None until the first call)."""

    encoder: list[Optional[KVCache]]
    decoder: list[Optional[KVCache]]
    prev: Optional[Previous] = None
    keeps: bool = True  # False: a full forward, nothing to remember

    def previous(self, B: int, D: int, device: torch.device, dtype: torch.dtype) -> Previous:
        """What came before this call's tokens."""
        return self.prev if self.prev is not None else Previous.nothing(B, D, device, dtype)

    def first_cache(self) -> Optional[KVCache]:
        """A cache of the stack (they all hold the same keys), if any."""
        caches = self.encoder + self.decoder
        return caches[0] if caches else None

    def advance(self, prev: Previous, h_BLD: torch.Tensor, doc_BL: torch.Tensor, valid_BL: torch.Tensor,
                modality_BL: torch.Tensor, forced_BL: torch.Tensor, pos_BL: torch.Tensor) -> None:
        """Remember the last real token of this call (the caches advanced themselves)."""
        if self.keeps:
            self.prev = prev.after(h_BLD, doc_BL, valid_BL, modality_BL, forced_BL, pos_BL)


@dataclass
class ConceptState:
    """Concept-level layers: a KV cache per loop x concept layer, and the dechunk EMA
    state of each row's current concept (None: none yet, the EMA starts from 0)."""

    caches: list[Optional[KVCache]]
    z_BD: Optional[torch.Tensor] = None
    keeps: bool = True

    def advance(self, z_last_BD: torch.Tensor) -> None:
        if self.keeps:
            self.z_BD = z_last_BD.detach()


@dataclass
class InferenceState:
    """What ``ConceptMoE.forward(use_cache=True)`` carries between calls."""

    tokens: TokenState
    concepts: ConceptState
    caching: bool = True

    @classmethod
    def new(cls, n_encoder: int, n_concept_slots: int, n_decoder: int) -> "InferenceState":
        """Empty caches for incremental decoding."""
        return cls(TokenState([KVCache() for _ in range(n_encoder)], [KVCache() for _ in range(n_decoder)]),
                   ConceptState([KVCache() for _ in range(n_concept_slots)]))

    @classmethod
    def stateless(cls, n_encoder: int, n_concept_slots: int, n_decoder: int) -> "InferenceState":
        """A full forward: no caches, nothing before, nothing kept."""
        return cls(TokenState([None] * n_encoder, [None] * n_decoder, keeps=False),
                   ConceptState([None] * n_concept_slots, keeps=False), caching=False)

    def kv_bytes(self) -> dict[str, int]:
        """Bytes of keys and values held, per stack and in total."""
        parts = {name: sum(c.nbytes() for c in caches if c is not None) for name, caches in
                 (("encoder", self.tokens.encoder), ("concept", self.concepts.caches),
                  ("decoder", self.tokens.decoder))}
        parts["total"] = sum(parts.values())
        return parts


__all__ = ["KVCache", "Previous", "TokenState", "ConceptState", "InferenceState"]
