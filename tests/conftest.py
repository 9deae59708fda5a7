"""Shared fixtures: tiny configs and generated data, all built in-process."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

# Multi-rank tests check our collectives, not DeepSpeed's shared-memory op: use plain gloo
# so a fresh machine does not spend minutes compiling it (conceptvlm/quiet.py).
os.environ.setdefault("CONCEPTVLM_SHM_COMM", "0")

# Two cores: keep each test process from oversubscribing them.
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture
def repo_root() -> Path:
    return REPO
