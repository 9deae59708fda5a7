"""Safetensors files read and written one tensor group at a time (bounded memory).

Reading goes through ``safetensors.safe_open``, one open per group of keys: the file is
memory-mapped while open, and mapped pages count towards the process's resident
memory until it is closed, so holding one handle over a whole checkpoint would cost a
second copy of it. Writing: ``safetensors.torch.save_file`` needs every tensor in memory
at once; :class:`StreamingWriter` writes the same format (8-byte little-endian header
length, JSON header of dtype / shape / byte offsets, padded to 8 bytes, then the raw
bytes in offset order) as tensors arrive, so a conversion holds one layer, not a model.
"""
from __future__ import annotations

import json
import struct
from collections import defaultdict
from pathlib import Path
from typing import Iterable, Optional

import torch

from .config import ConfigError

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.float64: "F64",
           torch.int64: "I64", torch.int32: "I32", torch.bool: "BOOL"}


class CheckpointError(ConfigError):
    """A checkpoint's files are missing, malformed or do not fit the model (one line: what, where)."""


def _shard_path(model_dir: Path, name: str) -> Path:
    # Names come from a file on disk: they must stay inside the model directory.
    if not isinstance(name, str) or Path(name).name != name or name.startswith("."):
        raise CheckpointError(f"{model_dir / INDEX}: shard name {name!r} is not a plain file name")
    return model_dir / name


class ShardedReader:
    """The tensors of a (possibly sharded) safetensors checkpoint, by key."""

    def __init__(self, model_dir: str | Path):
        from safetensors import safe_open

        self.dir = d = Path(model_dir)
        self.where: dict[str, Path] = {}
        if (d / INDEX).is_file():
            try:
                weight_map = json.loads((d / INDEX).read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise CheckpointError(f"{d / INDEX}: no readable weight_map ({e})") from None
            for key, name in weight_map.items():
                self.where[key] = _shard_path(d, name)
            missing = sorted({p.name for p in self.where.values() if not p.is_file()})
            if missing:
                raise CheckpointError(f"{d / INDEX}: shard {missing[0]} named in the index is missing"
                                      + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
        elif (d / SINGLE).is_file():
            with safe_open(str(d / SINGLE), "pt") as f:
                self.where = {k: d / SINGLE for k in f.keys()}
        else:
            raise CheckpointError(f"{d}: no {SINGLE} or {INDEX} (only safetensors are read, never pickles)")
        self.nbytes = sum(p.stat().st_size for p in set(self.where.values()))

    def __contains__(self, key: str) -> bool:
        return key in self.where

    def read(self, keys: Iterable[str]) -> dict[str, torch.Tensor]:
        """The tensors of ``keys`` (copied out of the files, which are closed again)."""
        from safetensors import safe_open

        by_file: dict[Path, list[str]] = defaultdict(list)
        for k in keys:
            if k not in self.where:
                raise CheckpointError(f"{self.dir}: tensor {k} is missing from the checkpoint")
            by_file[self.where[k]].append(k)
        out = {}
        for path, ks in by_file.items():
            with safe_open(str(path), "pt") as f:
                present = set(f.keys())
                for k in ks:
                    if k not in present:
                        raise CheckpointError(f"{path.name}: tensor {k} (named in the index) is not in this shard")
                    out[k] = f.get_tensor(k).clone()  # own memory: nothing may keep the mapping alive
        return out


class StreamingWriter:
    """Write a safetensors file whose tensors (names, dtypes, shapes) are known up front,
    one tensor at a time, in the given order."""

    def __init__(self, path: str | Path, specs: list[tuple[str, torch.dtype, tuple[int, ...]]],
                 metadata: Optional[dict[str, str]] = None):
        header: dict = {"__metadata__": dict(metadata)} if metadata else {}
        self.expected: list[tuple[str, torch.dtype, tuple[int, ...]]] = []
        offset = 0
        for name, dtype, shape in specs:
            n = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
            header[name] = {"dtype": _DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
            self.expected.append((name, dtype, tuple(shape)))
            offset += n
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the format aligns the data to 8 bytes
        self._f = open(path, "wb")
        self._f.write(struct.pack("<Q", len(raw)) + raw)
        self._next = 0

    def write(self, name: str, tensor: torch.Tensor) -> None:
        exp_name, dtype, shape = self.expected[self._next]
        if name != exp_name or tuple(tensor.shape) != shape:
            raise CheckpointError(f"{name}: shape {list(tensor.shape)} does not fit the model "
                                  f"(expected {exp_name} {list(shape)})")
        t = tensor.detach().to("cpu", dtype).contiguous()
        self._f.write(t.reshape(-1).view(torch.uint8).numpy().data)  # the bytes, not a copy
        self._next += 1

    def close(self) -> None:
        self._f.close()
        if self._next != len(self.expected):
            raise CheckpointError(f"{self._f.name}: only {self._next} of {len(self.expected)} tensors written")
