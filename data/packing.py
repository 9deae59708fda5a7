"""Packing: documents -> fixed-length rows -> batches (the model's input contract).

Batch contract (what the training code reads)::

    input_ids  LongTensor[B, L]   pad_id on padding
    labels     LongTensor[B, L]   aligned with input_ids (the model shifts); -100 = no loss
    doc_ids    LongTensor[B, L]   0, 1, 2, ... per document within its row; -1 on padding
    images     FloatTensor[N, 3, H, W]  every image of the batch, in row-major order of
                                  their image tokens; [0, 3, H, W] when there are none

The first token of every document has label -100, so even a shift that ignores
``doc_ids`` never trains one document to predict the next.

Packing is greedy and in order: a document goes into the open row if its tokens and
image tokens fit, otherwise the row is padded and closed. Being in order is what makes
resume cheap: the documents not yet in an emitted batch are always a contiguous tail of
the stream, so the resume position is one ``(epoch, index, piece)``.

A document longer than a row (or with more image tokens than a row's budget) is split
at cuts that never separate an image block (``long_docs="split"``) or dropped
(``"drop"``); either way it is counted, never silently truncated.
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from typing import Iterable, Iterator, Optional

import numpy as np
import torch

from .counters import DataCounters
from .templates import IGNORE

Position = tuple[int, int, int]  # (epoch, index of the raw sample in the reader's epoch, piece)


@dataclass
class Doc:
    """One tokenised document: ``ids``/``labels`` int64 [T], its image tensors, where it came from."""

    ids: np.ndarray
    labels: np.ndarray
    images: list[torch.Tensor]
    epoch: int
    index: int
    piece: int = 0
    last_piece: bool = True  # False on all but the last piece of a split document

    @property
    def position(self) -> Position:
        return (self.epoch, self.index, self.piece)


@dataclass
class PackConfig:
    seq_len: int
    batch_size: int
    pad_id: int
    image_start_id: int
    image_end_id: int
    image_tokens_per_image: int
    image_shape: tuple[int, int, int]  # (3, H, W): the shape of ``images`` rows
    max_image_tokens_per_row: Optional[int] = None  # None: only seq_len limits images
    long_docs: str = "split"  # "split" | "drop"

    def __post_init__(self) -> None:
        if self.long_docs not in ("split", "drop"):
            raise ValueError(f"long_docs must be 'split' or 'drop', got {self.long_docs!r}")
        block = self.image_tokens_per_image + 2
        if self.seq_len < block + 2:
            raise ValueError(f"seq_len {self.seq_len} cannot hold one image block ({block} tokens) plus bos/eos")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")

    @property
    def max_images_per_row(self) -> int:
        if self.max_image_tokens_per_row is None:
            return self.seq_len  # more than can ever fit
        return self.max_image_tokens_per_row // self.image_tokens_per_image


def split_document(doc: Doc, cfg: PackConfig) -> Optional[list[Doc]]:
    """Cut ``doc`` into pieces that each fit a row, never inside an image block.

    Returns None when impossible (a single image block over the budget, or image markers
    that do not pair up). Linear in the document: one pass finds the image markers; the
    greedy cuts then only search the (few) blocks, a few bisections per piece.
    """
    ids, n = doc.ids, len(doc.ids)
    starts = np.flatnonzero(ids == cfg.image_start_id)
    if len(starts) == 0:  # text only: every position is a legal cut
        ends = list(range(cfg.seq_len, n, cfg.seq_len)) + [n]
    else:
        ends = _image_aware_ends(starts, np.flatnonzero(ids == cfg.image_end_id), n, cfg)
        if ends is None:
            return None
    begins = [0] + ends[:-1]
    labels = doc.labels.copy()
    labels[begins] = IGNORE  # a piece's first token has no in-document predecessor
    images_before = np.searchsorted(starts, ends + [0], side="left")  # [-1] = before position 0
    pieces = [Doc(ids[b:e], labels[b:e], doc.images[int(images_before[i - 1]):int(images_before[i])],
                  doc.epoch, doc.index, i, False) for i, (b, e) in enumerate(zip(begins, ends))]
    pieces[-1].last_piece = True
    return pieces


def _image_aware_ends(starts: np.ndarray, ends_of_blocks: np.ndarray, n: int, cfg: PackConfig) -> Optional[list[int]]:
    """Greedy piece ends (exclusive): as long as ``seq_len`` and the row's image budget allow,
    moved back to a block's start when they would fall inside it (block ``[s, e]`` inclusive:
    a cut ``c`` is legal when ``c <= s`` or ``c > e``)."""
    if len(starts) != len(ends_of_blocks) or (starts >= ends_of_blocks).any() or (starts[1:] <= ends_of_blocks[:-1]).any():
        return None  # unpaired markers: not a document encode_parts wrote
    # Python lists and bisect: per piece this is ~1 us, numpy's searchsorted costs ~5 us a call.
    block_starts, block_ends = starts.tolist(), ends_of_blocks.tolist()
    ends: list[int] = []
    begin = 0
    while begin < n:
        end = min(begin + cfg.seq_len, n)
        j = bisect.bisect_left(block_starts, end) - 1  # last block starting before the cut
        if j >= 0 and end <= block_ends[j]:
            end = block_starts[j]
        first = bisect.bisect_left(block_starts, begin)
        if bisect.bisect_left(block_starts, end) - first > cfg.max_images_per_row:
            end = block_starts[first + cfg.max_images_per_row]
        if end <= begin:
            return None
        ends.append(end)
        begin = end
    return ends


@dataclass
class _Row:
    docs: list[Doc] = field(default_factory=list)
    tokens: int = 0
    images: int = 0


class Packer:
    """Greedy in-order packer; ``pack(docs)`` yields batches with a ``"_resume"`` position."""

    def __init__(self, cfg: PackConfig, counters: Optional[DataCounters] = None) -> None:
        self.cfg = cfg
        self.counters = counters if counters is not None else DataCounters()

    def _fit(self, doc: Doc) -> list[Doc]:
        """The document itself, its pieces, or nothing (counted)."""
        cfg = self.cfg
        too_long = len(doc.ids) > cfg.seq_len
        too_many = len(doc.images) > cfg.max_images_per_row
        if not (too_long or too_many):
            return [doc]
        reason = "too_long" if too_long else "too_many_image_tokens"
        if cfg.long_docs == "split":
            pieces = split_document(doc, cfg)
            if pieces is not None:
                self.counters.add(f"packing/split_{reason}")
                return pieces
        self.counters.add(f"packing/dropped_{reason}")
        return []

    def pack(self, docs: Iterable[Doc], skip_pieces: int = 0) -> Iterator[dict]:
        """``skip_pieces``: on resume, pieces of the first document already emitted."""
        cfg = self.cfg
        row, rows = _Row(), []
        last: Optional[Doc] = None
        for doc in docs:
            pieces = self._fit(doc)
            if skip_pieces:
                pieces, skip_pieces = pieces[skip_pieces:], 0
            for piece in pieces:
                last = piece
                n_img = len(piece.images)
                if row.docs and (row.tokens + len(piece.ids) > cfg.seq_len or row.images + n_img > cfg.max_images_per_row):
                    rows.append(row)
                    row = _Row()
                    if len(rows) == cfg.batch_size:
                        yield self._batch(rows, resume=piece.position)
                        rows = []
                row.docs.append(piece)
                row.tokens += len(piece.ids)
                row.images += n_img
                if row.tokens == cfg.seq_len:  # exactly full: close now, nothing pending
                    rows.append(row)
                    row = _Row()
                    if len(rows) == cfg.batch_size:
                        yield self._batch(rows, resume=_after(piece))
                        rows = []
        if row.docs:
            rows.append(row)
        if rows:
            yield self._batch(rows, resume=_after(last) if last is not None else None)

    def _batch(self, rows: list[_Row], resume: Optional[Position]) -> dict:
        """Rows -> contract tensors. Missing rows (end of stream) are all padding."""
        cfg = self.cfg
        B, L = cfg.batch_size, cfg.seq_len
        ids_BL = np.full((B, L), cfg.pad_id, np.int64)
        labels_BL = np.full((B, L), IGNORE, np.int64)
        doc_BL = np.full((B, L), -1, np.int64)
        images: list[torch.Tensor] = []
        for b, row in enumerate(rows):
            t = 0
            for d, doc in enumerate(row.docs):
                n = len(doc.ids)
                ids_BL[b, t : t + n] = doc.ids
                labels_BL[b, t : t + n] = doc.labels
                labels_BL[b, t] = IGNORE
                doc_BL[b, t : t + n] = d
                images.extend(doc.images)
                t += n
        self.counters.add("packing/rows", len(rows))
        self.counters.add("packing/docs", sum(len(r.docs) for r in rows))
        self.counters.add("packing/pad_tokens", int((doc_BL < 0).sum()))
        return {
            "input_ids": torch.from_numpy(ids_BL),
            "labels": torch.from_numpy(labels_BL),
            "doc_ids": torch.from_numpy(doc_BL),
            "images": torch.stack(images) if images else torch.zeros((0, *cfg.image_shape)),
            "_resume": resume,
        }


def _after(doc: Doc) -> Position:
    """The position right after a fully emitted ``doc``: its next piece, or the next sample."""
    if not doc.last_piece:
        return (doc.epoch, doc.index, doc.piece + 1)
    return (doc.epoch, doc.index + 1, 0)
