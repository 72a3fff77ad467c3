"""Chunked fused linear + cross-entropy: ``F.cross_entropy(x @ W.T + b, target)`` without ever
holding the full ``[tokens, vocab]`` logits.

The rows are processed in chunks. Per chunk: a torch matmul gives the chunk's logits; the Triton
kernel computes each row's log-sum-exp and loss and overwrites the logits *in place* with their
gradient ``(softmax - onehot) * scale``; two more matmuls turn that into the chunk's ``dx`` and
accumulate ``dW`` in place (``addmm_``, in the weight's dtype: the matmul accumulates in fp32 and
rounds once per chunk, as Liger-Kernel does by default). The gradients are computed in the forward
(the loss is a scalar), and the backward only scales them, in place, by the incoming gradient —
Liger-Kernel's design. Peak extra memory is one chunk of logits plus ``dW`` and ``dx``, instead of
two full logits tensors; the backward allocates nothing, so the op's graph can be backpropagated
through once (a second backward raises).

Measured on an H200 (bf16, 8192 tokens, D 4096, V 128256; ``benchmarks/kernels.py``): the first
version added ``(Gᵀx).float()`` to an fp32 ``dW`` per chunk, several passes over ``V·D`` per chunk
(~32 chunks), and took 138 ms and 5.1 GB against Liger's 54 ms and 1.1 GB.

Cost: SEMU's entry for the op counts ``2·N·D·V`` FLOPs per matmul (logits, ``dx``, ``dW``), all in
the forward, and the chunked traffic.

Supported: ``reduction`` ``"mean"`` (over non-ignored targets) and ``"sum"``, ``ignore_index``,
optional bias. Not handled (falls back to unfused torch): ``reduction="none"``, label smoothing,
class weights, fp64, and targets whose count does not match the rows of ``x``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from dipc.semu.op_costs import register_op_cost

from ._common import (
    HAS_TRITON,
    INTERPRET,
    LAUNCH,
    KernelInputError,
    check_inputs,
    is_traced,
    next_pow2,
    record_path,
    tl,
    triton,
    triton_usable,
)

__all__ = [
    "fused_linear_cross_entropy",
    "linear_cross_entropy_op",
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


def _forward_and_grads(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, target: torch.Tensor,
                       ignore_index: int, reduction: str, chunk_size: int | None, need_dx: bool, need_dw: bool,
                       need_db: bool) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None,
                                               torch.Tensor | None]:
    """The loss and the gradients of ``x``, ``weight``, ``bias`` (those asked for), chunk by chunk."""
    n_rows, hidden = x.shape
    vocab = weight.shape[0]
    target = target.contiguous()
    n_valid = int((target != ignore_index).sum()) if reduction == "mean" else 1
    scale = 1.0 / n_valid if n_valid > 0 else float("inf")
    loss_rows = torch.empty(n_rows, dtype=torch.float32, device=x.device)
    dx = torch.empty_like(x) if need_dx else None
    dw = torch.zeros(vocab, hidden, dtype=weight.dtype, device=x.device) if need_dw else None
    db = torch.zeros(vocab, dtype=torch.float32, device=x.device) if need_db else None
    chunk = chunk_size or _default_chunk(n_rows, vocab, hidden)
    block_v = min(next_pow2(vocab), 32768 if INTERPRET else LAUNCH["ce_block"])
    warps = {} if INTERPRET else dict(num_warps=min(LAUNCH["ce_warps"], max(4, block_v // 512)))
    for start in range(0, n_rows, chunk):
        end = min(start + chunk, n_rows)
        xc = x[start:end]
        logits = F.linear(xc, weight, bias).contiguous()
        _ce_fwd_bwd_kernel[(end - start,)](logits, target[start:end], loss_rows[start:end], vocab,
                                           ignore_index, scale, BLOCK_V=block_v, **warps)
        if dx is not None:
            torch.matmul(logits, weight, out=dx[start:end])
        if dw is not None:
            dw.addmm_(logits.t(), xc)
        if db is not None:
            db += logits.sum(0, dtype=torch.float32)
    loss = loss_rows.sum() * (scale if reduction == "mean" else 1.0)
    return loss, dx, dw, db


# ---- the op: one torch.ops.dipc node. The loss is a scalar, so the gradients are computed in the
# forward and kept for the backward, which only scales them: fake-tensor tracing (SEMU) sees that
# one node, its outputs (loss, dx, fp32 dW, fp32 db) and what autograd keeps, never full logits.
# Gradients not asked for come back as empty tensors (a custom op returns tensors only). ---------

@torch.library.custom_op("dipc::linear_cross_entropy", mutates_args=())
def linear_cross_entropy_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, target: torch.Tensor,
                            ignore_index: int, reduction: str, chunk_size: int | None, need_dx: bool,
                            need_dw: bool, need_db: bool
                            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(loss, dx, dweight, dbias)`` for ``x [rows, D]``; ``dweight`` in the weight's dtype, ``dbias``
    in fp32."""
    loss, dx, dw, db = _forward_and_grads(x, weight, bias, target, ignore_index, reduction, chunk_size,
                                          need_dx, need_dw, need_db)
    none = lambda dtype: x.new_empty(0, dtype=dtype)   # a distinct tensor each: outputs may not alias
    return (loss, dx if dx is not None else none(x.dtype), dw if dw is not None else none(weight.dtype),
            db if db is not None else none(torch.float32))


