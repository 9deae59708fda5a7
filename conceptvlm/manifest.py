"""A folder's manifest: every file's size and sha256, written last, checked before use.

``manifest.json``::

    {"format": "conceptvlm-manifest", "version": 1,
     "files": {"mp_rank_00_model_states.pt": {"bytes": 123, "sha256": "..."}, ...}}

A folder verifies when the files on disk are exactly the listed ones (no file missing,
none extra, no symlink) with the listed sizes and hashes. Because the manifest is the
last file written, a folder that has one was written completely; the hashes catch
flipped bytes and truncation later on. (It is an integrity check, not a signature:
whoever can write the folder can rewrite the manifest, which is why loading is safe
on its own, see ``safe_load.py``.)
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Optional, Sequence

MANIFEST = "manifest.json"
FORMAT = "conceptvlm-manifest"


def sha256_file(path: Path, block: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()


def _files(folder: Path) -> tuple[dict[str, Path], list[str]]:
    """Regular files under ``folder`` by relative POSIX name (the manifest excluded), and
    the names of anything that is not one (symlinks, FIFOs...)."""
    files, odd = {}, []
    for root, dirs, names in os.walk(folder):
        for d in dirs:
            if os.path.islink(os.path.join(root, d)):
                odd.append(os.path.relpath(os.path.join(root, d), folder))
        for n in names:
            p = Path(root) / n
            rel = p.relative_to(folder).as_posix()
            if rel == MANIFEST:
                continue
            if p.is_symlink() or not p.is_file():
                odd.append(rel)
            else:
                files[rel] = p
    return files, odd


def fsync_path(path: Path) -> None:
    """fsync a file or a folder (a folder: so that renames in it are durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file, fsync and rename: a process
    killed mid-write leaves the old file whole, never half of the new one. The temporary
    name is the process's own, so two processes writing one file never share it; a write
    that fails (or is interrupted) in Python removes it again, so none pile up."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:  # KeyboardInterrupt too: the old file stays whole, the debris goes
        tmp.unlink(missing_ok=True)
        raise
    fsync_path(path.parent)


def write_manifest(folder: str | Path) -> Path:
    """Hash every file of ``folder`` and write ``manifest.json`` (atomically and fsynced, after the files)."""
    folder = Path(folder)
    files, odd = _files(folder)
    if odd:
        raise ValueError(f"{folder}: not regular files: {odd}")
    for p in files.values():
        fsync_path(p)  # the data is on disk before the manifest vouches for it
    entries = {rel: {"bytes": p.stat().st_size, "sha256": sha256_file(p)} for rel, p in sorted(files.items())}
    out = folder / MANIFEST
    write_atomic(out, json.dumps({"format": FORMAT, "version": 1, "files": entries}, indent=1))
    return out


def verify_manifest(folder: str | Path, only: Optional[Sequence[str]] = None) -> Optional[str]:
    """None when ``folder`` matches its manifest, else what is wrong (one line).

    ``only``: check just these listed files (an exported model's weights): users add files
    beside an export (a README), edit its config by hand, or keep it in a Hugging Face
    cache where every file is a symlink to a blob, so there a listed file may be a symlink
    to a regular file, and nothing else in the folder is checked."""
    folder = Path(folder)
    path = folder / MANIFEST
    if not path.is_file():
        return f"no {MANIFEST} (incomplete or written by an older version)"
    try:
        data = json.loads(path.read_text())
        listed = data["files"]
        if data.get("format") != FORMAT or data.get("version") != 1 or not isinstance(listed, dict):
            raise ValueError(f"not a {FORMAT} version 1")
        listed = {str(k): (int(v["bytes"]), str(v["sha256"])) for k, v in listed.items()}
    except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError) as e:
        return f"{MANIFEST} is unreadable ({type(e).__name__}: {e})"
    if only is not None:
        unlisted = [n for n in only if n not in listed]
        if unlisted:
            return f"{unlisted[0]} is not in the manifest"
        listed = {n: listed[n] for n in only}
        # plain names only, so none can point outside the folder ("../x"); a symlinked
        # entry is followed (hub caches)
        entries = {n: folder / n for n in listed if Path(n).name == n and n != ".." and os.path.lexists(folder / n)}
        files = {n: entries[n] for n in listed if n in entries and entries[n].is_file()}
        odd = [n for n in listed if n in entries and n not in files]
    else:
        files, odd = _files(folder)
    if odd:
        return f"not a regular file: {odd[0]}"
    missing = sorted(set(listed) - set(files))
    if missing:
        return f"file missing: {missing[0]}"
    extra = sorted(set(files) - set(listed))
    if extra and only is None:
        return f"file not in the manifest: {extra[0]}"
    for rel, (size, digest) in sorted(listed.items()):
        actual = files[rel].stat().st_size
        if actual != size:
            return f"{rel} has {actual} bytes, the manifest says {size} (truncated or overwritten)"
        if sha256_file(files[rel]) != digest:
            return f"{rel} does not match its sha256 (damaged)"
    return None
