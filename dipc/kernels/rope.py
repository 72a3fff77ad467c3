"""Fused rotary position embedding (HF "rotate_half" layout), including multi-axis RoPE.

``rope(x, cos, sin)`` computes ``x * cos + rotate_half(x) * sin`` for ``x`` of shape
``[..., H, T, D]`` and tables ``cos``/``sin`` of shape ``[..., T, D]`` broadcast over heads (the
example models' ``apply_rotary_pos_emb``). The kernel reads ``x`` through its strides, so the
usual ``q.transpose(1, 2)`` view is not copied, and reads the tables once per (sample, position)
whatever their leading broadcast. The backward is the same kernel with the rotation inverted.

Multi-axis RoPE (images: (row, col); video: (t, h, w); Qwen2-VL's M-RoPE) only changes the
*tables*: :func:`multi_axis_cos_sin` builds them from per-axis positions and a split of the
frequency bands over axes; the same fused kernel applies them.

Not handled by the kernel (falls back to torch): tables that need gradients, odd head dims,
tables whose leading dims do not broadcast to ``x``'s, fp64.
"""
from __future__ import annotations

from typing import Sequence

import torch

from dipc.semu.op_costs import register_op_cost

from ._common import (
    HAS_TRITON,
    INTERPRET,
    LAUNCH,
    KernelInputError,
    next_pow2,
    record_path,
    tl,
    triton,
    triton_usable,
)

__all__ = ["multi_axis_cos_sin", "rope", "rope_backward_op", "rope_op", "rope_reference", "supports_rope"]

