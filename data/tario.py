"""Tar shards -> raw samples (``{"__key__", "__url__", ext: bytes}``), surviving damage.

webdataset's ``tarfile_samples`` reports a damaged member without its key and then keeps
the partial sample; here a truncated member drops exactly the sample it belongs to, and
the warning names shard and key. Opening (local files, URLs) and the ``KEY.ext`` split
are webdataset's own (``gopen``, ``base_plus_ext``); ``pipe:`` commands run here, with
an idle timeout (webdataset's pipe waits for ever on a command that hangs).
"""
from __future__ import annotations

import io
import os
import select
import signal
import subprocess
import tarfile
from typing import Any, Iterator

from webdataset.gopen import gopen
from webdataset.tariterators import base_plus_ext

from .counters import BAD_FIELD, NO_END_MARKER, TRUNCATED, UNREADABLE_SHARD, DataCounters

RawSample = dict[str, Any]


class TimedPipe(io.RawIOBase):
    """The stdout of ``pipe:CMD`` with an idle timeout.

    If no byte arrives for ``timeout`` seconds the command (its whole process group) is
    killed and the read raises ``TimeoutError``. Closing early stops the command too;
    closing after a command that failed raises ``OSError`` with its exit status.
    """

    def __init__(self, command: str, timeout: float) -> None:
        super().__init__()
        self.command, self.timeout = command, timeout
        # shell=True: a pipe: spec is a shell command by design (webdataset's convention).
        self.proc = subprocess.Popen(command, shell=True, stdout=subprocess.PIPE, start_new_session=True)
        self.killed = False

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:  # type: ignore[override]
        fd = self.proc.stdout.fileno()
        ready, _, _ = select.select([fd], [], [], self.timeout)
        if not ready:
            self._kill()
            raise TimeoutError(f"pipe command sent nothing for {self.timeout:g} s: {self.command}")
        data = os.read(fd, len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def _kill(self) -> None:
        if self.proc.poll() is None:
            self.killed = True
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def close(self) -> None:
        if self.closed:
            return
        super().close()
        self.proc.stdout.close()
        self._kill()  # still running: we stopped reading (damage, timeout, early end)
        status = self.proc.wait()
        if status not in (0, 141, -signal.SIGPIPE) and not self.killed:
            raise OSError(f"pipe command exited with status {status}: {self.command}")


def open_shard(url: str, timeout: float = 300.0):
    """A readable binary stream for a shard URL; ``pipe:`` commands get ``timeout``."""
    if url.startswith("pipe:"):
        return io.BufferedReader(TimedPipe(url[len("pipe:"):], timeout), 1 << 16)
    return gopen(url)


def _ended_with_marker(tar: tarfile.TarFile) -> bool:
    """Did the stream end at the tar end-of-archive marker (a block of zeros)? ``tarfile``
    stops quietly both there and at a plain end of data between two members, which is what
    a shard cut at a 512-byte boundary looks like. Its reader stands at ``tar.offset``, the
    next header, plus whatever it read of that header: a whole block of zeros at the marker,
    nothing at a cut. (Where the stream cannot tell its position, assume the marker.)"""
    try:
        read_past = tar.fileobj.tell() - tar.offset
    except (AttributeError, OSError, ValueError):
        return True
    return read_past >= tarfile.BLOCKSIZE


def iter_shard(url: str, counters: DataCounters, timeout: float = 300.0) -> Iterator[RawSample]:
    """Yield the samples of one shard (members grouped by key, consecutive as in
    webdataset). Damage ends the shard; everything complete before it is kept.
    ``timeout``: seconds a ``pipe:`` command may send nothing before it is abandoned."""
    try:
        stream = open_shard(url, timeout)
    except Exception as exc:  # a vanished file, a failing pipe: count it, go on
        counters.skip(UNREADABLE_SHARD, url, "-", repr(exc))
        return
    current: RawSample | None = None
    member_key = "-"
    reported = False
    try:
        with tarfile.open(fileobj=stream, mode="r|*") as tar:
            for info in tar:
                if not info.isreg():
                    continue
                key, ext = base_plus_ext(info.name)
                if key is None or key.rsplit("/", 1)[-1].startswith("__"):
                    continue  # webdataset's metadata members, names without an extension
                member_key = key
                # A new key completes the previous sample: yield it before reading on,
                # so damage in this member cannot take the previous sample with it.
                if current is not None and current["__key__"] != key:
                    if not current.get("__bad__"):
                        yield current
                    current = None
                data = tar.extractfile(info).read()
                if len(data) != info.size:
                    raise tarfile.ReadError(f"member {info.name} has {len(data)} of {info.size} bytes")
                ext = ext.lower()
                if current is None:
                    current = {"__key__": key, "__url__": url}
                if ext in current:
                    counters.skip(BAD_FIELD, url, key, f"duplicate member {info.name}")
                    current["__bad__"] = True
                current[ext] = data
                # Streaming mode keeps every TarInfo otherwise: memory grows with the shard.
                tar.members = []
            if not _ended_with_marker(tar):
                counters.skip(NO_END_MARKER, url, member_key,
                              "the tar stops between two members without its end-of-archive blocks: the shard "
                              "was cut short (a partial copy?); the samples before the cut are kept")
    except (tarfile.TarError, EOFError, OSError, ValueError) as exc:
        # Damage before any member (empty file, failing pipe) loses the shard; later damage
        # loses the sample being read (the member, or the header after it, is cut).
        reason = TRUNCATED if member_key != "-" else UNREADABLE_SHARD
        counters.skip(reason, url, member_key, repr(exc))
        current, reported = None, True
    finally:
        try:
            stream.close()
        except Exception as exc:  # a pipe: command that exited non-zero
            if not reported:
                counters.skip(UNREADABLE_SHARD, url, member_key, f"closing: {exc!r}")
    if current is not None and not current.get("__bad__"):
        yield current
