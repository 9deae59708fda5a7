"""Builders for the training tests: synthetic shards and small train YAMLs in tmp dirs."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from conceptvlm.data.synthetic import write_synthetic_shards

REPO = Path(__file__).resolve().parents[2]


def text_shards(directory: Path, num: int = 300) -> str:
    """Synthetic text shards (the data package's writer); returns the shard spec."""
    paths = write_synthetic_shards("text", directory, num=num, shard_size=num // 2)
    return f"{directory}/text-{{000000..{len(paths) - 1:06d}}}.tar"


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def train_yaml(path: Path, shards: str, **sections: Any) -> Path:
    """A tiny text train config (configs/model/tiny.yaml, few steps, quiet) with overrides."""
    cfg = {
        "model_file": str(REPO / "configs/model/tiny.yaml"),
        "model": {"d_model": 32, "moe": {"expert_hidden": 32}},
        "data": {"sources": [{"shards": shards, "kind": "text"}], "seq_len": 64, "batch_size": 2,
                 "shuffle_buffer": 20, "shuffle_initial": 5},
        "optim": {"lr": 3.0e-3, "warmup_steps": 2},
        "parallel": {"deepspeed_config": str(REPO / "configs/deepspeed/zero1.json")},
        "train": {"steps": 4, "progress": False, "tensorboard": False, "out_dir": str(path.parent / "run")},
    }
    path.write_text(yaml.safe_dump(_merge(cfg, sections)))
    return path
