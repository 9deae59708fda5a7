"""Expert parallelism and data-parallel-exact MoE statistics, on DeepSpeed's own groups.

``parallelize_moe(model, ep_size)`` swaps every :class:`conceptvlm.moe.MoE` in place:

* ``ep_size > 1``: :class:`ExpertParallelMoE`. Rank ``q`` of an expert-parallel group
  (``deepspeed.utils.groups``, name ``ep_size_{ep}``) holds experts
  ``[q*E_l, (q+1)*E_l)``. Token-expert pairs, sorted by global expert as in the single
  process MoE, go to their owner with one variable-split all-to-all, run through one
  grouped matmul per weight, and come back with the inverse all-to-all.
  It subclasses ``deepspeed.moe.layer.MoE`` because that is how ``DeepSpeedEngine``
  decides it has MoE layers (``isinstance(module, MoE)`` in
  ``_configure_distributed_model``): only then does it create the expert-data-parallel
  groups' bookkeeping, reduce params marked ``allreduce=False`` over
  ``expert_data_parallel_group[group_name]`` (ZeRO-0: ``_reduce_expert_gradients``;
  ZeRO-1/2: the ``moe`` optimizer param groups), write one checkpoint file per expert
  and refuse ZeRO-3. Local experts are stored as
  ``deepspeed_moe.experts.deepspeed_experts.{i}.w1|w3|w2`` so DeepSpeed's per-expert
  checkpoint files (global expert ids) work unchanged.
* ``ep_size == 1`` with several data-parallel ranks: :class:`SyncedMoE`, the same
  module and parameters, only the statistics are global.

In both, the load-balance and z losses are computed from statistics all-reduced over
the data-parallel group, so their values equal one process on the global batch, and
their gradients are the global loss's gradients after DeepSpeed's average over ranks
(the local term is scaled by the world size; the value is replaced by the global one
with a detach trick, so no collective sits in the autograd graph except the
all-to-all). ``expert_counts`` are global too.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from .moe import MoE, MoEOutput, grouped_matmul

try:  # DeepSpeed is a hard dependency of training, not of the model
    from deepspeed.moe.layer import MoE as _DeepSpeedMoE
except Exception:  # pragma: no cover
    _DeepSpeedMoE = nn.Module


def group_name(ep_size: int) -> str:
    return f"ep_size_{ep_size}"


def ensure_expert_groups(ep_size: int) -> None:
    """Create DeepSpeed's expert-parallel and expert-data-parallel groups for ``ep_size``."""
    from deepspeed.utils import groups

    world = dist.get_world_size()
    if world % ep_size:
        raise ValueError(f"parallel.ep_size={ep_size} must divide the world size {world}")
    if group_name(ep_size) not in groups._get_expert_parallel_group_dict():
        groups._create_expert_and_data_parallel(ep_size)


def _dp_group():
    from deepspeed.utils import groups

    return groups._get_data_parallel_group()


