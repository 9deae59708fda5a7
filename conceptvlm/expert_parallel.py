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
* ``ep_size == 1``: nothing to swap. :class:`conceptvlm.moe.MoE` already takes its
  load-balance and z losses over the global batch in training (``moe.aux_losses`` with
  ``loss.global_mean``), and exchanges nothing in evaluation.

``ExpertParallelMoE`` inherits :meth:`MoE.forward` (router, combine, auxiliary losses)
and overrides only :meth:`MoE.dispatch`: the all-to-all is the one collective in the
autograd graph.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn

from .moe import MoE, swiglu_experts

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


class ExpertParallelMoE(MoE, _DeepSpeedMoE):
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
        self.router, self.shared, self.shared_gate = moe.router, moe.shared, moe.shared_gate
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

    def dispatch(self, x_TD: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        """Rows sorted by global expert go to the rank that owns their expert (one
        variable-split all-to-all), run there grouped by local expert, and come back."""
        P, El = self.ep_size, self.num_local_experts
        send_PE = counts_E.view(P, El)
        recv_PE = torch.empty_like(send_PE)
        dist.all_to_all_single(recv_PE, send_PE.contiguous(), group=self.ep_group)  # [source, local expert]
        in_splits, out_splits = send_PE.sum(1).tolist(), recv_PE.sum(1).tolist()
        x_recv = _AllToAll.apply(x_TD, out_splits, in_splits, self.ep_group)  # rows by (source, expert)
        expert_of_row = torch.repeat_interleave(torch.arange(El, device=x_TD.device).repeat(P), recv_PE.reshape(-1))
        perm = torch.argsort(expert_of_row, stable=True)  # -> rows by (expert, source)
        yl = swiglu_experts(x_recv[perm], *self.local_weights(), recv_PE.sum(0))
        y_recv = yl[torch.argsort(perm)]
        return _AllToAll.apply(y_recv, in_splits, out_splits, self.ep_group)

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
    """Swap every :class:`conceptvlm.moe.MoE` for an :class:`ExpertParallelMoE` when
    ``ep_size > 1``; returns how many.

    Needs ``torch.distributed`` initialised when the world has more than one rank.
    """
    if ep_size == 1:  # data parallelism alone: MoE's own forward already is exact
        return 0
    n = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is MoE:
                setattr(parent, name, ExpertParallelMoE(child, ep_size))
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


__all__ = ["ExpertParallelMoE", "parallelize_moe", "ensure_expert_groups", "full_state_dict", "group_name"]
