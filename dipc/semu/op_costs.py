"""dipc's registry of what ops cost, for ops torch's FLOP counter does not know (custom ops such
as dipc's fused kernels, ``torch.ops.dipc.*``): a FLOP formula, or "memory only", and optionally a
bytes-moved formula. ``dipc.semu.symbolic`` reads it while tracing layers. It imports only torch,
so the kernels can register their entries without loading SEMU.
"""
from __future__ import annotations

from typing import Any, Callable

import torch

__all__ = ["register_op_cost"]

_OP_FLOPS: dict[Any, Callable[..., Any]] = {}       # op packet -> FLOP formula (FlopCounterMode's convention)
_NO_FLOPS: set[Any] = set()                         # op packets declared memory-only by the user
_OP_BYTES: dict[Any, Callable[..., Any]] = {}       # op packet -> bytes-moved formula (else inputs + outputs)


def register_op_cost(op: Any, flops: Callable[..., Any] | None, *,
                     bytes_moved: Callable[..., Any] | None = None) -> None:
    """Tell SEMU what an op costs: ``flops(*arg_shapes, out_shape=..., **kwargs) -> FLOPs`` in the
    convention of ``torch.utils.flop_counter.register_flop_formula`` (tensor arguments arrive as
    their shapes), or ``flops=None`` for an op that moves memory but does no FLOPs worth counting.
    ``bytes_moved(*args, out=..., **kwargs) -> bytes`` gets the (fake) tensors themselves and says
    what the op reads and writes in memory; without it SEMU counts every tensor argument and output
    once, which is right for an op that streams its inputs once (a fused norm) and too little for
    one that re-reads (a chunked matmul). Formulas see symbolic sizes (``SymInt``), so use
    ``torch.sym_min``/``//`` rather than Python branches on sizes.
    ``op`` is an op packet (``torch.ops.mylib.fused_mlp``). Registrations are dipc's own (torch's
    global flop registry is left alone) and apply to layers traced afterwards.

    Example::

        register_op_cost(torch.ops.mylib.fused_mlp,
                         lambda x, w1, w2, out_shape=None, **kw: 2 * x[0] * x[1] * w1[0] * 2)
    """
    if not isinstance(op, torch._ops.OpOverloadPacket):
        packet = getattr(op, "overloadpacket", None)
        if packet is None:
            raise TypeError(f"register_op_cost: expected an op packet such as torch.ops.aten.mm, got {op!r}. "
                            "Fix: pass torch.ops.<namespace>.<op>.")
        op = packet
    _OP_FLOPS.pop(op, None)
    _NO_FLOPS.discard(op)
    _OP_BYTES.pop(op, None)
    if flops is None:
        _NO_FLOPS.add(op)
    else:
        _OP_FLOPS[op] = flops
    if bytes_moved is not None:
        _OP_BYTES[op] = bytes_moved
