"""A fast, quiet first run: no DeepSpeed op compiled unless the run uses it, and no
known-harmless library warnings on CPU.

DeepSpeed's torch backend builds its ``deepspeed_shm_comm`` extension whenever it
starts on the CPU accelerator (``deepspeed.comm.torch.TorchBackend.__init__`` calls
``build_shm_op``), single process included. That op only speeds up collectives between
CPU ranks of one machine, so a one-process run has no use for it, and compiling it takes
2-7 minutes of silence on a small machine (again whenever the extension cache was built
with other flags). :func:`prepare_deepspeed_comm` skips it where it is not needed and says
so on the terminal where it is.
"""
from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path

SHM_OP = "deepspeed_shm_comm"
SHM_ENV = "CONCEPTVLM_SHM_COMM"
"""``0`` skips the shared-memory collectives op in multi-process CPU runs too (collectives then
run over plain gloo, which is slower but needs no compiler); ``1`` builds it even for one process."""


def _cpu_accelerator() -> bool:
    from deepspeed.accelerator import get_accelerator

    return get_accelerator().device_name() == "cpu"


def shm_op_cached() -> bool:
    """Whether a previous run left a compiled shm op in the torch extension cache."""
    try:
        from torch.utils.cpp_extension import _get_build_directory

        build_dir = Path(_get_build_directory(SHM_OP, verbose=False))
    except Exception:  # private helper moved: assume not cached, the message is then only cautious
        return False
    return (build_dir / f"{SHM_OP}.so").is_file()


def wants_shm_op(world_size: int) -> bool:
    """The op is worth building only for several CPU ranks (overridable by ``CONCEPTVLM_SHM_COMM``)."""
    env = os.environ.get(SHM_ENV, "").strip()
    if env in ("0", "1"):
        return env == "1"
    return world_size > 1


def prepare_deepspeed_comm(world_size: int, rank: int = 0) -> None:
    """Call before ``deepspeed.init_distributed``: skip building the shm op when this run
    does not need it; when it does and it is not cached, say so before the wait (rank 0)."""
    if not _cpu_accelerator():
        return
    import importlib

    # ``import deepspeed.comm.torch as m`` would give torch itself: deepspeed.comm re-exports
    # the name ``torch`` over its submodule.
    ds_torch = importlib.import_module("deepspeed.comm.torch")
    if not wants_shm_op(world_size):
        # The backend treats None as "op unavailable" and uses torch.distributed directly.
        ds_torch.build_shm_op = lambda: None
    elif rank == 0 and not shm_op_cached():
        print(f"DeepSpeed is compiling its shared-memory collectives op ({SHM_OP}) for {world_size} CPU ranks: "
              f"once per machine, usually 2-7 minutes (set {SHM_ENV}=0 to use plain gloo instead)",
              file=sys.stderr, flush=True)


def quiet_library_warnings() -> None:
    """Silence what DeepSpeed and torch print on every CPU-only start although nothing is wrong
    (``CONCEPTVLM_VERBOSE_WARNINGS=1`` keeps them). Call before DeepSpeed is imported."""
    if os.environ.get("CONCEPTVLM_VERBOSE_WARNINGS"):
        return
    import logging

    import torch

    if not torch.cuda.is_available() and "deepspeed" not in sys.modules:
        # Naming the accelerator skips DeepSpeed's "Setting accelerator to CPU. If you have
        # GPU ... we were unable to detect it" warning (child processes inherit it).
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    # "No CUDA runtime is found, using CUDA_HOME=..." when DeepSpeed's op builders import
    # torch.utils.cpp_extension on a machine without a GPU.
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=r".*CUDA initialization.*")
    warnings.filterwarnings("ignore", message=r".*Can't initialize NVML.*")
