"""Can a program's point-to-point traffic wedge on NCCL? A worst-case model of ordered P2P streams.

NCCL runs a rank's point-to-point operations on a GPU stream in the order the CPU launched them,
and a transfer makes progress only while the sender's and the receiver's kernels both run (a
message larger than NCCL's buffers — stage activations nearly always are — completes only then).
So a launch waits for the launches queued before it on its stream, and for its partner's launch
to have *started*. When the CPU launches each send and each receive on its own, 1F1B's steady
state wedges a rank pair: rank 0 queues ``send act(m+1)`` then ``recv grad(m)``, rank 1 queues
``send grad(m)`` then ``recv act(m+1)``; each send waits for a receive queued behind the other
send. torch.distributed.pipelining and Megatron-LM group such pairs (``batch_isend_irecv``):
the operations of one group run as one kernel, so a group starts all of its transfers at once.

:func:`stream_wait_cycle` replays one posting policy on a program and returns the wait cycle, if
there is one. The model is the conservative one: every message waits for its partner (no eager
small messages), and each rank has *one* P2P stream for all of its peers (torch gives ungrouped
operations one stream per rank pair, grouped ones the group's stream: fewer shared queues only
remove waits, so a program free of cycles here is free of them there). A launch also waits for the
computes the CPU enqueued before it (the process group orders its stream after the compute
stream), and the first compute after a receive waits for that receive.

Policies (``grouped``):

- ``False``: one launch per send (at its instruction) and per receive (where
  :func:`~dipc.ir.posting.receives_ahead` posts it) — what dipc's transport did on NCCL;
- ``True``: everything launched between two computes (the sends after one compute, the
  receives posted before the next, a receive waited on there) goes out as one group, flushed
  before the next compute and before any wait — what :class:`~dipc.runtime.transport.DistributedTransport`
  does on a GPU.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Sequence

import networkx as nx

from dipc.ir.instructions import COMPUTE_OPS, RECV_OPS, SEND_OPS, Instruction
from dipc.ir.posting import receives_ahead
from dipc.ir.program import Program

__all__ = ["launches", "stream_wait_cycle"]


@dataclass(slots=True)
class Launch:
    """One P2P launch of one rank: its place in the rank's launch order, how many computes the CPU
    had enqueued before it (it waits for the last of them), the launch the CPU last blocked on
    before issuing it, its operations, and the first compute after a receive waited on here."""

    index: int
    after_computes: int
    after_wait: int | None
    ops: list[Instruction] = field(default_factory=list)
    waited_by: int | None = None


def launches(stream: Sequence[Instruction], lookahead: int = 1, peer_ordered: bool = True,
             grouped: bool = False) -> list[Launch]:
    """The rank's P2P launches in launch order."""
    ahead = receives_ahead(stream, lookahead, peer_ordered) if lookahead else {}
    out: list[Launch] = []
    open_: Launch | None = None
    computes = 0
    posted: dict[int, Launch] = {}
    waits: list[Launch] = []            # launches a receive waited on since the last compute
    blocked_on: int | None = None       # index of the launch the CPU last waited for

    def add(instr: Instruction) -> Launch:
        nonlocal open_
        if not grouped or open_ is None:
            open_ = Launch(len(out), computes, blocked_on)
            out.append(open_)
        open_.ops.append(instr)
        launch = open_
        if not grouped:
            open_ = None
        return launch

    for pc, instr in enumerate(stream):
        for r in ahead.get(pc, ()):
            posted[id(r)] = add(r)
        op = instr.op
        if op in COMPUTE_OPS:
            open_ = None                 # flushed before the compute is enqueued
            for launch in waits:
                if launch.waited_by is None:
                    launch.waited_by = computes
            waits.clear()
            computes += 1
        elif op in SEND_OPS:
            add(instr)
        elif op in RECV_OPS:
            launch = posted.get(id(instr)) or add(instr)
            open_ = None                 # flushed before the wait
            waits.append(launch)
            blocked_on = launch.index
    return out


