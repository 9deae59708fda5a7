"""The training loss, and the one rule for normalising quantities across data-parallel ranks.

Every quantity that enters the back-propagated loss is a *mean over the global batch*:
the LM loss (over label tokens), the ratio loss's ``F`` and ``G`` (over each modality's
positions, ``chunk.chunk_statistics``) and the MoE balance/z losses (over routed tokens,
``moe.aux_losses``). Each is a ratio ``sum / count`` of per-rank sums; the sums are
all-reduced (:func:`reduce_sums`) and the mean is formed by :func:`global_mean`. So N
ranks train exactly like one process on the concatenated batch, and every rank holds the
same loss value.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist


def data_parallel_world() -> int:
    """Ranks of the data-parallel group (the whole world: no tensor/pipeline parallelism)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def reduce_sums(local: torch.Tensor, across_ranks: bool = True) -> tuple[torch.Tensor, int]:
    """``(sum over the data-parallel ranks of local, world)``: detached, float64.

    One collective for a fixed-size tensor, so ranks whose batch lacks a modality or a
    token still take part. Without ``across_ranks`` (evaluation, one process) nothing is
    exchanged and ``world`` is 1.
    """
    glob = local.detach().to(torch.float64).clone()
    world = data_parallel_world() if across_ranks else 1
    if world > 1:
        dist.all_reduce(glob)
    return glob, world


def global_mean(local_sum: torch.Tensor, global_sum: torch.Tensor, global_count: torch.Tensor,
                world: int) -> torch.Tensor:
    """A mean over the global batch, from this rank's differentiable share of its sum.

    Value: ``global_sum / global_count``, identical on every rank. Gradient: that of
    ``world * local_sum / global_count``; DeepSpeed averages gradients over the ``world``
    ranks, which turns it into the gradient of the global mean. This is how every
    quantity of the loss is normalised:

    * LM loss: ``sum of token cross-entropies / global label tokens``;
    * ratio loss ``G`` (mean boundary probability): ``sum p / global positions`` per
      modality (``F``, which carries no gradient, is the plain global ratio);
    * MoE balance ``P_e`` (mean router probability) and z-loss (mean squared
      logsumexp): ``sum / global routed tokens`` per layer.

    No collective sits in the autograd graph: the value comes through a detach.
    """
    count = global_count.clamp_min(1).to(local_sum.dtype)
    scaled = local_sum * world
    return (global_sum.to(local_sum.dtype) / count).detach() + (scaled - scaled.detach()) / count


def training_loss(out: Any, across_ranks: bool = True) -> tuple[torch.Tensor, dict[str, Any]]:
    """The loss to back-propagate for one micro-batch, and what the step needs to know.

    ``out`` is a :class:`conceptvlm.model.ModelOutput` of a training forward: its
    ``aux_loss`` (ratio + balance + z) is already global (the model normalised it with
    :func:`global_mean`); the LM loss is made global here, by the global label-token
    count. Returns ``(loss, {"lm_loss": float, "nonfinite": bool})``; ``nonfinite`` is
    agreed across ranks, so every rank skips the same micro-batches.
    """
    n = float(out.n_label_tokens)
    ce_sum = out.lm_loss * n  # mean * count: this rank's sum of token cross-entropies
    finite = bool(torch.isfinite(out.loss.detach()))
    local = torch.stack([ce_sum.detach().to(torch.float64).reshape(()),
                         ce_sum.new_tensor(n, dtype=torch.float64),
                         ce_sum.new_tensor(0.0 if finite else 1.0, dtype=torch.float64)])
    glob, world = reduce_sums(local, across_ranks)
    lm = global_mean(ce_sum, glob[0], glob[1], world)
    return lm + out.aux_loss, {"lm_loss": float(glob[0] / glob[1].clamp_min(1)), "nonfinite": bool(glob[2] > 0)}


__all__ = ["data_parallel_world", "reduce_sums", "global_mean", "training_loss"]
