"""Bad-sample accounting: one exception type and one counter the training loop reads.

A corrupt sample must never stop a multi-day run, and must never vanish silently:
each one is skipped, logged with its shard and key, and counted by reason, once per
distinct sample however often resampling or later epochs read it again. Warnings are
rate-limited per reason and go through ``tqdm.write`` so they never break a progress bar.
"""
from __future__ import annotations

import hashlib
import logging
import sys
from collections import Counter
from typing import Mapping


class _TqdmHandler(logging.Handler):
    """Writes records above any tqdm bar of this process (``tqdm.write``) instead of through it.

    Used only while the application has configured no logging of its own (no root
    handlers); otherwise records propagate to the application's handlers as usual.
    """

    def emit(self, record: logging.LogRecord) -> None:
        if logging.getLogger().handlers:
            return
        try:
            from tqdm import tqdm

            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # logging must never raise into the reader
            self.handleError(record)


log = logging.getLogger("conceptvlm.data")
log.addHandler(_TqdmHandler(logging.WARNING))

# Per reason, the first LOG_FIRST skips are logged, then only the 10th, 100th, 1000th, ...
LOG_FIRST = 3

# Reasons used by the readers; the counter accepts any string.
TRUNCATED = "truncated_member"
BAD_IMAGE = "bad_image"
EMPTY_IMAGE = "empty_image"
BAD_JSON = "bad_json"
MISSING_FIELD = "missing_field"
BAD_FIELD = "bad_field"
UNREADABLE_SHARD = "unreadable_shard"
NO_END_MARKER = "truncated_shard"  # the tar stops between members, without its end-of-archive blocks


class BadSample(Exception):
    """A sample that cannot be used; ``reason`` is its counter key."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class DataCounters:
    """Counts per reason (bad samples) and per event (packing: rows, split or dropped documents).

    Plain ``collections.Counter`` underneath so it pickles across DataLoader workers and
    sums across them (``merge``).
    """

    def __init__(self, counts: Mapping[str, int] | None = None) -> None:
        self.counts: Counter[str] = Counter(counts or {})
        self._seen: set[bytes] = set()  # 8-byte digests of (reason, shard, key) already counted

    def add(self, key: str, n: int = 1) -> None:
        self.counts[key] += n

    def skip(self, reason: str, shard: str, key: str, detail: str) -> None:
        """Record a skipped sample and warn with where it came from (rate-limited per reason).

        A sample already counted (same reason, shard and key: resampling or a later epoch
        read it again) is neither counted nor logged again.
        """
        digest = hashlib.blake2b(f"{reason}\0{shard}\0{key}".encode("utf-8", "replace"), digest_size=8).digest()
        if digest in self._seen:
            return
        self._seen.add(digest)
        name = f"skipped/{reason}"
        self.counts[name] += 1
        n = self.counts[name]
        if n <= LOG_FIRST or _is_power_of_ten(n):
            more = "" if n <= LOG_FIRST else f" ({n} {reason} so far; only every 10x-th is logged)"
            log.warning("skipping sample: %s (shard %s, key %s): %s%s", reason, shard, key, detail[:500], more)

    @property
    def skipped(self) -> int:
        return sum(v for k, v in self.counts.items() if k.startswith("skipped/"))

    def merge(self, others: "list[DataCounters]") -> "DataCounters":
        total: Counter[str] = Counter(self.counts)
        for o in others:
            total.update(o.counts)
        return DataCounters(total)

    def as_dict(self) -> dict[str, int]:
        return dict(sorted(self.counts.items()))

    def __getitem__(self, key: str) -> int:
        return self.counts[key]

    def __repr__(self) -> str:
        return f"DataCounters({self.as_dict()})"


def _is_power_of_ten(n: int) -> bool:
    while n >= 10 and n % 10 == 0:
        n //= 10
    return n == 1


def skip_summary(counts: Mapping[str, int], what: str = "data") -> str:
    """One line for the end of a run: ``data: 1,200 samples skipped (bad_image 3, ...); 40 rows``."""
    skipped = {k.split("/", 1)[1]: v for k, v in counts.items() if k.startswith("skipped/") and v}
    rows = counts.get("packing/rows")
    tail = f"; {rows:,} packed rows" if rows else ""
    if not skipped:
        return f"{what}: no samples skipped{tail}"
    detail = ", ".join(f"{k} {v:,}" for k, v in sorted(skipped.items(), key=lambda kv: -kv[1]))
    return f"{what}: {sum(skipped.values()):,} distinct samples skipped ({detail}){tail}"