STREAMS = ("rank", "pair", "direction")


def _stream_key(rank: int, launch: Launch, streams: str) -> tuple:
    if streams == "rank":
        return (rank,)
    instr = launch.ops[0]
    src, dst = (rank, instr.peer) if instr.op in SEND_OPS else (instr.peer, rank)
    return (rank, min(src, dst), max(src, dst)) if streams == "pair" else (rank, src, dst)


def stream_wait_cycle(program: Program, lookahead: int = 1, peer_ordered: bool = True,
                      grouped: bool = False, streams: str = "rank") -> list[str] | None:
    """The first wait cycle of ``program``'s P2P launches under the policy, as readable steps
    (``None``: no launch can wait forever). See the module docstring for the model.

    ``streams``: which launches queue behind which on a rank — ``"rank"``: all of them (one
    stream per rank: torch's grouped P2P, and the conservative bound for everything else);
    ``"pair"``: those with the same peer (torch's ungrouped P2P on one process group);
    ``"direction"``: those with the same peer in the same direction (sends and receives on
    process groups of their own). ``lookahead=0`` posts every receive at its own instruction."""
    if streams not in STREAMS:
        raise ValueError(f"streams={streams!r}. Fix: use one of {STREAMS}.")
    if grouped and streams != "rank":
        raise ValueError("a group of launches runs on its process group's one stream. Fix: streams='rank'.")
    g = nx.DiGraph()
    sends: dict[tuple[int, int], list[tuple[int, int]]] = defaultdict(list)   # (src, dst) -> [(rank, launch)]
    recvs: dict[tuple[int, int], list[tuple[int, int]]] = defaultdict(list)
    labels: dict[tuple, str] = {}
    for rank, stream in enumerate(program.streams):
        ls = launches(stream, lookahead, peer_ordered, grouped)
        computes = [i for i in stream if i.op in COMPUTE_OPS]
        n_computes = len(computes)
        for c in range(n_computes - 1):
            g.add_edge(("C", rank, c), ("C", rank, c + 1))
        for c, instr in enumerate(computes):
            labels[("C", rank, c)] = f"rank {rank} {instr}"
        last_on: dict[tuple, int] = {}     # stream key -> the launch queued last on it
        for j, launch in enumerate(ls):
            start, done = ("S", rank, j), ("D", rank, j)
            ops = "; ".join(str(i) for i in launch.ops)
            labels[start], labels[done] = f"rank {rank} starts [{ops}]", f"rank {rank} finishes [{ops}]"
            g.add_edge(start, done)
            key = _stream_key(rank, launch, streams)
            if key in last_on:
                g.add_edge(("D", rank, last_on[key]), start)     # queued behind the launch before it
            last_on[key] = j
            if launch.after_computes:
                g.add_edge(("C", rank, launch.after_computes - 1), start)
            if launch.after_wait is not None:
                g.add_edge(("D", rank, launch.after_wait), start)     # the CPU blocked in that receive
            if launch.waited_by is not None and launch.waited_by < n_computes:
                g.add_edge(done, ("C", rank, launch.waited_by))
            for instr in launch.ops:
                if instr.op in SEND_OPS:
                    sends[(rank, instr.peer)].append((rank, j))
                else:
                    recvs[(instr.peer, rank)].append((rank, j))
    for pair, out in sends.items():
        for (sr, sj), (rr, rj) in zip(out, recvs.get(pair, ())):
            g.add_edge(("S", rr, rj), ("D", sr, sj))   # a send finishes once its receive has started
            g.add_edge(("S", sr, sj), ("D", rr, rj))   # and the receive once its send has
    try:
        cycle = nx.find_cycle(g)
    except nx.NetworkXNoCycle:
        return None
    return [f"{labels[v]} waits for {labels[u]}" for u, v in cycle]
