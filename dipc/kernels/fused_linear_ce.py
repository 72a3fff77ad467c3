"""Chunked fused linear + cross-entropy: ``F.cross_entropy(x @ W.T + b, target)`` without ever
holding the full ``[tokens, vocab]`` logits.

The rows are processed in chunks. Per chunk: a torch matmul gives the chunk's logits; the Triton
kernel computes each row's log-sum-exp and loss and overwrites the logits *in place* with their
gradient ``(softmax - onehot) * scale``; two more matmuls turn that into the chunk's ``dx`` and
accumulate ``dW`` (fp32). The gradients are computed in the forward (the loss is a scalar), and
the backward only scales them by the incoming gradient — Liger-Kernel's design. Peak extra memory
is one chunk of logits plus ``dW`` in fp32, instead of two full logits tensors.

Supported: ``reduction`` ``"mean"`` (over non-ignored targets) and ``"sum"``, ``ignore_index``,
optional bias. Not handled (falls back to unfused torch): ``reduction="none"``, label smoothing,
class weights, fp64, and targets whose count does not match the rows of ``x``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ._common import (
    HAS_TRITON,
    INTERPRET,
    KernelInputError,
    check_inputs,
    next_pow2,
    record_path,
    tl,
    triton,
    triton_usable,
)

__all__ = [
    "FusedLinearCrossEntropyFunction",
    "fused_linear_cross_entropy",
    "linear_cross_entropy_reference",
    "supports_fused_linear_cross_entropy",
]

if HAS_TRITON:

    @triton.jit
    def _ce_fwd_bwd_kernel(LOGITS, TARGET, LOSS, n_cols, ignore_index, scale,
                           BLOCK_V: tl.constexpr):
        """One row: loss = lse - logit[target]; logits row <- (softmax - onehot) * scale."""
        row = tl.program_id(0).to(tl.int64)
        base = LOGITS + row * n_cols
        target = tl.load(TARGET + row)
        cols = tl.arange(0, BLOCK_V)
        # running max starts finite so no lane ever computes (-inf) - (-inf)
        m = tl.full([BLOCK_V], -1.0e30, dtype=tl.float32)
        s = tl.zeros([BLOCK_V], dtype=tl.float32)
        for off in range(0, n_cols, BLOCK_V):  # pass 1: online max / sum of exp, per lane
            v = tl.load(base + off + cols, mask=off + cols < n_cols, other=float("-inf")).to(tl.float32)
            m_new = tl.maximum(m, v)
            s = s * tl.exp(m - m_new) + tl.exp(v - m_new)
            m = m_new
        m_row = tl.max(m, axis=0)
        s_row = tl.sum(s * tl.exp(m - m_row), axis=0)
        lse = m_row + tl.log(s_row)
        ignored = target == ignore_index
        safe_target = tl.where(ignored, 0, target)
        target_logit = tl.load(base + safe_target).to(tl.float32)
        tl.store(LOSS + row, tl.where(ignored, 0.0, lse - target_logit))
        row_scale = tl.where(ignored, 0.0, scale)
        for off in range(0, n_cols, BLOCK_V):  # pass 2: gradient in place
            idx = off + cols
            cmask = idx < n_cols
            v = tl.load(base + idx, mask=cmask, other=0.0).to(tl.float32)
            g = (tl.exp(v - lse) - tl.where(idx == safe_target, 1.0, 0.0)) * row_scale
            tl.store(base + idx, g.to(LOGITS.dtype.element_ty), mask=cmask)


def linear_cross_entropy_reference(x, weight, target, bias=None, ignore_index: int = -100,
                                   reduction: str = "mean") -> torch.Tensor:
    logits = F.linear(x.reshape(-1, x.shape[-1]), weight, bias)
    return F.cross_entropy(logits.float(), target.reshape(-1), ignore_index=ignore_index, reduction=reduction)


def _default_chunk(n_rows: int, vocab: int, hidden: int) -> int:
    # a chunk of logits about the size of x itself (Liger's heuristic)
    return max(1, min(n_rows, next_pow2(triton.cdiv(n_rows, triton.cdiv(vocab, hidden)))))


class FusedLinearCrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, target, ignore_index, reduction, chunk_size):
        n_rows, hidden = x.shape
        vocab = weight.shape[0]
        need_dx, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_db = bias is not None and ctx.needs_input_grad[2]
        target = target.contiguous()
        n_valid = int((target != ignore_index).sum()) if reduction == "mean" else 1
        scale = 1.0 / n_valid if n_valid > 0 else float("inf")
        loss_rows = torch.empty(n_rows, dtype=torch.float32, device=x.device)
        dx = torch.empty_like(x) if need_dx else None
        dw = torch.zeros(vocab, hidden, dtype=torch.float32, device=x.device) if need_dw else None
        db = torch.zeros(vocab, dtype=torch.float32, device=x.device) if need_db else None
        chunk = chunk_size or _default_chunk(n_rows, vocab, hidden)
        block_v = min(next_pow2(vocab), 32768 if INTERPRET else 4096)
        for start in range(0, n_rows, chunk):
            end = min(start + chunk, n_rows)
            xc = x[start:end]
            logits = F.linear(xc, weight, bias).contiguous()
            _ce_fwd_bwd_kernel[(end - start,)](logits, target[start:end], loss_rows[start:end], vocab,
                                               ignore_index, scale, BLOCK_V=block_v)
            if need_dx:
                torch.matmul(logits, weight, out=dx[start:end])
            if need_dw:
                dw += (logits.t() @ xc).float()
            if need_db:
                db += logits.float().sum(0)
        loss = loss_rows.sum() * (scale if reduction == "mean" else 1.0)
        ctx.save_for_backward(dx, dw, db)
        ctx.w_dtype = weight.dtype
        ctx.b_dtype = bias.dtype if bias is not None else None
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        dx, dw, db = ctx.saved_tensors
        g = grad_loss.float()
        out_dx = (dx * g.to(dx.dtype)) if dx is not None else None
        out_dw = (dw * g).to(ctx.w_dtype) if dw is not None else None
        out_db = (db * g).to(ctx.b_dtype) if db is not None else None
        return out_dx, out_dw, out_db, None, None, None, None


def supports_fused_linear_cross_entropy(x, weight, target, bias=None, reduction="mean") -> bool:
    return (
        triton_usable(x, weight, bias)
        and reduction in ("mean", "sum")
        and x.dtype == weight.dtype and (bias is None or bias.dtype == x.dtype)
        and weight.dim() == 2 and x.shape[-1] == weight.shape[1]
        and target.numel() * x.shape[-1] == x.numel()
        and target.numel() > 0
        and not target.is_floating_point()
    )


def fused_linear_cross_entropy(x: torch.Tensor, weight: torch.Tensor, target: torch.Tensor,
                               bias: torch.Tensor | None = None, ignore_index: int = -100,
                               reduction: str = "mean", chunk_size: int | None = None) -> torch.Tensor:
    """``F.cross_entropy(F.linear(x, weight, bias).float(), target)`` over the rows of ``x``
    (``x`` is ``[..., D]``, ``target`` has one class index per row), chunked and fused.

    >>> loss = fused_linear_cross_entropy(torch.randn(6, 8), torch.randn(11, 8), torch.arange(6))
    """
    check_inputs("fused_linear_cross_entropy", ("x", x), ("weight", weight), ("bias", bias))
    if target.device != x.device:
        raise KernelInputError(f"fused_linear_cross_entropy: target is on {target.device} but x is on "
                               f"{x.device}. Fix: move target to x's device.")
    if weight.dim() != 2 or x.shape[-1] != weight.shape[1]:
        raise KernelInputError(f"fused_linear_cross_entropy: x has last dim {x.shape[-1]} but weight has "
                               f"shape {tuple(weight.shape)}. Fix: weight must be [vocab, {x.shape[-1]}].")
    if target.numel() * x.shape[-1] != x.numel():
        raise KernelInputError(f"fused_linear_cross_entropy: {target.numel()} targets for "
                               f"{x.numel() // max(1, x.shape[-1])} rows. Fix: one target per row of x.")
    if chunk_size is not None and chunk_size < 1:
        raise KernelInputError(f"fused_linear_cross_entropy: chunk_size={chunk_size}. Fix: use >= 1 or None.")
    if supports_fused_linear_cross_entropy(x, weight, target, bias, reduction):
        record_path("fused_linear_cross_entropy", "triton")
        x2 = x.reshape(-1, x.shape[-1]).contiguous()
        return FusedLinearCrossEntropyFunction.apply(x2, weight, bias, target.reshape(-1), int(ignore_index),
                                                     reduction, chunk_size)
    record_path("fused_linear_cross_entropy", "torch")
    return linear_cross_entropy_reference(x, weight, target, bias, ignore_index, reduction)
