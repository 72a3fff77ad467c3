"""Fused LayerNorm over the last dim (ViT / Whisper / DiT encoders), with optional weight and bias
(``nn.LayerNorm(elementwise_affine=False)`` in DiT blocks has neither).

jit kernels → host launchers → the ``dipc::layer_norm`` custom op (and its backward op);
``layer_norm_reference`` is ``F.layer_norm``. The forward saves ``x``, per-row ``mean`` and
``rstd``; the backward recomputes ``x_hat`` and reduces the weight/bias gradients through fp32 per-program partial sums.

Not handled by the kernel (falls back to torch): normalized shapes over more than the last dim,
rows wider than 65536, fp64, and parameter dtypes that differ from the input's.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

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

__all__ = ["layer_norm", "layer_norm_backward_op", "layer_norm_op", "layer_norm_reference",
           "supports_layer_norm"]

_MAX_COLS = 65536

if HAS_TRITON:

    @triton.jit
    def _layer_norm_fwd_kernel(X, W, B, Y, MEAN, RSTD, n_rows, n_cols, eps,
                               HAS_W: tl.constexpr, HAS_B: tl.constexpr,
                               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = tl.arange(0, BLOCK_N)
        rmask = rows < n_rows
        cmask = cols < n_cols
        mask = rmask[:, None] & cmask[None, :]
        offs = rows.to(tl.int64)[:, None] * n_cols + cols[None, :]
        x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
        mean = tl.sum(x, axis=1) / n_cols
        xc = tl.where(mask, x - mean[:, None], 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, axis=1) / n_cols + eps)
        y = xc * rstd[:, None]
        if HAS_W:
            y = y * tl.load(W + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
        if HAS_B:
            y = y + tl.load(B + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
        tl.store(Y + offs, y.to(Y.dtype.element_ty), mask=mask)
        tl.store(MEAN + rows, mean, mask=rmask)
        tl.store(RSTD + rows, rstd, mask=rmask)

    @triton.jit
    def _layer_norm_bwd_kernel(DY, X, W, MEAN, RSTD, DX, DW_PART, DB_PART, n_rows, n_cols, num_tiles,
                               HAS_W: tl.constexpr, HAS_B: tl.constexpr,
                               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        pid = tl.program_id(0)
        num_progs = tl.num_programs(0)
        cols = tl.arange(0, BLOCK_N)
        cmask = cols < n_cols
        if HAS_W:
            w = tl.load(W + cols, mask=cmask, other=0.0).to(tl.float32)
        dw_acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        db_acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        for tile in range(pid, num_tiles, num_progs):
            rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
            rmask = rows < n_rows
            mask = rmask[:, None] & cmask[None, :]
            offs = rows.to(tl.int64)[:, None] * n_cols + cols[None, :]
            x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
            dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
            mean = tl.load(MEAN + rows, mask=rmask, other=0.0)
            rstd = tl.load(RSTD + rows, mask=rmask, other=0.0)
            x_hat = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
            if HAS_W:
                wdy = dy * w[None, :]
            else:
                wdy = dy
            c1 = tl.sum(x_hat * wdy, axis=1) / n_cols
            c2 = tl.sum(wdy, axis=1) / n_cols
            dx = (wdy - (x_hat * c1[:, None] + c2[:, None])) * rstd[:, None]
            tl.store(DX + offs, dx.to(DX.dtype.element_ty), mask=mask)
            dw_acc += tl.sum(dy * x_hat, axis=0)
            db_acc += tl.sum(dy, axis=0)
        if HAS_W:
            tl.store(DW_PART + pid * n_cols + cols, dw_acc, mask=cmask)
        if HAS_B:
            tl.store(DB_PART + pid * n_cols + cols, db_acc, mask=cmask)


def layer_norm_reference(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                         eps: float) -> torch.Tensor:
    return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)


def _fwd(x2: torch.Tensor, w: torch.Tensor | None, b: torch.Tensor | None,
         eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    n_rows, n_cols = x2.shape
    block_n = next_pow2(n_cols)
    block_m = rows_per_program(block_n)
    y = torch.empty_like(x2)
    mean = torch.empty(n_rows, dtype=torch.float32, device=x2.device)
    rstd = torch.empty_like(mean)
    _layer_norm_fwd_kernel[(triton.cdiv(n_rows, block_m),)](
        x2, w if w is not None else x2, b if b is not None else x2, y, mean, rstd, n_rows, n_cols, eps,
        HAS_W=w is not None, HAS_B=b is not None, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=row_warps(block_n))
    return y, mean, rstd


def _bwd(dy2: torch.Tensor, x2: torch.Tensor, w: torch.Tensor | None, mean: torch.Tensor, rstd: torch.Tensor,
         has_b: bool) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    n_rows, n_cols = x2.shape
    block_n = next_pow2(n_cols)
    block_m = rows_per_program(block_n)
    num_tiles = triton.cdiv(n_rows, block_m)
    num_progs = num_persistent_programs(num_tiles, x2.device)
    dx = torch.empty_like(x2)
    dw_part = torch.empty(num_progs, n_cols, dtype=torch.float32, device=x2.device)
    db_part = torch.empty_like(dw_part) if has_b else dw_part
    _layer_norm_bwd_kernel[(num_progs,)](
        dy2, x2, w if w is not None else x2, mean, rstd, dx, dw_part, db_part,
        n_rows, n_cols, num_tiles, HAS_W=w is not None, HAS_B=has_b, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=row_warps(block_n))
    dw = dw_part.sum(0).to(w.dtype) if w is not None else None
    db = db_part.sum(0).to(x2.dtype) if has_b else None
    return dx, dw, db


# ---- the op: one torch.ops.dipc node per direction (see rms_norm.py for why) ------------------
# Absent weight/bias gradients are returned as empty tensors (a custom op returns tensors only).

@torch.library.custom_op("dipc::layer_norm", mutates_args=())
def layer_norm_op(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                  eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(y, mean, rstd)``; ``mean`` and ``rstd`` are fp32 per row, kept for the backward."""
    y, mean, rstd = _fwd(x.reshape(-1, x.shape[-1]).contiguous(),
                         weight.contiguous() if weight is not None else None,
                         bias.contiguous() if bias is not None else None, eps)
    return y.view(x.shape), mean, rstd


