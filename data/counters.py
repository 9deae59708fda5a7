"""Bad-sample accounting: one exception type and one counter the training loop reads.

A corrupt sample must never stop a multi-day run, and must never vanish silently:
each one is skipped, logged once with its shard and key, and counted by reason.
"""
from __future__ import annotations

import logging
from collections import Counter
from typing import Mapping

log = logging.getLogger("conceptvlm.data")

# Reasons used by the readers; the counter accepts any string.
TRUNCATED = "truncated_member"
BAD_IMAGE = "bad_image"
EMPTY_IMAGE = "empty_image"
BAD_JSON = "bad_json"
MISSING_FIELD = "missing_field"
BAD_FIELD = "bad_field"
UNREADABLE_SHARD = "unreadable_shard"


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

    def add(self, key: str, n: int = 1) -> None:
        self.counts[key] += n

    def skip(self, reason: str, shard: str, key: str, detail: str) -> None:
        """Record a skipped sample and warn with where it came from."""
        self.counts[f"skipped/{reason}"] += 1
        log.warning("skipping sample: %s (shard %s, key %s): %s", reason, shard, key, detail)

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
