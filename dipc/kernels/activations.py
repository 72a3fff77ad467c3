"""Fused MLP activations: SwiGLU (``silu(gate) * up``, LLaMA MLPs) and GELU (exact erf or tanh
approximation, ViT/Whisper/DiT MLPs).

Each op: one elementwise ``_fwd`` and one ``_bwd`` jit kernel over the flattened tensors → host
launcher → a ``dipc::`` custom op with autograd. The forward saves only its inputs and the
backward recomputes the activation (Liger-Kernel's trade: no saved intermediate, one extra cheap
recompute), so the fused SwiGLU keeps one ``[.., hidden]`` tensor less alive than eager torch.

Not handled by the kernel (falls back to torch): broadcasting between ``gate`` and ``up``, fp64.
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
    record_path,
    tl,
    triton,
    triton_usable,
)

__all__ = [
    "gelu",
    "gelu_backward_op",
    "gelu_op",
    "gelu_reference",
    "supports_gelu",
    "supports_swiglu",
    "swiglu",
    "swiglu_backward_op",
    "swiglu_op",
    "swiglu_reference",
]



def _ew_launch(n: int) -> tuple[tuple[int], dict[str, int]]:
    """Grid and launch options of an elementwise kernel over ``n`` elements."""
    if INTERPRET:
        return (triton.cdiv(n, 16384),), dict(BLOCK=16384)
    block = LAUNCH["ew_block"]
    return (triton.cdiv(n, block),), dict(BLOCK=block, num_warps=LAUNCH["ew_warps"])


_SQRT_2_OVER_PI = 0.7978845608028654
_INV_SQRT_2 = 0.7071067811865476
_INV_SQRT_2PI = 0.3989422804014327

if HAS_TRITON:

    @triton.jit
    def _swiglu_fwd_kernel(A, B, C, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        a = tl.load(A + offs, mask=mask, other=0.0).to(tl.float32)
        b = tl.load(B + offs, mask=mask, other=0.0).to(tl.float32)
        c = a * tl.sigmoid(a) * b
        tl.store(C + offs, c.to(C.dtype.element_ty), mask=mask)

    @triton.jit
    def _swiglu_bwd_kernel(DC, A, B, DA, DB, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        dc = tl.load(DC + offs, mask=mask, other=0.0).to(tl.float32)
        a = tl.load(A + offs, mask=mask, other=0.0).to(tl.float32)
        b = tl.load(B + offs, mask=mask, other=0.0).to(tl.float32)
        sig = tl.sigmoid(a)
        silu = a * sig
        da = dc * b * sig * (1.0 + a * (1.0 - sig))
        tl.store(DA + offs, da.to(DA.dtype.element_ty), mask=mask)
        tl.store(DB + offs, (dc * silu).to(DB.dtype.element_ty), mask=mask)

    @triton.jit
    def _gelu_fwd_kernel(X, Y, n, TANH: tl.constexpr, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
        if TANH:
            inner = 0.7978845608028654 * (x + 0.044715 * x * x * x)
            inner = tl.minimum(tl.maximum(inner, -20.0), 20.0)  # tanh(+-20) == +-1 in fp32
            t = 2.0 * tl.sigmoid(2.0 * inner) - 1.0  # tanh(inner)
            y = 0.5 * x * (1.0 + t)
        else:
            y = 0.5 * x * (1.0 + tl.math.erf(x * 0.7071067811865476))
        tl.store(Y + offs, y.to(Y.dtype.element_ty), mask=mask)

    @triton.jit
    def _gelu_bwd_kernel(DY, X, DX, n, TANH: tl.constexpr, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
        x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
        if TANH:
            inner = 0.7978845608028654 * (x + 0.044715 * x * x * x)
            inner = tl.minimum(tl.maximum(inner, -20.0), 20.0)  # tanh(+-20) == +-1 in fp32
            t = 2.0 * tl.sigmoid(2.0 * inner) - 1.0
            d_inner = 0.7978845608028654 * (1.0 + 3.0 * 0.044715 * x * x)
            grad = 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * d_inner
        else:
            cdf = 0.5 * (1.0 + tl.math.erf(x * 0.7071067811865476))
            pdf = 0.3989422804014327 * tl.exp(-0.5 * x * x)
            grad = cdf + x * pdf
        tl.store(DX + offs, (dy * grad).to(DX.dtype.element_ty), mask=mask)


def _flat(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(-1)


def _like(t: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(t, memory_format=torch.contiguous_format)


# ---- the ops: one torch.ops.dipc node per direction (see rms_norm.py for why). The forwards save
# only their inputs; the backwards recompute the activation. ------------------------------------

@torch.library.custom_op("dipc::swiglu", mutates_args=())
def swiglu_op(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    a1, b1 = _flat(gate), _flat(up)
    c = torch.empty_like(a1)
    n = a1.numel()
    grid, opts = _ew_launch(n)
    _swiglu_fwd_kernel[grid](a1, b1, c, n, **opts)
    return c.view(gate.shape)


@swiglu_op.register_fake
def _(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return _like(gate)


@torch.library.custom_op("dipc::swiglu_backward", mutates_args=())
def swiglu_backward_op(dc: torch.Tensor, gate: torch.Tensor, up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    a1, b1 = _flat(gate), _flat(up)
    da, db = torch.empty_like(a1), torch.empty_like(b1)
    n = a1.numel()
    grid, opts = _ew_launch(n)
    _swiglu_bwd_kernel[grid](_flat(dc), a1, b1, da, db, n, **opts)
    return da.view(gate.shape), db.view(gate.shape)


@swiglu_backward_op.register_fake
def _(dc: torch.Tensor, gate: torch.Tensor, up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return _like(gate), _like(up)


def _swiglu_setup(ctx, inputs, output) -> None:
    ctx.save_for_backward(*inputs)


def _swiglu_backward(ctx, dc):
    gate, up = ctx.saved_tensors
    return torch.ops.dipc.swiglu_backward(dc, gate, up)


swiglu_op.register_autograd(_swiglu_backward, setup_context=_swiglu_setup)


@torch.library.custom_op("dipc::gelu", mutates_args=())
def gelu_op(x: torch.Tensor, tanh: bool) -> torch.Tensor:
    x1 = _flat(x)
    y = torch.empty_like(x1)
    n = x1.numel()
    grid, opts = _ew_launch(n)
    _gelu_fwd_kernel[grid](x1, y, n, TANH=tanh, **opts)
    return y.view(x.shape)


@gelu_op.register_fake
def _(x: torch.Tensor, tanh: bool) -> torch.Tensor:
    return _like(x)


@torch.library.custom_op("dipc::gelu_backward", mutates_args=())
def gelu_backward_op(dy: torch.Tensor, x: torch.Tensor, tanh: bool) -> torch.Tensor:
    x1 = _flat(x)
    dx = torch.empty_like(x1)
    n = x1.numel()
    grid, opts = _ew_launch(n)
    _gelu_bwd_kernel[grid](_flat(dy), x1, dx, n, TANH=tanh, **opts)
    return dx.view(x.shape)


@gelu_backward_op.register_fake
def _(dy: torch.Tensor, x: torch.Tensor, tanh: bool) -> torch.Tensor:
    return _like(x)


def _gelu_setup(ctx, inputs, output) -> None:
    x, tanh = inputs
    ctx.tanh = tanh
    ctx.save_for_backward(x)


def _gelu_backward(ctx, dy):
    (x,) = ctx.saved_tensors
    return torch.ops.dipc.gelu_backward(dy, x, ctx.tanh), None


gelu_op.register_autograd(_gelu_backward, setup_context=_gelu_setup)

# SEMU's cost entries: memory-bound, so no FLOPs are counted (as for the torch ops they replace);
# the bytes are the op's inputs and outputs, each moved once.
register_op_cost(torch.ops.dipc.swiglu, None)
register_op_cost(torch.ops.dipc.swiglu_backward, None)
register_op_cost(torch.ops.dipc.gelu, None)
register_op_cost(torch.ops.dipc.gelu_backward, None)


def swiglu_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


def gelu_reference(x: torch.Tensor, approximate: str = "none") -> torch.Tensor:
    return F.gelu(x, approximate=approximate)


def supports_swiglu(gate: torch.Tensor, up: torch.Tensor) -> bool:
    return (triton_usable(gate, up) and gate.shape == up.shape and gate.dtype == up.dtype
            and gate.numel() > 0)


def supports_gelu(x: torch.Tensor) -> bool:
    return triton_usable(x) and x.numel() > 0


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """Fused ``F.silu(gate) * up``.

    >>> c = swiglu(torch.randn(4, 8), torch.randn(4, 8))
    """
    check_inputs("swiglu", ("gate", gate), ("up", up))
    if supports_swiglu(gate, up):
        record_path("swiglu", "triton")
        return torch.ops.dipc.swiglu(gate, up)
    record_path("swiglu", "torch")
    return swiglu_reference(gate, up)


def gelu(x: torch.Tensor, approximate: str = "none") -> torch.Tensor:
    """Fused ``F.gelu(x, approximate=...)`` (``"none"`` = exact erf, ``"tanh"``).

    >>> y = gelu(torch.randn(4, 8), approximate="tanh")
    """
    if approximate not in ("none", "tanh"):
        raise KernelInputError(f"gelu: approximate={approximate!r}. Fix: use 'none' or 'tanh'.")
    check_inputs("gelu", ("x", x))
    if supports_gelu(x):
        record_path("gelu", "triton")
        return torch.ops.dipc.gelu(x, approximate == "tanh")
    record_path("gelu", "torch")
    return gelu_reference(x, approximate)
