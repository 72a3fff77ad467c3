"""Co-located ranks slow each other down: compute stretched by how much of it overlaps other
ranks' compute on the same host.

Why: on this project's 2-vCPU machine, two gloo ranks (one torch thread each) ran the same
instructions 1.15-1.6x slower, in thread CPU time, while the other rank computed at the same
moment (shared caches and memory bandwidth, the host's scheduling of the vCPUs), and about 1.0x
while it waited. 1F1B's critical rank mostly computes alone, interleaved 1F1B's ranks mostly
together, so one average compute factor left interleaved 1F1B 16-25% under-predicted while 1F1B
and GPipe were within 5% (``benchmarks/semu_accuracy.py``).

Model: a compute instruction (FWD, BWD, BWD_I, BWD_W) whose span overlaps other ranks' compute
on its node for a fraction ``o`` of its length (summed over those ranks) takes ``1 + s·o`` times
its time alone, ``s`` the device profile's ``colocated_slowdown``. The overlaps depend on the
durations, so the step is simulated, the factors read off its timeline, and simulated again, for
a fixed number of rounds (each round's factors averaged with the previous round's, which damps
the oscillation between "both busy, both slow" and "apart, both fast"). GPU ranks own their
devices: ``s = 0`` there and nothing changes.
"""
from __future__ import annotations

import bisect
from collections.abc import Callable

from dipc.ir import Instruction, Op, Program
from dipc.semu.emulator import STREAM_COMPUTE, ComputeTimeFn, SimResult
from dipc.semu.profiles import ClusterProfile

__all__ = ["colocated_overlaps", "contended"]

_COMPUTE = frozenset({Op.FWD, Op.BWD, Op.BWD_I, Op.BWD_W})


def colocated_overlaps(result: SimResult, cluster: ClusterProfile, gpus_per_rank: int = 1
                       ) -> dict[Instruction, float]:
    """Per compute instruction of a recorded simulation: the time other ranks on its node spent
    computing during its span, as a fraction of its span (can exceed 1 with several such ranks)."""
    program = result.program
    spans: dict[int, list[tuple[float, float, Instruction]]] = {r: [] for r in range(program.num_ranks)}
    for rank, stream, step, start, end, _ in result.raw_spans:
        if stream == STREAM_COMPUTE:
            ins = program.streams[rank][step]
            if ins.op in _COMPUTE:
                spans[rank].append((start, end, ins))
    ends: dict[int, list[float]] = {}
    for rank, xs in spans.items():
        xs.sort(key=lambda s: s[0])
        ends[rank] = [e for _, e, _ in xs]
    nodes: dict[int, list[int]] = {}
    for r in range(program.num_ranks):
        nodes.setdefault(cluster.node_of(r, gpus_per_rank), []).append(r)
    out: dict[Instruction, float] = {}
    for rank, xs in spans.items():
        others = [o for o in nodes[cluster.node_of(rank, gpus_per_rank)] if o != rank]
        for start, end, ins in xs:
            length = end - start
            if length <= 0:
                continue
            shared = 0.0
            for o in others:
                k = bisect.bisect_right(ends[o], start)     # the first of o's spans ending after start
                while k < len(spans[o]) and spans[o][k][0] < end:
                    s, e, _ = spans[o][k]
                    shared += min(e, end) - max(s, start)
                    k += 1
            out[ins] = shared / length
    return out


def contended(run: Callable[[ComputeTimeFn, bool], SimResult], base: ComputeTimeFn, cluster: ClusterProfile,
              slowdown: float, *, gpus_per_rank: int = 1, record: bool = True, rounds: int = 3) -> SimResult:
    """The simulation ``run(compute_time, record)`` with compute times stretched by co-located
    overlap (module docstring): ``rounds`` recorded simulations refine the factors, then one more
    (recorded if ``record``) gives the result."""
    factors: dict[Instruction, float] = {}

    def stretched(ins: Instruction) -> float:
        return base(ins) * factors.get(ins, 1.0)

    result = run(base, True)
    for k in range(rounds + 1):
        overlaps = colocated_overlaps(result, cluster, gpus_per_rank)
        factors = {ins: 0.5 * (factors.get(ins, 1.0) + 1.0 + slowdown * o) for ins, o in overlaps.items()}
        result = run(stretched, record or k < rounds)   # the rounds need timelines; the last only if asked
    return result

