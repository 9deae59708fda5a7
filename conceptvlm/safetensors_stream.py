"""Safetensors files read and written one tensor group at a time (bounded memory).

Reading: ``safetensors.safe_open`` memory-maps the file, and mapped pages count towards
the process's resident memory until it is closed, so reading a layer through it costs
the layer twice. :meth:`ShardedReader.read` reads each tensor's bytes (offsets from the
JSON header) into a tensor of its own instead; the tests load what it reads and writes
with the library. Writing: ``safetensors.torch.save_file`` needs every tensor in memory
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
_FROM_NAME = {v: k for k, v in _DTYPES.items()}


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
            self.where = {k: d / SINGLE for k in _header(d / SINGLE)[0]}
        else:
            raise CheckpointError(f"{d}: no {SINGLE} or {INDEX} (only safetensors are read, never pickles)")
        self.nbytes = sum(p.stat().st_size for p in set(self.where.values()))
        self.seen: set[str] = set()  # keys read so far

    def unread(self, ignore: tuple[str, ...] = ()) -> list[str]:
        """Keys never read (except those ending with ``ignore``), sorted."""
        return sorted(k for k in self.where if k not in self.seen and not k.endswith(ignore))

    def __contains__(self, key: str) -> bool:
        return key in self.where

    def read(self, keys: Iterable[str]) -> dict[str, torch.Tensor]:
        """The tensors of ``keys``, read into memory of their own (no mapping stays behind)."""
        by_file: dict[Path, list[str]] = defaultdict(list)
        for k in keys:
            if k not in self.where:
                raise CheckpointError(f"{self.dir}: tensor {k} is missing from the checkpoint")
            by_file[self.where[k]].append(k)
        out = {}
        for path, ks in by_file.items():
            header, start = _header(path)
            with open(path, "rb") as f:
                for k in ks:
                    if k not in header:
                        raise CheckpointError(f"{path.name}: tensor {k} (named in the index) is not in this shard")
                    out[k] = _read_tensor(f, start, header[k], f"{path.name}:{k}")
                    self.seen.add(k)
        return out


def _header(path: Path) -> tuple[dict, int]:
    """A safetensors file's header (name -> dtype, shape, offsets) and where its data starts."""
    with open(path, "rb") as f:
        raw = f.read(8)
        n = struct.unpack("<Q", raw)[0] if len(raw) == 8 else -1
        if not 0 < n <= 100 * 2**20:
            raise CheckpointError(f"{path}: not a safetensors file (header length {n})")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{path}: unreadable safetensors header ({e})") from None
    header.pop("__metadata__", None)
    return header, 8 + n


def _read_tensor(f, start: int, info: dict, where: str) -> torch.Tensor:
    """Plain reads into a fresh tensor: unlike ``safe_open``'s memory map, nothing but the
    tensor itself stays resident (a mapped checkpoint counts towards RSS until closed)."""
    dtype = _FROM_NAME.get(info.get("dtype"))
    if dtype is None:
        raise CheckpointError(f"{where}: unsupported dtype {info.get('dtype')!r}")
    shape = [int(x) for x in info["shape"]]
    b, e = (int(x) for x in info["data_offsets"])
    n = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
    if e - b != n:
        raise CheckpointError(f"{where}: {e - b} bytes stored for shape {shape} ({info['dtype']})")
    buf = torch.empty(n, dtype=torch.uint8)
    f.seek(start + b)
    if f.readinto(buf.numpy()) != n:
        raise CheckpointError(f"{where}: the file ends before the tensor does")
    return buf.view(dtype).reshape(shape)


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
