"""Check shards before a long run: every sample read and parsed as training reads it.

Training skips and counts a bad sample and goes on (``docs/data.md``), so a broken shard
costs samples silently, hours in. ``conceptvlm shards check SPEC --kind KIND`` reads every
shard of a spec once, through the same tar reader (``tario.iter_shard``) and the same
per-kind parser, images decoded (``samples.document_parser``), and prints one line per
shard: the samples that are usable and the ones training would skip, by reason. It exits
1 when any sample or shard would be skipped.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator, Optional

from .counters import BadSample, DataCounters
from .samples import KINDS, ImageOptions, document_parser
from .shards import ShardSpec, expand_shards
from .tario import iter_shard


@dataclass
class ShardCheck:
    """What one shard gave: usable samples, images in them, skips by reason."""

    url: str
    samples: int = 0
    images: int = 0
    skipped: dict[str, int] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.skipped

    def line(self) -> str:
        head = f"{self.url}: {self.samples:,} usable sample(s), {self.images:,} image(s)"
        if self.ok:
            return head
        detail = ", ".join(f"{k} {v:,}" for k, v in sorted(self.skipped.items(), key=lambda kv: -kv[1]))
        return f"{head}; {sum(self.skipped.values()):,} skipped ({detail})"


def check_shard(url: str, kind: str, images: ImageOptions = ImageOptions(),
                caption_prompt: Optional[str] = None) -> ShardCheck:
    """Read and parse every sample of one shard; nothing is kept but the counts."""
    if kind not in KINDS:
        raise ValueError(f"unknown sample kind {kind!r}; expected one of {KINDS}")
    parse = document_parser(kind, caption_prompt, images)
    counters, out = DataCounters(), ShardCheck(url)
    for raw in iter_shard(url, counters):
        try:
            _, pil_images = parse(raw)
        except BadSample as bad:
            counters.skip(bad.reason, url, raw["__key__"], str(bad))
            continue
        out.samples += 1
        out.images += len(pil_images)
    out.skipped = {k.split("/", 1)[1]: v for k, v in counters.as_dict().items() if k.startswith("skipped/")}
    return out


def check_shards(spec: ShardSpec, kind: str, images: ImageOptions = ImageOptions()) -> Iterator[ShardCheck]:
    """``check_shard`` over every shard of a spec, in order (a missing local shard fails up front)."""
    for url in expand_shards(spec):
        yield check_shard(url, kind, images)
