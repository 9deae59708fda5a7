"""Training metrics: what is measured per step (global over data-parallel ranks) and the
three sinks it goes to, a tqdm bar, TensorBoard and a JSONL file (rank 0 only)."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist


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
        path = out / "metrics.jsonl"
        if path.is_file():  # a resumed run: drop rows logged after the checkpoint it resumes from
            keep = [r for r in read_jsonl(path) if r.get("step", 0) <= start_step]
            path.write_text("".join(json.dumps(r) + "\n" for r in keep))
        self.jsonl = open(path, "a")
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(out / "tensorboard"), purge_step=start_step + 1 if start_step else None)
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


MODALITIES = ("text", "image")


class StepMetrics:
    """What one optimizer step measured, over its micro-batches and the data-parallel ranks.

    Metrics only: the loss that is back-propagated is ``loss.training_loss``'s. Each
    micro-batch adds its rank-local sums (detached tensors, no host sync); :meth:`result`
    reduces them over the ranks with one all-reduce and turns them into floats once.
    Ratios are of the step's sums (tokens / boundaries over every micro-batch and rank);
    losses are means over the micro-batches.
    """

    def __init__(self) -> None:
        self.sums: Optional[torch.Tensor] = None
        self.lm_losses: list[float] = []
        self.counts: list[list[torch.Tensor]] = []

    def add(self, out, lm_loss: float) -> None:
        """One micro-batch: its :class:`ModelOutput` and the global LM loss ``training_loss`` gave."""
        dev = out.aux_loss.device
        row = [out.aux_loss.detach() - out.ratio_loss.detach(), out.ratio_loss.detach(),
               out.balance_loss.detach(), out.z_loss.detach(),
               out.n_tokens.to(dev), out.n_concepts.to(dev)]
        zero = torch.zeros((), device=dev)
        for name in MODALITIES:
            st = out.chunk_stats.get(name) or {}
            row += [st.get("tokens", zero), st.get("boundaries", zero), st.get("ratio_loss", zero),
                    zero + float(bool(st)), st.get("eval_boundaries", zero), st.get("split_loss", zero)]
        spread = out.patch_spread
        row += [zero if spread is None else spread.detach(), zero + float(spread is not None)]
        row = torch.stack([r.to(torch.float64).reshape(()) for r in row])
        self.sums = row if self.sums is None else self.sums + row
        self.lm_losses.append(lm_loss)
        self.counts.append([c.detach() for c in out.expert_counts])

    def result(self, world: int) -> dict[str, Any]:
        n_micro = len(self.lm_losses)
        t = self.sums.clone()
        if world > 1:
            dist.all_reduce(t)
        v = t.tolist()

        def per_rank(x: float) -> float:  # a sum of rank-local values -> their mean
            return x / (n_micro * world)

        m: dict[str, Any] = {"lm_loss": sum(self.lm_losses) / n_micro}
        m["ratio_loss"] = per_rank(v[1])
        m["aux_loss"] = per_rank(v[0]) + m["ratio_loss"]
        m["loss"] = m["lm_loss"] + m["aux_loss"]
        m["balance_loss"], m["z_loss"] = per_rank(v[2]), per_rank(v[3])
        m["tokens"], m["concepts"] = v[4], v[5]
        for i, name in enumerate(MODALITIES):
            tok, bnd, rl, cnt, bnd_eval, split = v[6 + 6 * i: 12 + 6 * i]
            if tok > 0:
                m[f"ratio/{name}"] = tok / max(bnd, 1.0)  # of the sampled (training-mode) boundaries
                m[f"eval_ratio/{name}"] = tok / max(bnd_eval, 1.0)  # what the eval rule would realise
                m[f"boundary_rate/{name}"] = bnd / tok
                m[f"ratio_loss/{name}"] = rl / max(cnt, 1.0)
                if split:
                    m[f"split_loss/{name}"] = split / max(cnt, 1.0)
        spread, with_images = v[6 + 6 * len(MODALITIES):]
        if with_images:
            m["image/patch_spread"] = spread / with_images
        layers = [torch.stack(layer).sum(0).cpu().tolist() for layer in zip(*self.counts)]
        m.update(expert_load_summary(layers))
        return m


def collapse_warning(metrics: dict[str, Any]) -> Optional[str]:
    """A line for the log when a step's projected image patches are nearly one vector
    (``image/patch_spread`` under ``vision.projector.COLLAPSED_BELOW``), else None."""
    spread = metrics.get("image/patch_spread")
    if spread is None:
        return None
    from .vision.projector import COLLAPSED_BELOW  # only VLM runs log a spread

    if spread >= COLLAPSED_BELOW:
        return None
    return (f"image patches are nearly one vector after the projector (patch spread {spread:.3f} < "
            f"{COLLAPSED_BELOW}): the language model cannot see where things are. A tower or projector trained "
            "from scratch can collapse like this; freezing it (train.freeze=[tower.,projector.]) keeps the "
            "patches apart")


def skipped_counters(loaders: list) -> dict[str, int]:
    total: dict[str, int] = {}
    for ld in loaders:
        for k, v in ld.counters.as_dict().items():
            total[k] = total.get(k, 0) + v
    if dist.get_world_size() > 1:
        parts: list = [None] * dist.get_world_size()
        dist.all_gather_object(parts, total)
        total = {}
        for p in parts:
            for k, v in p.items():
                total[k] = total.get(k, 0) + v
    return {k: v for k, v in total.items() if k.startswith("skipped/")}


def grad_norm(model: torch.nn.Module) -> float:
    """Global L2 norm of the (already averaged) gradients before clipping: expert shards
    summed over their expert-parallel group, replicated parameters counted once."""
    from deepspeed.moe.utils import is_moe_param
    from deepspeed.utils import groups

    dense = torch.zeros((), dtype=torch.float64)
    experts: dict[str, torch.Tensor] = {}
    for p in model.parameters():
        if p.grad is None:
            continue
        sq = p.grad.detach().double().pow(2).sum().cpu()
        if is_moe_param(p):
            experts[p.group_name] = experts.get(p.group_name, torch.zeros((), dtype=torch.float64)) + sq
        else:
            dense += sq
    total = dense
    for name, sq in sorted(experts.items()):
        dist.all_reduce(sq, group=groups._get_expert_parallel_group(name))
        total = total + sq
    return float(total.sqrt())