class _AllToAll(torch.autograd.Function):
    """``all_to_all_single`` with variable splits; backward is the reverse exchange."""

    @staticmethod
    def forward(ctx, x, out_splits: list[int], in_splits: list[int], group):
        ctx.splits, ctx.group = (out_splits, in_splits), group
        out = x.new_empty((sum(out_splits),) + tuple(x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, g):
        out_splits, in_splits = ctx.splits
        grad = g.new_empty((sum(in_splits),) + tuple(g.shape[1:]))
        dist.all_to_all_single(grad, g.contiguous(), in_splits, out_splits, group=ctx.group)
        return grad, None, None, None


def global_moe_losses(probs_NE: torch.Tensor, logits_NE: torch.Tensor, counts_E: torch.Tensor, top_k: int,
                      group=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Balance loss ``E * sum_e f_e P_e`` and z-loss over the *global* batch of the group.

    Returns (balance, z, global counts). Values are identical on every rank and equal a
    single process on the concatenated batch; gradients are the local share times the
    world size, which DeepSpeed's gradient average turns into the global gradient.
    """
    E = probs_NE.shape[-1]
    lse2 = torch.logsumexp(logits_NE, -1).pow(2)
    world = dist.get_world_size(group) if dist.is_initialized() else 1
    stats = torch.cat([counts_E.to(torch.float64), probs_NE.detach().sum(0).to(torch.float64),
                       torch.tensor([probs_NE.shape[0], lse2.detach().sum()], dtype=torch.float64,
                                    device=probs_NE.device)])
    if world > 1:
        dist.all_reduce(stats, group=group)
    counts_g, psum_g, n_g, lse2_g = stats[:E], stats[E:2 * E], stats[2 * E].clamp_min(1), stats[2 * E + 1]
    frac = (counts_g / (n_g * top_k)).to(probs_NE.dtype)
    balance_value = E * (frac * (psum_g / n_g).to(probs_NE.dtype)).sum()
    balance_local = E * (frac * probs_NE.sum(0) / n_g.to(probs_NE.dtype)).sum() * world
    z_value = (lse2_g / n_g).to(lse2.dtype)
    z_local = lse2.sum() / n_g.to(lse2.dtype) * world
    balance = balance_value.detach() + (balance_local - balance_local.detach())
    z = z_value.detach() + (z_local - z_local.detach())
    return balance, z, counts_g.round().long()


def _moe_forward(self, x_ND: torch.Tensor, run_experts) -> MoEOutput:
    """The dispatch of :meth:`conceptvlm.moe.MoE.forward` with global statistics."""
    logits, probs, gate_NK, expert_NK = MoE.route(self, x_ND)
    flat_expert = expert_NK.reshape(-1)
    order = torch.argsort(flat_expert, stable=True)
    token_of = order // self.top_k
    counts = torch.bincount(flat_expert, minlength=self.n_experts)
    y_sorted = run_experts(x_ND[token_of], counts)
    y_sorted = y_sorted * gate_NK.reshape(-1)[order, None].to(y_sorted.dtype)
    y = torch.zeros_like(x_ND).index_add_(0, token_of, y_sorted)
    if self.shared is not None:
        y = y + self.shared(x_ND)
    balance, z, counts_g = global_moe_losses(probs, logits, counts, self.top_k, _dp_group())
    return MoEOutput(y, balance, z, counts_g)


class SyncedMoE(MoE):
    """:class:`MoE` whose balance/z losses and counts are global over data-parallel ranks."""

    def forward(self, x_ND: torch.Tensor) -> MoEOutput:
        return _moe_forward(self, x_ND, self.experts)


class _Expert(nn.Module):
    """One SwiGLU expert: ``w2(silu(x w1) * (x w3))`` with ``w1, w3 [D, H]``, ``w2 [H, D]``."""

    def __init__(self, w1: torch.Tensor, w3: torch.Tensor, w2: torch.Tensor):
        super().__init__()
        self.w1, self.w3, self.w2 = (nn.Parameter(w.detach().clone()) for w in (w1, w3, w2))


class _LocalExperts(nn.Module):
    def __init__(self, experts: list[_Expert], name: str):
        super().__init__()
        self.deepspeed_experts = nn.ModuleList(experts)
        self.num_local_experts = len(experts)
        for p in self.deepspeed_experts.parameters():  # DeepSpeed's expert-param marking
            p.allreduce = False
            p.group_name = name


class ExpertParallelMoE(_DeepSpeedMoE):
    """A :class:`conceptvlm.moe.MoE` with its experts sharded over an expert-parallel group."""

    def __init__(self, moe: MoE, ep_size: int):
        nn.Module.__init__(self)  # DeepSpeed's MoE.__init__ builds its own gate/experts: not wanted
        from deepspeed.utils import groups

        ensure_expert_groups(ep_size)
        E = moe.n_experts
        if E % ep_size:
            raise ValueError(f"n_experts={E} must be divisible by ep_size={ep_size}")
        self.n_experts = self.num_experts = E
        self.top_k = moe.top_k
        self.ep_size = ep_size
        self.expert_group_name = group_name(ep_size)
        self.num_local_experts = E // ep_size
        self.use_residual = False
        self.enable_expert_tensor_parallelism = False
        self.ep_rank = groups._get_expert_parallel_rank(self.expert_group_name)
        self.ep_group = groups._get_expert_parallel_group(self.expert_group_name)
        self.router, self.shared = moe.router, moe.shared
        first = self.ep_rank * self.num_local_experts
        ex = moe.experts
        experts = [_Expert(ex.w1_EDH[g], ex.w3_EDH[g], ex.w2_EHD[g])
                   for g in range(first, first + self.num_local_experts)]
        self.deepspeed_moe = nn.Module()
        self.deepspeed_moe.experts = _LocalExperts(experts, self.expert_group_name)

    @property
    def first_expert(self) -> int:
        return self.ep_rank * self.num_local_experts

    def set_deepspeed_parallelism(self, use_data_before_expert_parallel_: bool = False) -> None:
        """Called by ``DeepSpeedEngine``; the groups already exist (made in ``__init__``)."""
        ensure_expert_groups(self.ep_size)

    def local_weights(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Stacked local expert weights ``[E_l, D, H], [E_l, D, H], [E_l, H, D]`` (differentiable)."""
        ex = self.deepspeed_moe.experts.deepspeed_experts
        return (torch.stack([e.w1 for e in ex]), torch.stack([e.w3 for e in ex]), torch.stack([e.w2 for e in ex]))

    def _run_experts(self, x_TD: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        P, El = self.ep_size, self.num_local_experts
        send_PE = counts_E.view(P, El)
        recv_PE = torch.empty_like(send_PE)
        dist.all_to_all_single(recv_PE, send_PE.contiguous(), group=self.ep_group)  # [source, local expert]
        in_splits, out_splits = send_PE.sum(1).tolist(), recv_PE.sum(1).tolist()
        x_recv = _AllToAll.apply(x_TD, out_splits, in_splits, self.ep_group)  # rows by (source, expert)
        expert_of_row = torch.repeat_interleave(torch.arange(El, device=x_TD.device).repeat(P), recv_PE.reshape(-1))
        perm = torch.argsort(expert_of_row, stable=True)  # -> rows by (expert, source)
        counts_l = recv_PE.sum(0)
        offsets = torch.cumsum(counts_l, 0).to(torch.int32)
        w1, w3, w2 = self.local_weights()
        xl = x_recv[perm]
        h = F.silu(grouped_matmul(xl, w1, counts_l, offsets)) * grouped_matmul(xl, w3, counts_l, offsets)
        yl = grouped_matmul(h, w2, counts_l, offsets)
        y_recv = yl[torch.argsort(perm)]
        return _AllToAll.apply(y_recv, in_splits, out_splits, self.ep_group)

    def forward(self, x_ND: torch.Tensor) -> MoEOutput:
        return _moe_forward(self, x_ND, self._run_experts)

    def gather_full_weights(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """All experts' weights ``[E, ...]`` on every rank of the expert-parallel group."""
        out = []
        for w in self.local_weights():
            w = w.detach().contiguous()
            parts = [torch.empty_like(w) for _ in range(self.ep_size)]
            dist.all_gather(parts, w, group=self.ep_group)
            out.append(torch.cat(parts, 0))
        return tuple(out)


def parallelize_moe(model: nn.Module, ep_size: int = 1) -> int:
    """Swap every :class:`conceptvlm.moe.MoE` for its distributed form; returns how many.

    Needs ``torch.distributed`` initialised when the world has more than one rank.
    """
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    if ep_size == 1 and world == 1:
        return 0
    n = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) in (MoE, SyncedMoE):
                if ep_size > 1:
                    setattr(parent, name, ExpertParallelMoE(child, ep_size))
                else:
                    child.__class__ = SyncedMoE
                n += 1
    return n


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict of the undistributed model: expert-parallel experts gathered back
    into ``...moe.experts.w1_EDH`` etc. Collective over the expert-parallel groups."""
    sd = {k: v for k, v in model.state_dict().items() if ".deepspeed_moe." not in k}
    for name, mod in model.named_modules():
        if isinstance(mod, ExpertParallelMoE):
            w1, w3, w2 = mod.gather_full_weights()
            prefix = f"{name}.experts." if name else "experts."
            sd[prefix + "w1_EDH"], sd[prefix + "w3_EDH"], sd[prefix + "w2_EHD"] = w1, w3, w2
    return sd


__all__ = ["ExpertParallelMoE", "SyncedMoE", "parallelize_moe", "ensure_expert_groups", "full_state_dict",
           "global_moe_losses", "group_name"]
