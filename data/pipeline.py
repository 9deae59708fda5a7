"""Sources -> packed batches, with an exactly resumable position.

Per reader (one rank x one DataLoader worker) and epoch, the stream is::

    shards_for_epoch(seed, epoch, rank, worker)     shard order (shards.py)
    -> tar members grouped into raw samples          (tario.py, bad members counted)
    -> shuffle buffer seeded by (seed, epoch, rank, worker, source)   (webdataset.shuffle)
    -> weighted mix of sources, seeded likewise
    -> [resume: skip the first `index` raw samples, bytes only, no decoding]
    -> parse + decode + transform + tokenise          (samples.py, templates.py)
    -> greedy in-order packing into batches          (packing.py)

Everything before the packer is a pure function of (seed, epoch, rank, worker) and the
shard contents, so the position of a reader is ``(epoch, index, piece)``: the next raw
sample (and piece of it) not yet in a delivered batch. ``PackedLoader`` keeps that
position per worker as batches reach the training loop; ``state_dict()`` saves it.
See ``docs/data.md`` for the exact guarantee.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Iterator, Optional, Sequence

import torch
import webdataset as wds

from .counters import BadSample, DataCounters
from .decode import DEFAULT_MAX_PIXELS, ImageError
from .images import ImageTransform, default_image_transform, output_shape
from .packing import Doc, PackConfig, Packer
from .samples import KINDS, ImageOptions, document_parser
from .shards import ReaderInfo, ShardSpec, current_reader, expand_shards, rng_for, shards_for_epoch
from .tario import iter_shard
from .templates import encode_parts


@dataclass
class Source:
    """One dataset: a shard spec, its sample kind, its mixing weight."""

    spec: ShardSpec
    kind: str
    weight: float = 1.0
    caption_prompt: Optional[str] = None  # captions as instruction samples (prompt gets no loss)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown sample kind {self.kind!r}; expected one of {KINDS}")
        if not self.weight > 0:
            raise ValueError(f"weight must be > 0, got {self.weight}")


@dataclass
class DataConfig:
    """Everything that shapes the stream; YAML fills it (``data:`` section of a train config)."""

    seq_len: int = 512
    batch_size: int = 8
    image_tokens_per_image: int = 64
    image_size: int = 224  # of the default transform only
    seed: int = 0
    shuffle_buffer: int = 1000  # samples; 0 = read in shard order
    shuffle_initial: int = 100  # samples buffered before the first one is yielded
    resample: bool = False  # draw shards with replacement (multi-epoch, many readers)
    shards_per_epoch: Optional[int] = None  # with resample: per reader and source
    epochs: Optional[int] = None  # per reader; None = endless
    max_image_tokens_per_row: Optional[int] = None
    question_first: bool = False  # VQA/grounding: the question before the image (the model's image.question_first)
    long_docs: str = "split"  # "split" | "drop"
    max_image_pixels: int = DEFAULT_MAX_PIXELS  # checked from the image header, before decoding
    pipe_timeout: float = 300.0  # seconds a pipe: shard may send nothing before it is abandoned
    max_idle_shards: Optional[int] = None  # shard reads without a usable sample before giving up; None: 4 x shards + 16
    num_workers: int = 0
    rank: Optional[int] = None  # None: from torch.distributed or RANK/WORLD_SIZE
    world_size: Optional[int] = None

    def __post_init__(self) -> None:
        for name in ("seq_len", "batch_size", "image_tokens_per_image", "image_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"DataConfig.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("shuffle_buffer", "shuffle_initial", "num_workers"):
            if getattr(self, name) < 0:
                raise ValueError(f"DataConfig.{name} must be >= 0, got {getattr(self, name)}")
        if self.epochs is not None and self.epochs < 1:
            raise ValueError(f"DataConfig.epochs must be >= 1 or None (endless), got {self.epochs}")
        if self.max_image_pixels < 1 or not self.pipe_timeout > 0:
            raise ValueError("DataConfig.max_image_pixels and pipe_timeout must be > 0")
        if self.max_idle_shards is not None and self.max_idle_shards < 1:
            raise ValueError(f"DataConfig.max_idle_shards must be >= 1 or None, got {self.max_idle_shards}")


class NoDataError(RuntimeError):
    """Every shard read for a long while gave no usable sample: the loader would spin forever."""


class _Liveness:
    """Counts shard reads since the last usable sample; too many is a ``NoDataError``.

    Why: an unreadable or all-bad dataset otherwise makes an endless loader re-read the
    same shards forever, printing warnings, while training waits for a first batch.
    """

    def __init__(self, limit: int, sources: Sequence["Source"], counters: DataCounters) -> None:
        self.limit, self.sources, self.counters = limit, sources, counters
        self.idle = 0

    def shard_started(self) -> None:
        self.idle += 1
        if self.idle > self.limit:
            specs = "; ".join(f"{s.kind}: {s.spec}" for s in self.sources)
            skipped = {k: v for k, v in self.counters.as_dict().items() if k.startswith("skipped/")}
            raise NoDataError(f"no usable sample in {self.limit} shard reads from sources [{specs}]; "
                              f"skipped so far: {skipped or 'nothing (empty shards)'}")

    def alive(self) -> None:
        self.idle = 0


class PackedDataset(torch.utils.data.IterableDataset):
    """Yields packed batches (the ``packing.py`` contract) plus a ``"_state"`` entry that
    ``PackedLoader`` strips. Iterate it through ``PackedLoader`` to get resume."""

    def __init__(self, sources: Sequence[Source], tokenizer, cfg: DataConfig,
                 image_transform: Optional[ImageTransform] = None) -> None:
        super().__init__()
        if not sources:
            raise ValueError("no data sources given")
        self.sources = list(sources)
        self.urls = [expand_shards(s.spec) for s in self.sources]  # fails early on missing shards
        self.tokenizer = tokenizer
        self.cfg = cfg
        self.image_transform = image_transform or default_image_transform(cfg.image_size)
        self.image_options = ImageOptions.for_transform(self.image_transform, cfg.max_image_pixels)
        n_shards = sum(len(u) for u in self.urls)
        self.max_idle_shards = cfg.max_idle_shards or 4 * n_shards + 16
        self.pack_cfg = PackConfig(
            seq_len=cfg.seq_len, batch_size=cfg.batch_size, pad_id=tokenizer.pad_id,
            image_start_id=tokenizer.image_start_id, image_end_id=tokenizer.image_end_id,
            image_tokens_per_image=cfg.image_tokens_per_image,
            image_shape=output_shape(self.image_transform),
            max_image_tokens_per_row=cfg.max_image_tokens_per_row, long_docs=cfg.long_docs,
        )
        # Set by PackedLoader before workers start (they get a pickled copy).
        self.start: dict[int, tuple[int, int, int]] = {}
        self.start_counters: dict[int, dict[str, int]] = {}
        self.worker_offset = 0

    # -- raw samples: a pure function of (seed, epoch, reader) --------------------------
    def _shard_samples(self, shards: list[str], counters: DataCounters, live: Optional[_Liveness]) -> Iterator[dict]:
        for url in shards:
            if live is not None:
                live.shard_started()
            yield from iter_shard(url, counters, timeout=self.cfg.pipe_timeout)

    def _source_stream(self, s: int, reader: ReaderInfo, epoch: int, counters: DataCounters,
                       live: Optional[_Liveness] = None) -> Iterator[dict]:
        cfg = self.cfg
        shards = shards_for_epoch(self.urls[s], reader, cfg.seed, epoch, cfg.resample, cfg.shards_per_epoch)
        samples = self._shard_samples(shards, counters, live)
        if cfg.shuffle_buffer > 1:
            rng = rng_for("buffer", cfg.seed, epoch, reader.rank, reader.worker, s)
            samples = wds.shuffle(cfg.shuffle_buffer, cfg.shuffle_initial, rng=rng)(samples)
        for raw in samples:
            raw["__source__"] = s
            yield raw

    def raw_stream(self, reader: ReaderInfo, epoch: int, counters: DataCounters,
                   live: Optional[_Liveness] = None) -> Iterator[dict]:
        """One epoch of raw samples for one reader: sources mixed by weight.

        Without resampling the epoch lasts until every source is exhausted; with it, until
        the first source that gave samples is (so the mix keeps its weights all through the
        epoch). A source that gives nothing at all this epoch (every shard unreadable) just
        leaves the mix: it must not cut the live sources' epoch short.
        """
        streams = {s: self._source_stream(s, reader, epoch, counters, live) for s in range(len(self.sources))}
        if len(streams) == 1:
            yield from streams[0]
            return
        rng = rng_for("mix", self.cfg.seed, epoch, reader.rank, reader.worker)
        gave: set[int] = set()
        while streams:
            names = sorted(streams)
            s = rng.choices(names, weights=[self.sources[i].weight for i in names])[0]
            try:
                raw = next(streams[s])
            except StopIteration:
                if self.cfg.resample and s in gave:
                    return
                del streams[s]
                continue
            gave.add(s)
            yield raw

    # -- documents ----------------------------------------------------------------------
    def _document(self, raw: dict, epoch: int, index: int, counters: DataCounters) -> Optional[Doc]:
        source = self.sources[raw["__source__"]]
        try:
            parts, pil_images = document_parser(source.kind, source.caption_prompt, self.image_options,
                                                self.cfg.question_first)(raw)
            try:
                images = [self.image_transform(im) for im in pil_images]
            except ImageError as err:  # the tower's processor rejecting an odd image
                raise BadSample(err.kind, str(err)) from err
            except Exception as exc:
                raise BadSample("transform_error", repr(exc)) from exc
            ids, labels = encode_parts(parts, self.tokenizer, self.cfg.image_tokens_per_image)
        except BadSample as bad:
            counters.skip(bad.reason, raw["__url__"], raw["__key__"], str(bad))
            return None
        except Exception as exc:  # a gap in the validation: still never stop the run (tests assert none)
            counters.skip("unexpected_error", raw["__url__"], raw["__key__"], repr(exc))
            return None
        return Doc(ids, labels, images, epoch, index)

    def documents(self, reader: ReaderInfo, start: tuple[int, int, int], counters: DataCounters) -> Iterator[Doc]:
        """Documents from position ``start`` on; skipped raw samples are only read, not decoded."""
        epoch = start[0]
        live = _Liveness(self.max_idle_shards, self.sources, counters)
        while self.cfg.epochs is None or epoch < self.cfg.epochs:
            first = start[1] if epoch == start[0] else 0
            for index, raw in enumerate(self.raw_stream(reader, epoch, counters, live)):
                if index < first:  # resume: already consumed, only read
                    live.alive()
                    continue
                doc = self._document(raw, epoch, index, counters)
                if doc is not None:
                    live.alive()
                    yield doc
            epoch += 1

    def __iter__(self) -> Iterator[dict]:
        reader = current_reader(self.cfg.rank, self.cfg.world_size, self.worker_offset)
        start = self.start.get(reader.worker, (0, 0, 0))
        counters = DataCounters(self.start_counters.get(reader.worker))
        packer = Packer(self.pack_cfg, counters)
        for batch in packer.pack(self.documents(reader, start, counters), skip_pieces=start[2]):
            batch["_state"] = {"worker": reader.worker, "position": batch.pop("_resume"),
                               "counters": counters.as_dict()}
            yield batch


class PackedLoader:
    """A DataLoader over ``PackedDataset`` whose position is training state.

    ``state_dict()`` records, per worker, the first raw sample not yet in a batch that
    reached the caller, and which worker's batch comes next; ``load_state_dict()`` makes
    the next ``iter()`` continue exactly there. Iterating again without loading also
    continues (nothing is repeated). ``counters`` sums the workers' bad-sample and
    packing counts.
    """

    def __init__(self, dataset: PackedDataset, num_workers: Optional[int] = None, pin_memory: bool = False) -> None:
        self.dataset = dataset
        self.num_workers = dataset.cfg.num_workers if num_workers is None else num_workers
        self.pin_memory = pin_memory
        self._positions: dict[int, tuple[int, int, int]] = {}
        self._counters: dict[int, dict[str, int]] = {}
        self._next_worker = 0

    @property
    def counters(self) -> DataCounters:
        return DataCounters().merge([DataCounters(c) for c in self._counters.values()])

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        ds = self.dataset
        ds.start, ds.start_counters = dict(self._positions), dict(self._counters)
        ds.worker_offset = self._next_worker
        workers = max(1, self.num_workers)
        loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=self.num_workers,
                                             pin_memory=self.pin_memory)
        for batch in loader:
            state = batch.pop("_state")
            w = state["worker"]
            if state["position"] is not None:
                self._positions[w] = tuple(state["position"])
            self._counters[w] = state["counters"]
            self._next_worker = (w + 1) % workers
            yield batch

    def state_dict(self) -> dict[str, Any]:
        cfg = self.dataset.cfg
        return {
            "version": 1, "seed": cfg.seed, "num_workers": self.num_workers,
            "config": asdict(cfg) | {"sources": [str(s.spec) for s in self.dataset.sources]},
            "positions": {int(w): list(p) for w, p in self._positions.items()},
            "counters": {int(w): dict(c) for w, c in self._counters.items()},
            "next_worker": self._next_worker,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a position. The order depends on seed, workers, ranks, shards, buffer and
        batch shape, so any difference in those is an error rather than a silent reshuffle."""
        mine = self.state_dict()["config"]
        theirs = state["config"]
        keys = ("seed", "seq_len", "batch_size", "image_tokens_per_image", "shuffle_buffer", "shuffle_initial",
                "resample", "shards_per_epoch", "max_image_tokens_per_row", "long_docs", "world_size", "sources")
        diff = {k: (theirs.get(k), mine.get(k)) for k in keys if theirs.get(k) != mine.get(k)}
        if state["num_workers"] != self.num_workers:
            diff["num_workers"] = (state["num_workers"], self.num_workers)
        if diff:
            raise ValueError(f"data state was saved under a different setup (saved, now): {diff}")
        self._positions = {int(w): tuple(p) for w, p in state["positions"].items()}
        self._counters = {int(w): dict(c) for w, c in state["counters"].items()}
        self._next_worker = int(state["next_worker"])


def build_loader(sources: Sequence[Source], tokenizer, cfg: DataConfig,
                 image_transform: Optional[ImageTransform] = None) -> PackedLoader:
    """The one call the training code makes."""
    return PackedLoader(PackedDataset(sources, tokenizer, cfg, image_transform))
