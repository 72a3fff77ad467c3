"""Queue priorities for the dual-queue interleaver (phase 2): ``(op, stage, mb) -> sort key``,
lower keys first.

The paper feeds phase 2 the segment ranking MCTS found (:func:`dipc.passes.segment_order.priority_from_order`).
These rules are the other candidates DIP's planner scores next to it, each cheap to build:

- :func:`microbatch_priority`: earlier microbatch first (the default; 1F1B-like);
- :func:`grouped_priority`: microbatches in groups of ``P``, stage order within a group — the
  order Megatron's interleaved 1F1B walks its virtual stages in;
- :func:`critical_path_priority` (beyond the paper): the task with the longest remaining path to
  the end of the step first (HEFT's "upward rank"). With uneven microbatches (a heavy encoder
  sub-batch here, a light one there) it starts the work that would otherwise end up on the tail.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from graphlib import TopologicalSorter

from dipc.ir.instructions import Op
from dipc.ir.program import StageInfo

Priority = Callable[[Op, int, int], tuple]

__all__ = ["Priority", "critical_path_priority", "grouped_priority", "microbatch_priority"]


def microbatch_priority(op: Op, stage: int, mb: int) -> tuple:
    """Earlier microbatch first; forwards by ascending stage, backwards by descending stage."""
    return (mb, stage) if op is Op.FWD else (mb, -stage)


def grouped_priority(group: int) -> Priority:
    """Microbatches in groups of ``group`` (usually the pipeline depth), stage order inside a group."""
    def priority(op: Op, stage: int, mb: int) -> tuple:
        return (mb // group, stage if op is Op.FWD else -stage, mb)
    return priority


def critical_path_priority(stages: Sequence[StageInfo], num_microbatches: int,
                           fwd: Callable[[int, int], float], bwd: Callable[[int, int], float]) -> Priority:
    """Longest remaining path first: a forward's path runs through every later forward of its
    microbatch and the whole backward; a backward's through the backwards of its producers.
    ``fwd``/``bwd`` are (stage, mb) -> duration (bwd the whole backward).

    Computed in topological order rather than by memoised recursion: a recursive closure refers
    to itself through its cell, a reference cycle that only the cyclic collector frees, and it
    held the planner's cost model (``fwd``/``bwd`` close over it) alive after each plan."""
    ids = [s.id for s in stages]
    consumers: dict[int, list[int]] = {i: [] for i in ids}
    for c in stages:
        for p in c.producers:
            consumers[p].append(c.id)
    # producers (and gradient producers) first
    order = list(TopologicalSorter({s.id: {*s.producers, *s.grad_producers} for s in stages}).static_order())
    rank: dict[tuple[Op, int, int], float] = {}
    for m in range(num_microbatches):
        up_bwd: dict[int, float] = {}
        for s in order:
            up_bwd[s] = bwd(s, m) + max((up_bwd[p] for p in stages[s].grad_producers), default=0.0)
        up_fwd: dict[int, float] = {}
        for s in reversed(order):
            later = [up_fwd[c] for c in consumers[s]]
            up_fwd[s] = fwd(s, m) + (max(later) if later else up_bwd[s])
        for s in ids:
            rank[(Op.FWD, s, m)] = up_fwd[s]
            rank[(Op.BWD, s, m)] = up_bwd[s]

    def priority(op: Op, stage: int, mb: int) -> tuple:
        return (-rank[(Op.FWD if op is Op.FWD else Op.BWD, stage, mb)], mb)
    return priority
