"""DIP's stage interleaving (phase 2 of the planner): a greedy dual-queue list scheduler.

Every rank keeps a forward queue and a backward queue, each ordered by priority. The scheduler
replays the step in simulated time with the caller's per-task durations: whenever a rank is free
it runs, in order of preference,

1. 1F1B-style alternation when both a forward and a backward are ready now (the opposite kind of
   what it ran last), so activation memory stays bounded in the steady state;
2. whichever kind is ready now, if only one is;
3. a deferred weight-gradient task (``split_backward``: zero-bubble BWD_I / BWD_W), to fill the gap;
4. otherwise the task that becomes ready earliest ("fill the earliest gap").

A forward is held back while it would push the rank's stashed activations over its memory limit
(the paper's "pause forward work on a rank whose memory is full"). Tasks are committed in global
start-time order, so the resulting per-rank orders are consistent with one real timeline: every
task's inputs are produced before it starts, which makes the lowered program deadlock-free.

Choices where the paper is silent (written down here and in the notes):
- default priority: earlier microbatch first; for forwards of one microbatch the earlier stage,
  for backwards the later stage (the order gradients flow);
- memory without a limit: stage ``s`` keeps at most ``max(S - s, P)`` microbatches in flight (forward done,
  backward not): with one stage per rank no rank stashes more than 1F1B's highest peak (rank 0's
  ``P``), while later ranks may run ahead to absorb uneven stage times. Per-stage caps never
  deadlock: the last stage can always proceed, and so, inductively, every earlier one. An optional per-rank ``memory_limit`` (SEMU's bytes, or stash units) is enforced on top;
  a limit too tight for any order raises :class:`InfeasibleMemoryError`;
- beyond the paper: ``split_backward`` adds the zero-bubble input/weight split to this phase.
"""
from __future__ import annotations

from bisect import insort
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from dipc.errors import InfeasibleMemoryError, ScheduleError
from dipc.ir.instructions import Op
from dipc.ir.program import StageInfo
from dipc.passes.schedules import ComputeAction, _check_inputs

TaskFn = Callable[[int, int], float]


@dataclass(frozen=True)
class TaskCosts:
    """Durations (seconds or any unit) and memory of the tasks the scheduler places.

    ``fwd``/``bwd``: (stage, mb) -> duration; with ``split_backward``, ``bwd`` is the input-grad part
    and ``wgrad`` the weight-grad part. ``act``: activation memory a forward stashes until its
    backward frees it. ``comm``: (producer stage, consumer stage, mb) -> transfer time across ranks.
    """

    fwd: TaskFn = lambda s, m: 1.0
    bwd: TaskFn = lambda s, m: 2.0
    wgrad: TaskFn | None = None
    act: TaskFn = lambda s, m: 1.0
    comm: Callable[[int, int, int], float] = lambda p, c, m: 0.0


@dataclass
class _Rank:
    stages: list[int]
    free_at: float = 0.0
    memory: float = 0.0
    last: Op | None = None
    order: list[ComputeAction] = field(default_factory=list)
    wgrad_todo: list[tuple[int, int]] = field(default_factory=list)


def dual_queue_schedule(stages: Sequence[StageInfo], num_ranks: int, num_microbatches: int,
                        costs: TaskCosts | None = None, *, priority: Callable[[Op, int, int], tuple] | None = None,
                        memory_limit: float | Sequence[float] | None = None,
                        split_backward: bool = False) -> list[list[ComputeAction]]:
    """Per-rank compute orders for one batch (see the module docstring).

    With a ``memory_limit`` only memory holds forwards back, so a light encoder rank may run far
    ahead; if that greedy order reaches a dead end (every rank full of stashes whose backwards
    need a forward that no longer fits), it is retried with 1F1B's in-flight bound per stage."""
    if memory_limit is None:
        return _schedule(stages, num_ranks, num_microbatches, costs, priority, None, split_backward, caps=True)
    try:
        return _schedule(stages, num_ranks, num_microbatches, costs, priority, memory_limit, split_backward,
                         caps=False)
    except InfeasibleMemoryError:
        return _schedule(stages, num_ranks, num_microbatches, costs, priority, memory_limit, split_backward,
                         caps=True)


