"""Fused RMSNorm: ``y = weight * x / sqrt(mean(x**2, -1) + eps)`` computed in float32.

Three layers (as in Liger-Kernel): jit kernels → host launchers → the ``dipc::rms_norm`` custom
op (and its backward op, with autograd); plus ``rms_norm_reference``, the plain-torch definition
(LLaMA style) that is also the fallback. The forward saves only ``x`` and the per-row ``rstd``;
the backward recomputes ``x_hat``.
The weight gradient is reduced in two steps (per-program partial sums in fp32, then a torch sum)
so the backward is deterministic.

Not handled by the kernel (falls back to torch): rows wider than 65536, fp64, weights whose
dtype differs from the input's (the module handles that case by running the reference).
"""
from __future__ import annotations

import torch

from dipc.semu.op_costs import register_op_cost

from ._common import (
    HAS_TRITON,
    KernelInputError,
    check_inputs,
    next_pow2,
    num_persistent_programs,
    record_path,
    row_warps,
    rows_per_program,
    tl,
    triton,
    triton_usable,
)

__all__ = ["rms_norm", "rms_norm_backward_op", "rms_norm_op", "rms_norm_reference", "supports_rms_norm"]

_MAX_COLS = 65536

if HAS_TRITON:

    @triton.jit
    def _rms_norm_fwd_kernel(X, W, Y, RSTD, n_rows, n_cols, eps,
                             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = tl.arange(0, BLOCK_N)
        rmask = rows < n_rows
        cmask = cols < n_cols
        mask = rmask[:, None] & cmask[None, :]
        offs = rows.to(tl.int64)[:, None] * n_cols + cols[None, :]
        x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
        rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / n_cols + eps)
        w = tl.load(W + cols, mask=cmask, other=0.0).to(tl.float32)
        y = x * rstd[:, None] * w[None, :]
        tl.store(Y + offs, y.to(Y.dtype.element_ty), mask=mask)
        tl.store(RSTD + rows, rstd, mask=rmask)

    @triton.jit
    def _rms_norm_bwd_kernel(DY, X, W, RSTD, DX, DW_PART, n_rows, n_cols, num_tiles,
                             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        pid = tl.program_id(0)
        num_progs = tl.num_programs(0)
        cols = tl.arange(0, BLOCK_N)
        cmask = cols < n_cols
        w = tl.load(W + cols, mask=cmask, other=0.0).to(tl.float32)
        dw_acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        for tile in range(pid, num_tiles, num_progs):
            rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
            rmask = rows < n_rows
            mask = rmask[:, None] & cmask[None, :]
            offs = rows.to(tl.int64)[:, None] * n_cols + cols[None, :]
            x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
            dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
            rstd = tl.load(RSTD + rows, mask=rmask, other=0.0)
            x_hat = x * rstd[:, None]
            wdy = dy * w[None, :]
            c = tl.sum(x_hat * wdy, axis=1) / n_cols
            dx = (wdy - x_hat * c[:, None]) * rstd[:, None]
            tl.store(DX + offs, dx.to(DX.dtype.element_ty), mask=mask)
            dw_acc += tl.sum(dy * x_hat, axis=0)
        tl.store(DW_PART + pid * n_cols + cols, dw_acc, mask=cmask)


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """LLaMA RMSNorm in plain torch (the semantics every path must reproduce)."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def _fwd(x2: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    n_rows, n_cols = x2.shape
    block_n = next_pow2(n_cols)
    block_m = rows_per_program(block_n)
    y = torch.empty_like(x2)
    rstd = torch.empty(n_rows, dtype=torch.float32, device=x2.device)
    grid = (triton.cdiv(n_rows, block_m),)
    _rms_norm_fwd_kernel[grid](x2, weight, y, rstd, n_rows, n_cols, eps, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=row_warps(block_n))
    return y, rstd


def _bwd(dy2: torch.Tensor, x2: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor):
    n_rows, n_cols = x2.shape
    block_n = next_pow2(n_cols)
    block_m = rows_per_program(block_n)
    num_tiles = triton.cdiv(n_rows, block_m)
    num_progs = num_persistent_programs(num_tiles, x2.device)
    dx = torch.empty_like(x2)
    dw_part = torch.empty(num_progs, n_cols, dtype=torch.float32, device=x2.device)
    _rms_norm_bwd_kernel[(num_progs,)](dy2, x2, weight, rstd, dx, dw_part, n_rows, n_cols, num_tiles,
                                        BLOCK_M=block_m, BLOCK_N=block_n, num_warps=row_warps(block_n))
    return dx, dw_part.sum(0).to(weight.dtype)


# ---- the op: one torch.ops.dipc node per direction, so fake-tensor tracing (SEMU, torch.compile)
# sees the fused op, what it saves and what it moves, not the torch fallback's ops -------------

@torch.library.custom_op("dipc::rms_norm", mutates_args=())
def rms_norm_op(x: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(y, rstd)``: the normalised rows and their fp32 ``1/rms`` (kept for the backward)."""
    y, rstd = _fwd(x.reshape(-1, x.shape[-1]).contiguous(), weight.contiguous(), eps)
    return y.view(x.shape), rstd


@rms_norm_op.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.empty_like(x, memory_format=torch.contiguous_format), x.new_empty(x.numel() // x.shape[-1],
                                                                                   dtype=torch.float32)


@torch.library.custom_op("dipc::rms_norm_backward", mutates_args=())
def rms_norm_backward_op(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                         rstd: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(dx, dweight)`` in one kernel (so a zero-bubble W step has nothing left to run)."""
    x2 = x.reshape(-1, x.shape[-1]).contiguous()
    dx, dw = _bwd(dy.reshape(x2.shape).contiguous(), x2, weight.contiguous(), rstd)
    return dx.view(x.shape), dw


@rms_norm_backward_op.register_fake
def _(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
      rstd: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.empty_like(x, memory_format=torch.contiguous_format), torch.empty_like(weight)


def _setup(ctx, inputs, output) -> None:
    x, weight, _ = inputs
    _, rstd = output
    ctx.mark_non_differentiable(rstd)
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(x, weight, rstd)   # x itself (no copy) and rstd: what the kernel needs


def _backward(ctx, dy, _drstd):
    x, weight, rstd = ctx.saved_tensors
    dx, dw = torch.ops.dipc.rms_norm_backward(dy, x, weight, rstd)
    return dx, (dw if ctx.needs_input_grad[1] else None), None


rms_norm_op.register_autograd(_backward, setup_context=_setup)

# SEMU's cost entries: memory-bound, so no FLOPs are counted (as for the torch ops they replace);
# the bytes are the op's inputs and outputs, each moved once.
register_op_cost(torch.ops.dipc.rms_norm, None)
register_op_cost(torch.ops.dipc.rms_norm_backward, None)


def supports_rms_norm(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether the Triton kernel runs for these inputs (else :func:`rms_norm` uses torch)."""
    return (
        triton_usable(x, weight)
        and x.dtype == weight.dtype
        and weight.dim() == 1
        and x.shape[-1] == weight.shape[0]
        and 0 < x.shape[-1] <= _MAX_COLS
        and x.numel() > 0
    )


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Fused RMSNorm over the last dim; same result as :func:`rms_norm_reference`.

    >>> y = rms_norm(torch.randn(4, 8), torch.ones(8))
    """
    check_inputs("rms_norm", ("x", x), ("weight", weight))
    if weight.dim() != 1 or x.shape[-1] != weight.shape[0]:
        raise KernelInputError(f"rms_norm: x has last dim {x.shape[-1]} but weight has shape "
                               f"{tuple(weight.shape)}. Fix: weight must be 1-D of size x.shape[-1].")
    if supports_rms_norm(x, weight):
        record_path("rms_norm", "triton")
        return torch.ops.dipc.rms_norm(x, weight, float(eps))[0]
    record_path("rms_norm", "torch")
    return rms_norm_reference(x, weight, eps)

