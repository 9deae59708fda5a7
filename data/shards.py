"""Shard specs and shard order: which reader reads which shards in which epoch.

A *reader* is one (rank, dataloader worker) pair. Every order here is a pure function of
``(seed, epoch, rank, worker)``, so a resumed run can recompute it and fast-forward.
"""
from __future__ import annotations

import math
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Union

import torch
from webdataset.shardlists import expand_urls

ShardSpec = Union[str, os.PathLike, Sequence[Union[str, os.PathLike]]]


def expand_shards(spec: ShardSpec, check_exists: bool = True) -> list[str]:
    """Shard spec -> list of URLs.

    Accepts what users write: ``"dir/shards-{000000..000099}.tar"`` (brace expansion),
    ``"a.tar::b.tar"``, a list of such strings or paths, ``"pipe:curl -s URL"``.
    Local files are checked up front so a typo fails at start-up, not hours in.
    """
    items = [spec] if isinstance(spec, (str, os.PathLike)) else list(spec)
    urls: list[str] = []
    for item in items:
        urls.extend(expand_urls(os.fspath(item)))
    urls = [u for u in urls if u.strip()]
    if not urls:
        raise ValueError(f"shard spec {spec!r} names no shards")
    if check_exists:
        missing = [u for u in urls if _is_local(u) and not Path(_local_path(u)).is_file()]
        if missing:
            more = f" (and {len(missing) - 3} more)" if len(missing) > 3 else ""
            raise FileNotFoundError(f"{len(missing)} shard(s) of spec {spec!r} not found: {missing[:3]}{more}")
    return urls


def _is_local(url: str) -> bool:
    return url.startswith("file:") or "://" not in url and not url.startswith("pipe:")


def _local_path(url: str) -> str:
    return url[len("file:"):] if url.startswith("file:") else url


@dataclass(frozen=True)
class ReaderInfo:
    """Where this reader sits: its rank among ``world_size`` and worker among ``num_workers``."""

    rank: int = 0
    world_size: int = 1
    worker: int = 0
    num_workers: int = 1

    @property
    def index(self) -> int:
        return self.rank * self.num_workers + self.worker

    @property
    def count(self) -> int:
        return self.world_size * self.num_workers


def current_reader(rank: Optional[int] = None, world_size: Optional[int] = None, worker_offset: int = 0) -> ReaderInfo:
    """Rank from the arguments, else torch.distributed, else ``RANK``/``WORLD_SIZE``; worker
    from the DataLoader. ``worker_offset`` rotates worker ids (see ``PackedLoader``: after a
    resume the first worker the DataLoader asks must be the one whose turn it was)."""
    if rank is None or world_size is None:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            rank, world_size = torch.distributed.get_rank(), torch.distributed.get_world_size()
        else:
            rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    info = torch.utils.data.get_worker_info()
    worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
    return ReaderInfo(rank, world_size, (worker + worker_offset) % num_workers, num_workers)


def rng_for(*parts: object) -> random.Random:
    """A generator seeded by its parts (``random`` hashes a str seed with SHA-512: stable
    across processes and Python runs, unlike ``hash()``)."""
    return random.Random(":".join(str(p) for p in parts))


def shards_for_epoch(
    urls: Sequence[str],
    reader: ReaderInfo,
    seed: int,
    epoch: int,
    resample: bool = False,
    shards_per_epoch: Optional[int] = None,
) -> list[str]:
    """The shards one reader reads in one epoch, in order.

    Without resampling, every epoch is one pass over all shards: a permutation seeded by
    ``(seed, epoch)`` (the same on every reader) dealt out round-robin, so readers never
    share a shard. With resampling each reader draws ``shards_per_epoch`` shards with
    replacement (default: its fair share), as webdataset's ``ResampledShards`` does, but
    seeded by ``(seed, epoch, rank, worker)`` so that it can be replayed.
    """
    if resample:
        n = shards_per_epoch or math.ceil(len(urls) / reader.count)
        rng = rng_for("resample", seed, epoch, reader.rank, reader.worker)
        return [urls[rng.randrange(len(urls))] for _ in range(n)]
    if len(urls) < reader.count:
        raise ValueError(
            f"{len(urls)} shard(s) for {reader.count} readers ({reader.world_size} rank(s) x "
            f"{reader.num_workers} worker(s)): each reader needs at least one shard; write smaller "
            f"shards, use fewer workers, or set resample=True"
        )
    order = list(urls)
    rng_for("epoch", seed, epoch).shuffle(order)
    return order[reader.index :: reader.count]