def _schedule(stages, num_ranks, num_microbatches, costs, priority, memory_limit, split_backward, *, caps: bool):
    """Event-driven list scheduling: a task enters its rank's *known* list (kept in priority order)
    once all its dependencies are placed, with its ready time; a rank's proposal only scans its
    known lists and is recomputed only when that rank's state or known lists change."""
    by_rank = _check_inputs(stages, num_ranks, num_microbatches)
    costs = costs or TaskCosts(bwd=(lambda s, m: 1.0) if split_backward else (lambda s, m: 2.0),
                               wgrad=(lambda s, m: 1.0) if split_backward else None)
    if split_backward and costs.wgrad is None:
        raise ScheduleError("split_backward needs costs.wgrad (the weight-gradient durations). "
                            "Fix: pass TaskCosts(wgrad=...) or split_backward=False.")
    prio = priority or (lambda op, s, m: (m, s) if op is Op.FWD else (m, -s))
    limits = _limits(memory_limit, num_ranks)
    M = num_microbatches
    in_flight_cap = {s.id: max(len(stages) - s.id, num_ranks) if caps else M for s in stages}
    in_flight = {s.id: 0 for s in stages}
    consumers = {s.id: [c.id for c in stages if s.id in c.producers] for s in stages}
    grad_consumers = {s.id: [c.id for c in stages if s.id in c.grad_producers] for s in stages}
    rank_of = {s.id: s.rank for s in stages}
    ranks = [_Rank(stages=ids) for ids in by_rank]
    bwd_op = Op.BWD_I if split_backward else Op.BWD
    # pending dependency counts; FWD(s, m) waits for its producers' FWDs, BWD(s, m) for FWD(s, m)
    # and its grad consumers' backwards
    fwd_pending = {(s.id, m): len(s.producers) for s in stages for m in range(M)}
    bwd_pending = {(s.id, m): 1 + len(grad_consumers[s.id]) for s in stages for m in range(M)}
    fwd_key = {(s.id, m): prio(Op.FWD, s.id, m) for s in stages for m in range(M)}
    bwd_key = {(s.id, m): prio(Op.BWD, s.id, m) for s in stages for m in range(M)}
    fwd_order = {t: i for i, t in enumerate(sorted(fwd_key, key=fwd_key.__getitem__))}
    bwd_order = {t: i for i, t in enumerate(sorted(bwd_key, key=bwd_key.__getitem__))}
    known_fwd: list[list[tuple[int, float, int, int]]] = [[] for _ in ranks]   # (order, ready, s, m)
    known_bwd: list[list[tuple[int, float, int, int]]] = [[] for _ in ranks]
    done: dict[tuple[Op, int, int], float] = {}
    remaining = [0] * len(ranks)
    for s in stages:
        remaining[s.rank] += M
    fwd_left = list(remaining)

    def ready_fwd(s: int, m: int) -> float:
        return max((done[(Op.FWD, p, m)] + (costs.comm(p, s, m) if rank_of[p] != rank_of[s] else 0.0)
                    for p in stages[s].producers), default=0.0)

    def ready_bwd(s: int, m: int) -> float:
        t = done[(Op.FWD, s, m)]
        for c in grad_consumers[s]:
            t = max(t, done[(bwd_op, c, m)] + (costs.comm(s, c, m) if rank_of[c] != rank_of[s] else 0.0))
        return t

    touched: set[int] = set()

    def make_known(kind: str, s: int, m: int) -> None:
        r = rank_of[s]
        if kind == "f":
            insort(known_fwd[r], (fwd_order[(s, m)], ready_fwd(s, m), s, m))
        else:
            insort(known_bwd[r], (bwd_order[(s, m)], ready_bwd(s, m), s, m))
        touched.add(r)

    for s in stages:
        for m in range(M):
            if fwd_pending[(s.id, m)] == 0:
                make_known("f", s.id, m)

    def proposal(rank: int, r: _Rank) -> tuple[float, Op, int, int] | None:
        now = r.free_at
        fwd = next(((t, s, m) for _, t, s, m in known_fwd[rank]
                    if in_flight[s] < in_flight_cap[s] and r.memory + costs.act(s, m) <= limits[rank] + 1e-9), None)
        bwd = next(((t, s, m) for _, t, s, m in known_bwd[rank]), None)
        fwd_now = fwd is not None and fwd[0] <= now
        bwd_now = bwd is not None and bwd[0] <= now
        if fwd_now and bwd_now:
            pick = (Op.FWD, fwd) if r.last is not Op.FWD else (bwd_op, bwd)
        elif fwd_now:
            pick = (Op.FWD, fwd)
        elif bwd_now:
            pick = (bwd_op, bwd)
        elif r.wgrad_todo:
            s, m = r.wgrad_todo[0]
            return now, Op.BWD_W, s, m
        else:
            options = [(Op.FWD, fwd)] * (fwd is not None) + [(bwd_op, bwd)] * (bwd is not None)
            if not options:
                return None
            pick = min(options, key=lambda o: o[1][0])
        op, (t, s, m) = pick
        return max(now, t), op, s, m

    total = sum(remaining) * (3 if split_backward else 2)
    proposals: list = [None] * len(ranks)
    touched.update(range(len(ranks)))
    placed = 0
    while placed < total:
        for rank in touched:
            proposals[rank] = proposal(rank, ranks[rank])
        touched.clear()
        best = None
        for rank, p in enumerate(proposals):
            if p is not None and (best is None or p[0] < best[1][0]):
                best = (rank, p)
        if best is None:
            full = [i for i, left in enumerate(fwd_left) if left]
            raise InfeasibleMemoryError(
                f"no task can start: ranks {full} hold {[ranks[i].memory for i in full]} of stashed activations "
                f"and their memory limits {[limits[i] for i in full]} leave no room for the next forward. "
                "Fix: raise the memory limit, use more microbatches of smaller size, or recompute activations.")
        rank, (start, op, s, m) = best
        r = ranks[rank]
        touched.add(rank)
        duration = {Op.FWD: costs.fwd, Op.BWD: costs.bwd, Op.BWD_I: costs.bwd, Op.BWD_W: costs.wgrad}[op](s, m)
        done[(op, s, m)] = start + duration
        r.free_at, r.last = start + duration, op
        r.order.append(ComputeAction(op, s, m))
        if op is Op.FWD:
            known_fwd[rank].remove(next(x for x in known_fwd[rank] if x[2] == s and x[3] == m))
            fwd_left[rank] -= 1
            r.memory += costs.act(s, m)
            in_flight[s] += 1
            for c in consumers[s]:
                fwd_pending[(c, m)] -= 1
                if fwd_pending[(c, m)] == 0:
                    make_known("f", c, m)
            bwd_pending[(s, m)] -= 1
            if bwd_pending[(s, m)] == 0:
                make_known("b", s, m)
        elif op is Op.BWD_W:
            r.wgrad_todo.remove((s, m))
            r.memory -= costs.act(s, m)
        else:
            known_bwd[rank].remove(next(x for x in known_bwd[rank] if x[2] == s and x[3] == m))
            in_flight[s] -= 1
            if split_backward:
                r.wgrad_todo.append((s, m))
            else:
                r.memory -= costs.act(s, m)
            for p in stages[s].grad_producers:
                bwd_pending[(p, m)] -= 1
                if bwd_pending[(p, m)] == 0:
                    make_known("b", p, m)
        placed += 1
    return [r.order for r in ranks]


def _limits(memory_limit: float | Sequence[float] | None, num_ranks: int) -> list[float]:
    if memory_limit is None:
        return [float("inf")] * num_ranks
    if isinstance(memory_limit, (int, float)):
        return [float(memory_limit)] * num_ranks
    if len(memory_limit) != num_ranks:
        raise ScheduleError(f"{len(memory_limit)} memory limits for {num_ranks} ranks. Fix: pass one per rank.")
    return [float(x) for x in memory_limit]


def dual_queue(stages: Sequence[StageInfo], num_ranks: int, num_microbatches: int) -> list[list[ComputeAction]]:
    """The dual-queue schedule with unit costs (F=1, B=2): the registry entry; the planner passes
    SEMU's durations to :func:`dual_queue_schedule` instead."""
    return dual_queue_schedule(stages, num_ranks, num_microbatches)