@layer_norm_op.register_fake
def _(x, weight, bias, eps):
    rows = x.numel() // x.shape[-1]
    return (torch.empty_like(x, memory_format=torch.contiguous_format),
            x.new_empty(rows, dtype=torch.float32), x.new_empty(rows, dtype=torch.float32))


@torch.library.custom_op("dipc::layer_norm_backward", mutates_args=())
def layer_norm_backward_op(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor | None, mean: torch.Tensor,
                           rstd: torch.Tensor, has_bias: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dx, dweight, dbias)`` in one kernel; empty where there is no weight / bias."""
    x2 = x.reshape(-1, x.shape[-1]).contiguous()
    dx, dw, db = _bwd(dy.reshape(x2.shape).contiguous(), x2, weight.contiguous() if weight is not None else None,
                      mean, rstd, has_bias)
    return dx.view(x.shape), (dw if dw is not None else x.new_empty(0)), (db if db is not None else x.new_empty(0))


@layer_norm_backward_op.register_fake
def _(dy, x, weight, mean, rstd, has_bias):
    n = x.shape[-1]
    return (torch.empty_like(x, memory_format=torch.contiguous_format),
            torch.empty_like(weight) if weight is not None else x.new_empty(0),
            x.new_empty(n) if has_bias else x.new_empty(0))


def _setup(ctx, inputs, output) -> None:
    x, weight, bias, _ = inputs
    _, mean, rstd = output
    ctx.mark_non_differentiable(mean, rstd)
    ctx.set_materialize_grads(False)
    ctx.has_bias = bias is not None
    ctx.save_for_backward(x, weight, mean, rstd)


def _backward(ctx, dy, _dmean, _drstd):
    x, weight, mean, rstd = ctx.saved_tensors
    dx, dw, db = torch.ops.dipc.layer_norm_backward(dy, x, weight, mean, rstd, ctx.has_bias)
    return (dx, dw if weight is not None and ctx.needs_input_grad[1] else None,
            db if ctx.has_bias and ctx.needs_input_grad[2] else None, None)


layer_norm_op.register_autograd(_backward, setup_context=_setup)

# SEMU's cost entries: memory-bound, so no FLOPs are counted (as for the torch ops they replace);
# the bytes are the op's inputs and outputs, each moved once.
register_op_cost(torch.ops.dipc.layer_norm, None)
register_op_cost(torch.ops.dipc.layer_norm_backward, None)


def supports_layer_norm(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None) -> bool:
    n = x.shape[-1] if x.dim() else 0
    return (
        triton_usable(x, weight, bias)
        and all(p is None or (p.dtype == x.dtype and p.shape == (n,)) for p in (weight, bias))
        and 0 < n <= _MAX_COLS
        and x.numel() > 0
    )


def layer_norm(x: torch.Tensor, weight: torch.Tensor | None = None, bias: torch.Tensor | None = None,
               eps: float = 1e-5) -> torch.Tensor:
    """Fused ``F.layer_norm(x, (x.shape[-1],), weight, bias, eps)``.

    >>> y = layer_norm(torch.randn(4, 8), torch.ones(8), torch.zeros(8))
    """
    check_inputs("layer_norm", ("x", x), ("weight", weight), ("bias", bias))
    for name, p in (("weight", weight), ("bias", bias)):
        if p is not None and tuple(p.shape) != (x.shape[-1],):
            raise KernelInputError(f"layer_norm: {name} has shape {tuple(p.shape)} but x has last dim "
                                   f"{x.shape[-1]}. Fix: {name} must be 1-D of size x.shape[-1].")
    if supports_layer_norm(x, weight, bias):
        record_path("layer_norm", "triton")
        return torch.ops.dipc.layer_norm(x, weight, bias, float(eps))[0]
    record_path("layer_norm", "torch")
    return layer_norm_reference(x, weight, bias, eps)
