"""Memory of one training step, two ways.

* **Saved-activation bytes** (:class:`SavedActivations`): the bytes of every distinct
  tensor storage autograd keeps for the backward pass, parameters excluded, counted
  through ``torch.autograd.graph.saved_tensors_hooks``. Exact and independent of the
  allocator: this is the term that grows with L, and any dense ``L x S`` mask or score
  matrix kept for backward shows up in it.
* **Peak RSS** (:func:`step_peak_rss`): the process's resident-set peak during a step
  above its start, what the machine actually had to provide. It depends on the
  allocator: memory freed earlier is reused without showing as growth, and the first
  step of a run also allocates the optimizer's state (AdamW: two copies of the
  weights), which sets a floor of its own. So measure it on a step after the first.
"""
from __future__ import annotations

import ctypes
import gc
import re
from pathlib import Path
from typing import Callable, Iterable, Optional

import torch


class SavedActivations(torch.autograd.graph.saved_tensors_hooks):
    """Context manager counting the bytes saved for backward while it is active.

    Each storage counts once however many ops save it (or views of it); storages of
    ``exclude`` (the model's parameters) count not at all. The tensors themselves are
    kept exactly as autograd would keep them, so the backward pass runs as usual.
    """

    def __init__(self, exclude: Iterable[torch.Tensor] = ()):
        self._exclude = {p.untyped_storage().data_ptr() for p in exclude}
        self._seen: dict[int, int] = {}
        super().__init__(self._pack, lambda t: t)

    @property
    def bytes(self) -> int:
        return sum(self._seen.values())

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        # Keyed by address: while a saved tensor lives (until backward), no other storage
        # can take its address, so equal addresses within one forward are one storage.
        if ptr not in self._exclude and ptr not in self._seen:
            self._seen[ptr] = storage.nbytes()
        return t

    def __enter__(self) -> "SavedActivations":
        super().__enter__()
        return self


def reset_peak_rss() -> bool:
    """Hand freed heap back to the OS (else a step reusing freed memory shows no growth),
    then reset the kernel's peak-RSS counter. False where Linux's counter is missing."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> Optional[int]:
    """The process's peak resident set size since the last reset (``VmHWM``)."""
    try:
        m = re.search(r"VmHWM:\s+(\d+) kB", Path("/proc/self/status").read_text())
    except OSError:
        return None
    return int(m.group(1)) * 1024 if m else None


def step_peak_rss(step: Callable[[], object]) -> Optional[int]:
    """Peak RSS while ``step()`` runs, above the RSS before it (None without the counter)."""
    if not reset_peak_rss():
        return None
    before = peak_rss_bytes()
    step()
    after = peak_rss_bytes()
    return None if before is None or after is None else after - before
