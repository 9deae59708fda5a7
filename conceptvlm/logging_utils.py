"""Training metrics to three sinks: a tqdm bar, TensorBoard and a JSONL file (rank 0 only)."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Optional


class MetricLogger:
    """``log(step, metrics)`` writes one JSONL line and TensorBoard scalars; the bar shows a few."""

    BAR_KEYS = ("loss", "lm_loss", "ratio/text", "ratio/image", "tokens_per_s")

    def __init__(self, out_dir: str | Path, total_steps: int, start_step: int = 0, enabled: bool = True,
                 tensorboard: bool = True, progress: bool = True) -> None:
        self.enabled = enabled
        self.jsonl = self.writer = self.bar = None
        if not enabled:
            return
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        self.jsonl = open(out / "metrics.jsonl", "a")
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(out / "tensorboard"))
        if progress:
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, desc="train", dynamic_ncols=True)

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        flat = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        self.jsonl.write(json.dumps({"step": step, **metrics}, default=_jsonable) + "\n")
        self.jsonl.flush()
        if self.writer is not None:
            for k, v in flat.items():
                if math.isfinite(v):
                    self.writer.add_scalar(k, v, step)
        if self.bar is not None:
            self.bar.set_postfix({k: f"{flat[k]:.4g}" for k in self.BAR_KEYS if k in flat}, refresh=False)

    def advance(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def message(self, text: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, flush=True)

    def close(self) -> None:
        for h in (self.bar, self.writer, self.jsonl):
            if h is not None:
                h.close()


def _jsonable(x: Any) -> Any:
    try:
        return float(x)
    except (TypeError, ValueError):
        return str(x)


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def expert_load_summary(counts: list, prefix: str = "expert_load") -> dict[str, Any]:
    """Per MoE layer: ``max/mean`` tokens per expert (1 = perfectly balanced) and the shares."""
    out: dict[str, Any] = {}
    for i, c in enumerate(counts):
        c = [float(v) for v in c]
        total = sum(c) or 1.0
        mean = total / len(c)
        out[f"{prefix}/layer{i}/max_over_mean"] = max(c) / mean if total else 0.0
        out[f"{prefix}/layer{i}/shares"] = [v / total for v in c]
    return out


def fmt(metrics: dict[str, Any], keys: Optional[list[str]] = None) -> str:
    keys = keys or [k for k in metrics if isinstance(metrics[k], float)]
    return " ".join(f"{k}={metrics[k]:.4g}" for k in keys if k in metrics)
