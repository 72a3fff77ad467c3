"""When a rank posts its receives: a pure function of its instruction stream, shared by the runtime
(:mod:`dipc.runtime.interpreter` posts them, :mod:`dipc.runtime.transport` chooses the policy)
and the emulator (:func:`dipc.semu.emulator.simulate` starts a rendezvous transfer once the
receive is posted), so that SEMU plays the handshake the way the runtime runs it."""
from __future__ import annotations

from typing import Sequence

from dipc.ir.instructions import COMPUTE_OPS, RECV_OPS, SEND_OPS, Instruction

__all__ = ["GLOO_RECV_LOOKAHEAD", "receives_ahead"]

# gloo: receives posted 3 computes ahead (the runtime's DistributedTransport, and SEMU's gloo
# model). Measured (benchmarks/runtime_vs_torch_pipelining.py, static interleaved 1F1B, 2 gloo
# ranks, 30 steps per run, dipc / torch.distributed.pipelining): look-ahead 1 gave 0.91-1.00x
# over five runs, 2 gave 1.01-1.04x, 3 gave 1.03-1.05x, 8 gave 1.00-1.06x.
GLOO_RECV_LOOKAHEAD = 3


def receives_ahead(stream: Sequence[Instruction], lookahead: int = 1,
                   peer_ordered: bool = False) -> dict[int, list[Instruction]]:
    """pc -> the receives to post before running ``stream[pc]``, in stream order.

    A receive is posted ``lookahead`` compute instructions early: before the ``lookahead``-th
    compute that precedes it (at pc 0 when fewer precede it), so its data can land while those
    compute. ``lookahead=1`` posts every receive between two computes at the first of them; more
    keeps more receive buffers alive at once (at most what the next ``lookahead`` computes
    consume), and on gloo, whose sender moves a payload only once the receive is posted, it
    takes the handshake off the critical path when a peer runs a compute or two ahead.

    ``peer_ordered``: never post a receive from a peer before a send to that peer that comes
    earlier in the stream (kept on NCCL, where it was first needed: with one process group a rank
    pair's sends and receives share one ordered stream, and a receive posted ahead of a send on
    both sides of a pair waits forever for a send queued behind it). The transport now gives each
    message direction a process group of its own on NCCL, which removes that hazard and the worse
    one, sends crossing in 1F1B's steady state (:mod:`dipc.ir.stream_order` models both; no
    multi-GPU NCCL run has tested either). gloo progresses each message on its own.

    A receive with nothing to post it ahead of is listed at its own pc, so that every receive of a
    peer is posted in program order (one left to its own instruction could follow a later one
    listed at an earlier pc)."""
    if lookahead < 1:
        raise ValueError(f"lookahead={lookahead}. Fix: post receives at least 1 compute instruction ahead.")
    out: dict[int, list[Instruction]] = {}
    computes: list[int] = []          # pcs of the computes seen so far
    after_send: dict[int, int] = {}   # peer -> pc just after the latest send to it
    for pc, instr in enumerate(stream):
        op = instr.op
        if op in COMPUTE_OPS:
            computes.append(pc)
        elif op in SEND_OPS:
            after_send[instr.peer] = pc + 1
        elif op in RECV_OPS:
            at = computes[-lookahead] if len(computes) >= lookahead else 0
            if peer_ordered:
                at = max(at, after_send.get(instr.peer, 0))
            out.setdefault(at, []).append(instr)
    return out