@linear_cross_entropy_op.register_fake
def _(x, weight, bias, target, ignore_index, reduction, chunk_size, need_dx, need_dw, need_db):
    f32 = dict(dtype=torch.float32)
    return (x.new_empty((), **f32), torch.empty_like(x) if need_dx else x.new_empty(0),
            weight.new_empty(weight.shape) if need_dw else weight.new_empty(0),
            weight.new_empty(weight.shape[:1], **f32) if need_db else x.new_empty(0, **f32))


def _setup(ctx, inputs, output) -> None:
    _, weight, bias, *_ = inputs
    _, dx, dw, db = output
    ctx.mark_non_differentiable(dx, dw, db)
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(dx, dw, db)
    ctx.dtypes = (weight.dtype, bias.dtype if bias is not None else None)
    ctx.applied = None


def _scaled(ctx, dx: torch.Tensor, dw: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``dx·g`` and ``dW·g`` without a copy of ``dW`` (the size of the weight) on the first backward.

    The first backward scales the kept gradients in place (skipped when ``g`` is 1, the usual
    ``loss.backward()``) and hands them out. A later backward through the same graph (the split
    backward's weight pass re-runs this node, with the same ``g``) gets the same tensors back; one
    with another ``g`` gets fresh tensors, so what an earlier backward handed out never changes."""
    if ctx.applied is None:
        ctx.applied = g.detach().clone()
        if is_traced(g) or not bool(g == 1):   # a fake g (SEMU's trace) has no value: cost the scaling
            # through .data: the saved tensors' version counters stay put, so a second backward
            # through this node can still unpack them
            dx.data.mul_(g.to(dx.dtype))
            dw.data.mul_(g.to(dw.dtype))
        return dx, dw
    if is_traced(g) or torch.equal(g, ctx.applied):
        return dx, dw
    if not bool(ctx.applied != 0):
        raise RuntimeError("fused_linear_cross_entropy: a second backward with another gradient after a first one "
                           "with gradient 0, which zeroed the kept gradients in place. Fix: backpropagate a "
                           "non-zero gradient first, or use the torch fallback (DIPC_DISABLE_TRITON=1).")
    factor = g / ctx.applied
    return dx * factor.to(dx.dtype), dw * factor.to(dw.dtype)


def _backward(ctx, grad_loss, *_unused):
    dx, dw, db = ctx.saved_tensors
    b_dtype = ctx.dtypes[1]
    g = grad_loss.float()
    need = ctx.needs_input_grad
    dx, dw = _scaled(ctx, dx, dw, g)
    out_dx = dx if need[0] and dx.numel() else None
    out_dw = dw if need[1] and dw.numel() else None
    out_db = (db * g).to(b_dtype) if need[2] and db.numel() else None
    return out_dx, out_dw, out_db, None, None, None, None, None, None, None


linear_cross_entropy_op.register_autograd(_backward, setup_context=_setup)


# ---- SEMU's cost entry -------------------------------------------------------------------------
# All the matmul work runs in the forward: logits, then dx = G·W and dW = Gᵀ·x from the gradient G
# that overwrites each chunk's logits; the backward only scales the kept gradients.

def _flops(x_shape, w_shape, bias_shape, target_shape, ignore_index, reduction, chunk_size, need_dx, need_dw,
           need_db, out_shape=None, **_: object):
    """``2·N·D·V`` for the logits, and as much again for each of ``dx`` and ``dW`` asked for."""
    rows, hidden = x_shape
    return 2 * rows * hidden * w_shape[0] * (1 + int(need_dx) + int(need_dw))


def _bytes_moved(x, weight, bias, target, ignore_index, reduction, chunk_size, need_dx, need_dw, need_db,
                 *, out=None, **_: object):
    """Memory traffic of :func:`_forward_and_grads`, summed over its chunks.

    Per row of logits (``V`` values of x's dtype): written by the matmul, read twice and
    rewritten by the kernel, then read once by each gradient matmul (``dx``, ``dW``, ``db``). Per
    chunk, ``W`` is read by each matmul and the fp32 ``dW`` accumulated (read, add, write). The
    default chunk holds about ``N·D/V`` rows, so the chunk count is taken as ``min(N, ceil(V/D))``
    (exact when ``N·D/V`` is a power of two, an upper bound otherwise)."""
    rows, hidden = x.shape
    vocab = weight.shape[0]
    e = x.element_size()
    if chunk_size:
        chunks = (rows + chunk_size - 1) // chunk_size
    else:
        chunks = torch.sym_min(rows, -(-vocab // hidden))
    logit_passes = 4 + int(need_dx) + int(need_dw) + int(need_db)
    total = rows * hidden * e * (1 + int(need_dx) + int(need_dw))           # x read, dx written, x re-read for dW
    total += rows * (vocab * e * logit_passes + target.element_size() + 4 + 4)  # logits, target, loss rows, sum
    total += chunks * vocab * hidden * e * (1 + int(need_dx))                # W per matmul per chunk
    if bias is not None:
        total += chunks * vocab * e
    if need_dw:   # zero-init, then per chunk an in-place addmm: dW read and written
        total += vocab * hidden * e + chunks * vocab * hidden * 2 * e
    if need_db:   # fp32 row sums of the chunk's gradient, added to the fp32 db
        total += vocab * 4 + chunks * vocab * 16
    return total


register_op_cost(torch.ops.dipc.linear_cross_entropy, _flops, bytes_moved=_bytes_moved)


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


def _check_targets(target: torch.Tensor, vocab: int, ignore_index: int) -> None:
    # the kernel reads logits[target] unchecked: an out-of-range class would read another row
    if is_traced(target):
        return
    bad = (target != ignore_index) & ((target < 0) | (target >= vocab))
    if bool(bad.any()):
        first = int(target[bad].reshape(-1)[0])
        raise KernelInputError(f"fused_linear_cross_entropy: target {first} is outside [0, {vocab}) and is not "
                               f"ignore_index={ignore_index}. Fix: targets must be class indices < vocab, "
                               "or ignore_index.")


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
        _check_targets(target, weight.shape[0], ignore_index)
        record_path("fused_linear_cross_entropy", "triton")
        x2 = x.reshape(-1, x.shape[-1]).contiguous()
        grad = torch.is_grad_enabled()
        return torch.ops.dipc.linear_cross_entropy(
            x2, weight, bias, target.reshape(-1), int(ignore_index), reduction, chunk_size,
            grad and x.requires_grad, grad and weight.requires_grad,
            grad and bias is not None and bias.requires_grad)[0]
    record_path("fused_linear_cross_entropy", "torch")
    return linear_cross_entropy_reference(x, weight, target, bias, ignore_index, reduction)
