"""Dropless token-choice top-k Mixture-of-Experts feed-forward.

Dispatch (no capacity, no token dropped, no Python loop over tokens):
  1. router logits -> softmax -> top-k experts per token,
  2. the N*k (token, expert) pairs are sorted by expert; ``counts`` per expert give
     group offsets by cumsum,
  3. one grouped matmul per weight (``F.grouped_mm``) runs every expert on its
     contiguous slice; SwiGLU in between,
  4. outputs are scaled by the gate and summed back into token order (``index_add_``).
Where ``grouped_mm`` cannot run (float64, unaligned shapes, GPUs without it) the same
sorted layout is processed one expert at a time: identical math, measured slower.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


class SwiGLU(nn.Module):
    """Dense SwiGLU feed-forward (shared experts)."""

    def __init__(self, d_model: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(d_model, hidden, bias=False)
        self.w3 = nn.Linear(d_model, hidden, bias=False)
        self.w2 = nn.Linear(hidden, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the incoming gradient contiguous.

    ``grouped_mm``'s backward rejects expanded (stride-0) gradients such as the one
    ``.sum()`` produces.
    """

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return g.contiguous()


def _grouped_mm_usable(x: torch.Tensor, *ws: torch.Tensor) -> bool:
    if not hasattr(F, "grouped_mm"):
        return False
    if x.device.type == "cpu":
        ok_dtype = x.dtype == torch.float32
    else:
        ok_dtype = x.dtype == torch.bfloat16
    # 16-byte aligned row strides are required by the kernel.
    per16 = 16 // x.element_size()
    return ok_dtype and all(w.shape[-1] % per16 == 0 and w.shape[-2] % per16 == 0 for w in ws)


def grouped_matmul(x_TD: torch.Tensor, w_EDH: torch.Tensor, counts_E: torch.Tensor,
                   offsets_E: torch.Tensor) -> torch.Tensor:
    """Rows of ``x_TD`` are grouped by expert (``counts_E`` each); row group e @ w_EDH[e]."""
    if _grouped_mm_usable(x_TD, w_EDH):
        return F.grouped_mm(_ContiguousGrad.apply(x_TD), w_EDH, offs=offsets_E)
    chunks = torch.split(x_TD, counts_E.tolist())
    return torch.cat([c @ w_EDH[e] for e, c in enumerate(chunks)], dim=0)


class GroupedExperts(nn.Module):
    """``n_experts`` SwiGLU experts stored as stacked weights ``[E, in, out]``."""

    def __init__(self, n_experts: int, d_model: int, hidden: int):
        super().__init__()
        self.w1_EDH = nn.Parameter(torch.empty(n_experts, d_model, hidden))
        self.w3_EDH = nn.Parameter(torch.empty(n_experts, d_model, hidden))
        self.w2_EHD = nn.Parameter(torch.empty(n_experts, hidden, d_model))

    def forward(self, x_TD: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        """Rows of ``x_TD`` sorted by expert (``counts_E`` each).

        The grouped kernel also serves decoding (a few rows): experts with no rows cost
        next to nothing, and nothing is copied. Gathering the chosen experts' weights
        for a batched matmul instead copies them (1 MB per matrix at width 256, hidden
        512): measured 4.4x slower for one token with top-2 of 8 experts on CPU.
        """
        offsets = torch.cumsum(counts_E, 0).to(torch.int32)
        a = grouped_matmul(x_TD, self.w1_EDH, counts_E, offsets)
        b = grouped_matmul(x_TD, self.w3_EDH, counts_E, offsets)
        return grouped_matmul(F.silu(a) * b, self.w2_EHD, counts_E, offsets)


@dataclass
class MoEOutput:
    y: torch.Tensor  # [N, D]
    balance_loss: torch.Tensor  # scalar, E * sum_e f_e * P_e (1.0 when perfectly balanced)
    z_loss: torch.Tensor  # scalar, mean logsumexp(router logits)^2
    counts: torch.Tensor  # [E] tokens routed to each expert (load statistics)


class MoE(nn.Module):
    """Token-choice top-k MoE with optional always-on shared experts."""

    def __init__(self, d_model: int, n_experts: int, top_k: int, hidden: int, n_shared: int = 0):
        super().__init__()
        self.n_experts, self.top_k = n_experts, top_k
        self.router = nn.Linear(d_model, n_experts, bias=False)
        self.experts = GroupedExperts(n_experts, d_model, hidden)
        self.shared = SwiGLU(d_model, hidden * n_shared) if n_shared > 0 else None

    def route(self, x_ND: torch.Tensor):
        """Router probabilities (float32), top-k gates and expert ids."""
        logits = self.router(x_ND).float()  # [N, E]
        probs = logits.softmax(-1)
        gate_NK, expert_NK = probs.topk(self.top_k, dim=-1)
        if self.top_k > 1:
            gate_NK = gate_NK / gate_NK.sum(-1, keepdim=True)
        return logits, probs, gate_NK, expert_NK

    def forward(self, x_ND: torch.Tensor) -> MoEOutput:
        """``x_ND``: the valid tokens only (padding removed by the caller)."""
        N, D = x_ND.shape
        if N == 0:
            zero = x_ND.new_zeros((), dtype=torch.float32) + 0.0 * self.router.weight.sum()
            return MoEOutput(x_ND.clone(), zero, zero, torch.zeros(self.n_experts, dtype=torch.long, device=x_ND.device))
        logits, probs, gate_NK, expert_NK = self.route(x_ND)

        flat_expert = expert_NK.reshape(-1)  # [N*k]
        order = torch.argsort(flat_expert, stable=True)
        token_of = order // self.top_k  # source token of each sorted row
        counts = torch.bincount(flat_expert, minlength=self.n_experts)

        x_sorted = x_ND[token_of]  # [N*k, D]
        y_sorted = self.experts(x_sorted, counts)
        y_sorted = y_sorted * gate_NK.reshape(-1)[order, None].to(y_sorted.dtype)
        y = torch.zeros_like(x_ND).index_add_(0, token_of, y_sorted)
        if self.shared is not None:
            y = y + self.shared(x_ND)

        if not self.training:  # the auxiliary losses only matter for training
            zero = logits.new_zeros(())
            return MoEOutput(y, zero, zero, counts.detach())
        frac = counts.to(probs.dtype) / (N * self.top_k)  # f_e: share of routed slots
        balance = self.n_experts * (frac * probs.mean(0)).sum()
        z = torch.logsumexp(logits, -1).pow(2).mean()
        return MoEOutput(y, balance, z, counts.detach())


def moe_reference(moe: MoE, x_ND: torch.Tensor) -> torch.Tensor:
    """Slow, obvious reference: every token, every chosen expert, one at a time."""
    _, _, gate_NK, expert_NK = moe.route(x_ND)
    ex = moe.experts
    rows = []
    for n in range(x_ND.shape[0]):
        acc = torch.zeros_like(x_ND[n])
        for j in range(moe.top_k):
            e = int(expert_NK[n, j])
            h = F.silu(x_ND[n] @ ex.w1_EDH[e]) * (x_ND[n] @ ex.w3_EDH[e])
            acc = acc + gate_NK[n, j].to(x_ND.dtype) * (h @ ex.w2_EHD[e])
        rows.append(acc)
    y = torch.stack(rows)
    if moe.shared is not None:
        y = y + moe.shared(x_ND)
    return y