if HAS_TRITON:

    @triton.jit
    def _rope_kernel(X, COS, SIN, Y, n_rows, n_heads, seq_len,
                     xs0, xs1, xs2, cs0, cs1, half,
                     BACKWARD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_H: tl.constexpr):
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = tl.arange(0, BLOCK_H)
        rmask = rows < n_rows
        mask = rmask[:, None] & (cols < half)[None, :]
        r = rows.to(tl.int64)
        s = r // (n_heads * seq_len)
        h = (r // seq_len) % n_heads
        t = r % seq_len
        x_off = (s * xs0 + h * xs1 + t * xs2)[:, None] + cols[None, :]
        c_off = (s * cs0 + t * cs1)[:, None] + cols[None, :]
        y_off = r[:, None] * (2 * half) + cols[None, :]
        x1 = tl.load(X + x_off, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(X + x_off + half, mask=mask, other=0.0).to(tl.float32)
        c1 = tl.load(COS + c_off, mask=mask, other=0.0).to(tl.float32)
        c2 = tl.load(COS + c_off + half, mask=mask, other=0.0).to(tl.float32)
        s1 = tl.load(SIN + c_off, mask=mask, other=0.0).to(tl.float32)
        s2 = tl.load(SIN + c_off + half, mask=mask, other=0.0).to(tl.float32)
        if BACKWARD:  # transpose of the rotation
            y1 = x1 * c1 + x2 * s2
            y2 = x2 * c2 - x1 * s1
        else:
            y1 = x1 * c1 - x2 * s1
            y2 = x2 * c2 + x1 * s2
        tl.store(Y + y_off, y1.to(Y.dtype.element_ty), mask=mask)
        tl.store(Y + y_off + half, y2.to(Y.dtype.element_ty), mask=mask)


def rope_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``x * cos + rotate_half(x) * sin`` with the tables broadcast over heads (dim -3)."""
    cos = cos.unsqueeze(-3).to(x.dtype)
    sin = sin.unsqueeze(-3).to(x.dtype)
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


def _launch(x4: torch.Tensor, cos3: torch.Tensor, sin3: torch.Tensor, backward: bool) -> torch.Tensor:
    n_lead, n_heads, seq_len, dim = x4.shape
    half = dim // 2
    y = torch.empty((n_lead, n_heads, seq_len, dim), dtype=x4.dtype, device=x4.device)
    n_rows = n_lead * n_heads * seq_len
    block_h = next_pow2(half)
    block_m = max(1, min(64 if INTERPRET else 16, (16384 if INTERPRET else LAUNCH["rope_rows"]) // block_h))
    warps = {} if INTERPRET else dict(num_warps=LAUNCH["rope_warps"])
    _rope_kernel[(triton.cdiv(n_rows, block_m),)](
        x4, cos3, sin3, y, n_rows, n_heads, seq_len,
        x4.stride(0), x4.stride(1), x4.stride(2), cos3.stride(0), cos3.stride(1), half,
        BACKWARD=backward, BLOCK_M=block_m, BLOCK_H=block_h, **warps)
    return y


def _as_4d(x: torch.Tensor) -> torch.Tensor:
    x4 = x.reshape(-1, *x.shape[-3:])
    return x4 if x4.stride(-1) == 1 else x4.contiguous()


def _tables(cos: torch.Tensor, sin: torch.Tensor, lead: torch.Size) -> tuple[torch.Tensor, torch.Tensor]:
    """The tables as ``[prod(lead), T, D]`` with unit stride on D (a view where broadcasting allows)."""
    seq_len, dim = cos.shape[-2:]
    cos3 = cos.expand(*lead, seq_len, dim).reshape(-1, seq_len, dim)
    sin3 = sin.expand(*lead, seq_len, dim).reshape(-1, seq_len, dim)
    if cos3.stride(-1) != 1 or cos3.stride(-2) != dim:
        cos3 = cos3.contiguous()
    if sin3.stride() != cos3.stride():
        sin3 = sin3.contiguous()
        cos3 = cos3.contiguous()
    return cos3, sin3


# ---- the op: one torch.ops.dipc node per direction (see rms_norm.py for why). The backward is
# the same kernel with the rotation inverted, so only the tables are kept. ----------------------

@torch.library.custom_op("dipc::rope", mutates_args=())
def rope_op(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    cos3, sin3 = _tables(cos, sin, x.shape[:-3])
    return _launch(_as_4d(x), cos3, sin3, backward=False).view(x.shape)


@rope_op.register_fake
def _(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.custom_op("dipc::rope_backward", mutates_args=())
def rope_backward_op(dy: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    cos3, sin3 = _tables(cos, sin, dy.shape[:-3])
    return _launch(_as_4d(dy), cos3, sin3, backward=True).view(dy.shape)


@rope_backward_op.register_fake
def _(dy: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(dy, memory_format=torch.contiguous_format)


def _setup(ctx, inputs, output) -> None:
    _, cos, sin = inputs
    ctx.save_for_backward(cos, sin)


def _backward(ctx, dy):
    cos, sin = ctx.saved_tensors
    return torch.ops.dipc.rope_backward(dy, cos, sin), None, None


rope_op.register_autograd(_backward, setup_context=_setup)

# SEMU's cost entries: memory-bound, so no FLOPs are counted (as for the torch ops they replace);
# the bytes are the op's inputs and outputs, each moved once.
register_op_cost(torch.ops.dipc.rope, None)
register_op_cost(torch.ops.dipc.rope_backward, None)


def supports_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> bool:
    if not triton_usable(x, cos, sin) or x.dim() < 3 or cos.dim() < 2 or cos.shape != sin.shape:
        return False
    if cos.requires_grad or sin.requires_grad or x.numel() == 0 or x.shape[-1] % 2:
        return False
    if cos.shape[-2:] != (x.shape[-2], x.shape[-1]):
        return False
    try:
        lead = torch.broadcast_shapes(x.shape[:-3], cos.shape[:-2])
    except RuntimeError:
        return False
    return lead == x.shape[:-3]


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Fused rotary embedding; same result as :func:`rope_reference`.

    >>> x = torch.randn(2, 4, 5, 8)                      # [batch, heads, tokens, head_dim]
    >>> cos, sin = torch.ones(5, 8), torch.zeros(5, 8)   # [tokens, head_dim]
    >>> torch.equal(rope(x, cos, sin), x)
    True
    """
    for name, t in (("cos", cos), ("sin", sin)):
        if t.device != x.device:
            raise KernelInputError(f"rope: {name} is on {t.device} but x is on {x.device}. "
                                   f"Fix: build the rotary tables on x's device.")
    if x.shape[-1] % 2:
        raise KernelInputError(f"rope: head dim {x.shape[-1]} is odd. Fix: rotary needs an even head dim.")
    if supports_rope(x, cos, sin):
        record_path("rope", "triton")
        return torch.ops.dipc.rope(x, cos, sin)
    record_path("rope", "torch")
    return rope_reference(x, cos, sin)


def multi_axis_cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor,
                       sections: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary tables for multi-axis positions (image rows/cols, video t/h/w, M-RoPE).

    ``positions``: int ``[..., T, num_axes]``; ``inv_freq``: ``[D/2]``; ``sections``: how many
    frequency bands each axis gets (``sum(sections) == D/2``). Band ``j`` of axis ``k`` rotates by
    ``positions[..., k] * inv_freq[j]``. Returns ``cos, sin`` of shape ``[..., T, D]`` in the
    rotate_half layout, ready for :func:`rope`. With one axis this is ordinary 1-D RoPE.
    """
    if sum(sections) != inv_freq.shape[-1] or len(sections) != positions.shape[-1]:
        raise KernelInputError(
            f"multi_axis_cos_sin: sections {list(sections)} must sum to {inv_freq.shape[-1]} bands and "
            f"have one entry per axis ({positions.shape[-1]}). Fix: split the D/2 bands over the axes.")
    axis_of_band = torch.repeat_interleave(
        torch.arange(len(sections), device=positions.device), torch.tensor(list(sections), device=positions.device))
    pos = positions.float()[..., axis_of_band]  # [..., T, D/2]: each band's own axis position
    freqs = pos * inv_freq.float()
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()
