"""The grouped matmul of the MoE experts, eager and as a traceable custom op.

``F.grouped_mm`` runs float32 on CPU and bf16 on GPU in eager mode, but its fake-tensor
(meta) kernel accepts only bf16/fp16, so ``torch.compile`` cannot trace it in float32.
:func:`grouped_mm` wraps it in a ``torch.library.custom_op`` (opaque to the compiler,
shapes from ``register_fake``) with its backward written as two more grouped matmuls:

    y_e  = x_e W_e          (rows of group e)
    dx_e = dy_e W_e^T       -> grouped_mm(dy, W^T, offs)
    dW_e = x_e^T dy_e       -> grouped over the token dimension: grouped_mm(x^T, dy, offs)

Where the kernel cannot run (float64, unaligned widths, no rows) the same groups are
multiplied one at a time.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def grouped_mm_usable(x: torch.Tensor, *ws: torch.Tensor) -> bool:
    """Whether ``F.grouped_mm`` runs for these operands (dtype per device, 16-byte rows, some rows)."""
    if not hasattr(F, "grouped_mm"):
        return False
    if x.device.type == "cpu":
        ok_dtype = x.dtype == torch.float32
    else:
        ok_dtype = x.dtype == torch.bfloat16
    # 16-byte aligned row strides are required by the kernel.
    per16 = 16 // x.element_size()
    return ok_dtype and x.shape[0] > 0 and all(w.shape[-1] % per16 == 0 and w.shape[-2] % per16 == 0 for w in ws)


def grouped_mm_loop(x_TD: torch.Tensor, w_EDH: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """Row group e (``counts[e]`` rows) times ``w_EDH[e]``, one expert at a time."""
    chunks = torch.split(x_TD, counts)
    return torch.cat([c @ w_EDH[e] for e, c in enumerate(chunks)], dim=0)


def _counts(offsets_E: torch.Tensor) -> list[int]:
    return torch.diff(offsets_E.long(), prepend=offsets_E.new_zeros(1, dtype=torch.long)).tolist()


@torch.library.custom_op("conceptvlm::grouped_mm", mutates_args=())
def grouped_mm(x_TD: torch.Tensor, w_EDH: torch.Tensor, offsets_E: torch.Tensor) -> torch.Tensor:
    """``x`` row group e (rows ``offsets[e-1]:offsets[e]``) @ ``w_EDH[e]`` -> ``[T, H]``."""
    if grouped_mm_usable(x_TD, w_EDH):
        return F.grouped_mm(x_TD, w_EDH, offs=offsets_E)
    return grouped_mm_loop(x_TD, w_EDH, _counts(offsets_E))


@grouped_mm.register_fake
def _(x_TD, w_EDH, offsets_E):
    return x_TD.new_empty(x_TD.shape[0], w_EDH.shape[-1])


@torch.library.custom_op("conceptvlm::grouped_mm_weight_grad", mutates_args=())
def grouped_mm_weight_grad(x_TD: torch.Tensor, dy_TH: torch.Tensor, offsets_E: torch.Tensor) -> torch.Tensor:
    """``dW_e = x_e^T dy_e`` for every row group: ``[E, D, H]``."""
    if grouped_mm_usable(x_TD, dy_TH):
        return F.grouped_mm(x_TD.t(), dy_TH, offs=offsets_E)
    counts = _counts(offsets_E)
    return torch.stack([a.t() @ b for a, b in zip(torch.split(x_TD, counts), torch.split(dy_TH, counts))])


@grouped_mm_weight_grad.register_fake
def _(x_TD, dy_TH, offsets_E):
    return x_TD.new_empty(offsets_E.shape[0], x_TD.shape[1], dy_TH.shape[1])


def _setup_context(ctx, inputs, output):
    x_TD, w_EDH, offsets_E = inputs
    ctx.save_for_backward(x_TD, w_EDH, offsets_E)


def _backward(ctx, dy_TH):
    x_TD, w_EDH, offsets_E = ctx.saved_tensors
    dy_TH = dy_TH.contiguous()  # a sum's gradient arrives expanded (stride 0): the kernel rejects it
    dx = grouped_mm(dy_TH, w_EDH.transpose(-1, -2), offsets_E) if ctx.needs_input_grad[0] else None
    dw = grouped_mm_weight_grad(x_TD, dy_TH, offsets_E) if ctx.needs_input_grad[1] else None
    return dx, dw, None


grouped_mm.register_autograd(_backward, setup_context=_setup_context)

__all__ = ["grouped_mm", "grouped_mm_weight_grad", "grouped_mm_usable", "grouped_mm_loop"]
