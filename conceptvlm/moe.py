"""Dropless token-choice top-k Mixture-of-Experts feed-forward.

Router -> dispatch -> experts -> combine (no capacity, no token dropped, no Python loop
over tokens):
  1. router logits -> softmax -> top-k experts per token (:class:`Router`),
  2. the N*k (token, expert) pairs are sorted by expert; ``counts`` per expert give
     group offsets by cumsum,
  3. one grouped matmul per weight (``F.grouped_mm``) runs every expert on its
     contiguous slice; SwiGLU in between,
  4. outputs are scaled by the gate and summed back into token order (``index_add_``).
Where ``grouped_mm`` cannot run (float64, unaligned shapes, GPUs without it) the same
sorted layout is processed one expert at a time: identical math, measured slower.
The load-balance and z losses are :func:`aux_losses`, the only place they are written.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .grouped_mm import grouped_mm, grouped_mm_loop
from .grouped_mm import grouped_mm_usable as _grouped_mm_usable  # bench moe swaps it out
from .loss import global_mean, reduce_sums
from .precision import upcast


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


def grouped_matmul(x_TD: torch.Tensor, w_EDH: torch.Tensor, counts_E: torch.Tensor,
                   offsets_E: torch.Tensor) -> torch.Tensor:
    """Rows of ``x_TD`` are grouped by expert (``counts_E`` each); row group e @ w_EDH[e].

    Under ``torch.compile`` it is the custom op :func:`.grouped_mm.grouped_mm` (the native
    op's fake kernel is bf16/fp16 only); eager mode keeps calling the kernel directly.
    """
    usable = _grouped_mm_usable(x_TD, w_EDH)
    if torch.compiler.is_compiling() and not (usable and x_TD.dtype in (torch.bfloat16, torch.float16)):
        return grouped_mm(x_TD, w_EDH, offsets_E)
    if usable:
        if torch.is_grad_enabled():  # an autograd.Function call costs ~10 us: not in inference
            x_TD = _ContiguousGrad.apply(x_TD)
        return F.grouped_mm(x_TD, w_EDH, offs=offsets_E)
    return grouped_mm_loop(x_TD, w_EDH, counts_E.tolist())


def swiglu_experts(x_TD: torch.Tensor, w1_EDH: torch.Tensor, w3_EDH: torch.Tensor, w2_EHD: torch.Tensor,
                   counts_E: torch.Tensor) -> torch.Tensor:
    """``w2[e](silu(x w1[e]) * (x w3[e]))`` for each group of rows (``counts_E`` per expert)."""
    if _few_rows_on_cpu(x_TD, w1_EDH):
        return _swiglu_active_experts(x_TD, w1_EDH, w3_EDH, w2_EHD, counts_E.tolist())
    offsets = torch.cumsum(counts_E, 0).to(torch.int32)
    a = grouped_matmul(x_TD, w1_EDH, counts_E, offsets)
    b = grouped_matmul(x_TD, w3_EDH, counts_E, offsets)
    return grouped_matmul(F.silu(a) * b, w2_EHD, counts_E, offsets)


def _few_rows_on_cpu(x_TD: torch.Tensor, w_EDH: torch.Tensor) -> bool:
    """Decoding on CPU: fewer rows than experts, no gradient, not being compiled."""
    return (x_TD.device.type == "cpu" and x_TD.shape[0] < w_EDH.shape[0] and not torch.is_grad_enabled()
            and not torch.compiler.is_compiling())


def _swiglu_active_experts(x_TD: torch.Tensor, w1_EDH: torch.Tensor, w3_EDH: torch.Tensor, w2_EHD: torch.Tensor,
                           counts: list[int]) -> torch.Tensor:
    """The experts that have rows, one at a time, on views of their weights (decode on CPU).

    The CPU ``grouped_mm`` visits every expert (a slice, a view and a host read of its
    offset per expert and matmul, ~50 us a call at 8 experts); with fewer rows than
    experts most groups are empty. Measured in a decode step of the 24-layer bench model
    (top-2 of 8): those per-expert ops took 2.4 ms of a 21 ms step. On GPU the grouped
    kernel is one launch and stays.
    """
    y_TD = x_TD.new_empty(x_TD.shape[0], w2_EHD.shape[-1])
    start = 0
    for e, n in enumerate(counts):
        if n:
            x = x_TD[start:start + n]
            torch.mm(F.silu(x @ w1_EDH[e]) * (x @ w3_EDH[e]), w2_EHD[e], out=y_TD[start:start + n])
            start += n
    return y_TD


class GroupedExperts(nn.Module):
    """``n_experts`` SwiGLU experts stored as stacked weights ``[E, in, out]``."""

    def __init__(self, n_experts: int, d_model: int, hidden: int):
        super().__init__()
        self.w1_EDH = nn.Parameter(torch.empty(n_experts, d_model, hidden))
        self.w3_EDH = nn.Parameter(torch.empty(n_experts, d_model, hidden))
        self.w2_EHD = nn.Parameter(torch.empty(n_experts, hidden, d_model))

    def forward(self, x_TD: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        """Rows of ``x_TD`` sorted by expert (``counts_E`` each).

        Decoding (fewer rows than experts) on CPU runs only the experts with rows, on
        views of their weights (:func:`_swiglu_active_experts`). Gathering the chosen
        experts' weights for a batched matmul instead copies them (1 MB per matrix at
        width 256, hidden 512): measured 4.4x slower for one token with top-2 of 8.
        """
        return swiglu_experts(x_TD, self.w1_EDH, self.w3_EDH, self.w2_EHD, counts_E)


class Routing(NamedTuple):
    """What the router decided for ``N`` tokens (a tuple, so ZeRO-3's module hooks see
    the tensors and keep the router's weight gathered for the backward pass)."""

    logits_NE: torch.Tensor  # router logits, float32 (float64 in a float64 model)
    probs_NE: torch.Tensor  # softmax over experts (the balance loss's P)
    gate_NK: torch.Tensor  # weight of each chosen expert in the token's output
    expert_NK: torch.Tensor  # ids of the chosen experts


class Router(nn.Linear):
    """Token-choice top-k gate: ``logits = W x``, softmax, the top ``k`` experts.

    A ``Linear`` (no bias) so checkpoints keep the key ``router.weight``; the gating
    rule (how probabilities become the chosen experts and their weights) is
    :meth:`gate`, the one place a variant of it belongs.

    ``norm_topk``: renormalise the top-k gates to sum to 1 (None: when ``top_k > 1``;
    OLMoE and Qwen-MoE checkpoints say False/True explicitly, Mixtral True).
    """

    def __init__(self, d_model: int, n_experts: int, top_k: int, norm_topk: Optional[bool] = None):
        super().__init__(d_model, n_experts, bias=False)
        self.n_experts, self.top_k = n_experts, top_k
        self.norm_topk = top_k > 1 if norm_topk is None else norm_topk

    def gate(self, probs_NE: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k of the softmax probabilities; with ``norm_topk`` renormalised to sum to 1
        over the chosen experts (= softmax over the top-k logits, Mixtral's form)."""
        gate_NK, expert_NK = probs_NE.topk(self.top_k, dim=-1)
        if self.norm_topk:
            gate_NK = gate_NK / gate_NK.sum(-1, keepdim=True)
        return gate_NK, expert_NK

    def forward(self, x_ND: torch.Tensor) -> Routing:
        logits_NE = upcast(super().forward(x_ND))  # routing decisions in >= float32
        probs_NE = logits_NE.softmax(-1)
        return Routing(logits_NE, probs_NE, *self.gate(probs_NE))


@dataclass
class MoEOutput:
    y: torch.Tensor  # [N, D]
    balance_loss: torch.Tensor  # scalar, E * sum_e f_e * P_e (1.0 when perfectly balanced)
    z_loss: torch.Tensor  # scalar, mean logsumexp(router logits)^2
    counts: torch.Tensor  # [E] tokens routed to each expert (load statistics)


def aux_losses(routing: Routing, counts_E: torch.Tensor, top_k: int,
               across_ranks: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Load-balance and z losses, and the expert counts they were taken over.

    ``balance = E * sum_e f_e P_e`` (Switch), ``f_e`` the share of routed slots that went
    to expert e and ``P_e`` its mean router probability; ``z = mean logsumexp(logits)^2``
    (ST-MoE). With ``across_ranks`` both are means over the global batch and the counts
    are global (``loss.global_mean``); otherwise over this call's tokens.
    """
    probs_NE, E = routing.probs_NE, routing.probs_NE.shape[-1]
    lse2_N = torch.logsumexp(routing.logits_NE, -1).pow(2)
    local = torch.cat([counts_E.to(probs_NE.dtype), probs_NE.detach().sum(0),
                       probs_NE.new_full((1,), probs_NE.shape[0]), lse2_N.detach().sum()[None]])
    glob, world = reduce_sums(local, across_ranks)
    counts_g, psum_g, n_g, lse2_g = glob[:E], glob[E:2 * E], glob[2 * E], glob[2 * E + 1]
    frac_E = (counts_g / (n_g.clamp_min(1) * top_k)).to(probs_NE.dtype)  # f: no gradient
    balance = E * (frac_E * global_mean(probs_NE.sum(0), psum_g, n_g, world)).sum()
    z = global_mean(lse2_N.sum(), lse2_g, n_g, world)
    return balance, z, counts_g.round().long()


class MoE(nn.Module):
    """Token-choice top-k MoE with optional always-on shared experts.

    ``forward`` is router -> dispatch -> experts -> combine. :meth:`dispatch` sends the
    expert-sorted rows to their experts and brings the outputs back; expert parallelism
    (``expert_parallel.py``) replaces only it, with an all-to-all.

    ``norm_topk``: see :class:`Router`. ``shared_hidden``: the shared SwiGLU's hidden
    size (default ``hidden * n_shared``). ``shared_gate``: scale the shared output by
    ``sigmoid(g . x)`` per token (Qwen2-MoE), in :meth:`combine`.
    """

    def __init__(self, d_model: int, n_experts: int, top_k: int, hidden: int, n_shared: int = 0,
                 norm_topk: Optional[bool] = None, shared_hidden: Optional[int] = None, shared_gate: bool = False):
        super().__init__()
        self.n_experts, self.top_k = n_experts, top_k
        self.router = Router(d_model, n_experts, top_k, norm_topk)
        self.experts = GroupedExperts(n_experts, d_model, hidden)
        self.shared = SwiGLU(d_model, shared_hidden or hidden * n_shared) if n_shared > 0 else None
        self.shared_gate = nn.Linear(d_model, 1, bias=False) if (shared_gate and n_shared > 0) else None

    def dispatch(self, x_TD: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        """Rows sorted by expert (``counts_E`` each) -> their experts' outputs, same order."""
        return self.experts(x_TD, counts_E)

    def combine(self, x_ND: torch.Tensor, routed_ND: torch.Tensor) -> torch.Tensor:
        """The gated routed experts' sum ``routed_ND`` plus the shared experts' output,
        itself scaled by ``sigmoid(g . x)`` when there is a shared gate."""
        if self.shared is None:
            return routed_ND
        s_ND = self.shared(x_ND)
        if self.shared_gate is not None:
            s_ND = torch.sigmoid(self.shared_gate(x_ND)) * s_ND
        return routed_ND + s_ND

    def forward(self, x_ND: torch.Tensor) -> MoEOutput:
        """``x_ND``: the valid tokens only (padding removed by the caller).

        Training takes the auxiliary losses over the global batch of the data-parallel
        ranks; evaluation computes none and exchanges nothing.
        """
        routing = self.router(x_ND)
        flat_expert = routing.expert_NK.reshape(-1)  # [N*k]
        order = torch.argsort(flat_expert, stable=True)
        token_of = order // self.top_k  # source token of each sorted row
        counts = expert_counts(flat_expert, self.n_experts)

        y_sorted = self.dispatch(x_ND[token_of], counts)  # [N*k, D]
        y_sorted = y_sorted * routing.gate_NK.reshape(-1)[order, None].to(y_sorted.dtype)
        y = self.combine(x_ND, torch.zeros_like(x_ND).index_add_(0, token_of, y_sorted))

        if not self.training:  # the auxiliary losses only matter for training
            zero = routing.logits_NE.new_zeros(())
            return MoEOutput(y, zero, zero, counts.detach())
        balance, z, counts_g = aux_losses(routing, counts, self.top_k, across_ranks=True)
        return MoEOutput(y, balance, z, counts_g)


def expert_counts(expert_R: torch.Tensor, n_experts: int) -> torch.Tensor:
    """How many rows go to each expert (``expert_R``: each row's expert).

    ``bincount`` is one op, which matters on a CPU (decoding steps are op-bound). On a GPU
    it reads its input's min and max back to the host, stalling the queue twice per MoE
    layer, and under ``torch.compile`` its data-dependent length cannot be traced: there
    a scatter-add counts instead, asynchronously.
    """
    if expert_R.is_cuda or torch.compiler.is_compiling():
        return expert_R.new_zeros(n_experts).index_add_(0, expert_R, torch.ones_like(expert_R))
    return torch.bincount(expert_R, minlength=n_experts)


def moe_reference(moe: MoE, x_ND: torch.Tensor) -> torch.Tensor:
    """Slow, obvious reference: every token, every chosen expert, one at a time."""
    routing = moe.router(x_ND)
    gate_NK, expert_NK = routing.gate_NK, routing.expert_NK
    ex = moe.experts
    rows = []
    for n in range(x_ND.shape[0]):
        acc = torch.zeros_like(x_ND[n])
        for j in range(moe.top_k):
            e = int(expert_NK[n, j])
            h = F.silu(x_ND[n] @ ex.w1_EDH[e]) * (x_ND[n] @ ex.w3_EDH[e])
            acc = acc + gate_NK[n, j].to(x_ND.dtype) * (h @ ex.w2_EHD[e])
        rows.append(acc)
    return moe.combine(x_ND, torch.stack(rows))
