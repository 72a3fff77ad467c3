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

Sub-microbatches (``subs``, as in ``Program.subs``): every sub of a split (encoder) stage is its own
task, so short encoder subs can fill gaps. Its dependencies are the DAG of §4: a split stage's sub
j reads sub j of its producer; the first stage that is not split needs every sub's forward; sub j's
backward needs that consumer's backward of the microbatch. Cost callbacks are called as
``fwd(s, m)`` for a whole microbatch and ``fwd(s, m, j)`` for sub j (likewise ``bwd``, ``wgrad``,
``act``; ``comm(p, c, m)`` / ``comm(p, c, m, j)``); the priority key gets ``j`` appended. The
in-flight cap counts microbatches, not subs: a stage started on a microbatch may forward its
remaining subs (the consumer needs them all before any backward frees memory).
"""
from __future__ import annotations

from bisect import insort
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from dipc.errors import InfeasibleMemoryError, ScheduleError
from dipc.ir.instructions import Op
from dipc.ir.program import StageInfo
from dipc.ir.program import sub_indices
from dipc.passes.priorities import microbatch_priority
from dipc.passes.schedules import ComputeAction, _check_inputs

TaskFn = Callable[..., float]
_Task = tuple[int, int, int]   # (stage, microbatch, sub); sub -1 = the whole microbatch


def _call(fn: Callable[..., float], *args: int) -> float:
    """Call a cost callback, passing the sub only when there is one (old 2-argument callbacks work)."""
    return fn(*args[:-1]) if args[-1] < 0 else fn(*args)


@dataclass(frozen=True)
class TaskCosts:
    """Durations (seconds or any unit) and memory of the tasks the scheduler places.

    ``fwd``/``bwd``: (stage, mb[, sub]) -> duration (the sub only for split stages); with ``split_backward``, ``bwd`` is the input-grad part
    and ``wgrad`` the weight-grad part. ``act``: activation memory a forward stashes until its
    backward frees it. ``comm``: (producer stage, consumer stage, mb) -> transfer time across ranks.
    """

    fwd: TaskFn = lambda s, m, j=-1: 1.0
    bwd: TaskFn = lambda s, m, j=-1: 2.0
    wgrad: TaskFn | None = None
    act: TaskFn = lambda s, m, j=-1: 1.0
    comm: Callable[..., float] = lambda p, c, m, j=-1: 0.0


@dataclass
class _Rank:
    stages: list[int]
    free_at: float = 0.0
    memory: float = 0.0
    last: Op | None = None
    order: list[ComputeAction] = field(default_factory=list)
    wgrad_todo: list[_Task] = field(default_factory=list)


def dual_queue_schedule(stages: Sequence[StageInfo], num_ranks: int, num_microbatches: int,
                        costs: TaskCosts | None = None, *, priority: Callable[[Op, int, int], tuple] | None = None,
                        memory_limit: float | Sequence[float] | None = None,
                        split_backward: bool = False,
                        subs: Sequence[tuple[str, Sequence[int]]] = ()) -> list[list[ComputeAction]]:
    """Per-rank compute orders for one batch (see the module docstring).

    With a ``memory_limit`` only memory holds forwards back, so a light encoder rank may run far
    ahead; if that greedy order reaches a dead end (every rank full of stashes whose backwards
    need a forward that no longer fits), it is retried with 1F1B's in-flight bound per stage."""
    subs_t = tuple((name, tuple(counts)) for name, counts in subs)
    if memory_limit is None:
        return _schedule(stages, num_ranks, num_microbatches, costs, priority, None, split_backward, subs_t,
                         caps=True)
    try:
        return _schedule(stages, num_ranks, num_microbatches, costs, priority, memory_limit, split_backward,
                         subs_t, caps=False)
    except InfeasibleMemoryError:
        return _schedule(stages, num_ranks, num_microbatches, costs, priority, memory_limit, split_backward,
                         subs_t, caps=True)


def _schedule(stages, num_ranks, num_microbatches, costs, priority, memory_limit, split_backward, subs, *,
              caps: bool):
    """Event-driven list scheduling: a task enters its rank's *known* list (kept in priority order)
    once all its dependencies are placed, with its ready time; a rank's proposal scans only its
    known lists and is recomputed only when that rank's state or known lists change."""
    by_rank = _check_inputs(stages, num_ranks, num_microbatches)
    costs = costs or TaskCosts(fwd=lambda *t: 1.0, bwd=(lambda *t: 1.0) if split_backward else (lambda *t: 2.0),
                               wgrad=(lambda *t: 1.0) if split_backward else None, act=lambda *t: 1.0,
                               comm=lambda *t: 0.0)
    if split_backward and costs.wgrad is None:
        raise ScheduleError("split_backward needs costs.wgrad (the weight-gradient durations). "
                            "Fix: pass TaskCosts(wgrad=...) or split_backward=False.")
    prio = priority or microbatch_priority
    limits = _limits(memory_limit, num_ranks)
    M = num_microbatches
    in_flight_cap = {s.id: max(len(stages) - s.id, num_ranks) if caps else M for s in stages}
    # in_flight[s][m]: units of microbatch m that stage s has forwarded and not yet backwarded
    in_flight: dict[int, dict[int, int]] = {s.id: {} for s in stages}
    consumers = {s.id: [c.id for c in stages if s.id in c.producers] for s in stages}
    grad_consumers = {s.id: [c.id for c in stages if s.id in c.grad_producers] for s in stages}
    rank_of = {s.id: s.rank for s in stages}
    split_mods = {name for name, _ in subs}
    split = {s.id: s.modality in split_mods for s in stages}
    units = {(s.id, m): tuple(sub_indices(subs, s.modality, m)) for s in stages for m in range(M)}
    tasks = [(s.id, m, j) for s in stages for m in range(M) for j in units[(s.id, m)]]
    bwd_op = Op.BWD_I if split_backward else Op.BWD

    # pending dependencies: FWD(s, m, j) waits for its producers' forwards (sub j of a split
    # producer, every sub of an unsplit consumer's producer); BWD(s, m, j) for its own forward and
    # each grad consumer's backward (sub j of a split consumer, else the whole microbatch)
    fwd_pending = {t: sum(1 if split[t[0]] else len(units[(p, t[1])]) for p in stages[t[0]].producers)
                   for t in tasks}
    bwd_pending = {t: 1 + len(grad_consumers[t[0]]) for t in tasks}
    fwd_order = {t: i for i, t in enumerate(sorted(tasks, key=lambda t: (*prio(Op.FWD, t[0], t[1]), t[2])))}
    bwd_order = {t: i for i, t in enumerate(sorted(tasks, key=lambda t: (*prio(Op.BWD, t[0], t[1]), t[2])))}
    ranks = [_Rank(stages=ids) for ids in by_rank]
    known_fwd: list[list[tuple]] = [[] for _ in ranks]   # (order, ready, s, m, j)
    known_bwd: list[list[tuple]] = [[] for _ in ranks]
    done: dict[tuple[Op, int, int, int], float] = {}
    fwd_left = [0] * num_ranks
    for s, m, j in tasks:
        fwd_left[rank_of[s]] += 1

    def ready_fwd(s: int, m: int, j: int) -> float:
        t = 0.0
        for p in stages[s].producers:
            for k in ((j,) if split[s] else units[(p, m)]):
                t = max(t, done[(Op.FWD, p, m, k)] + (_call(costs.comm, p, s, m, k) if rank_of[p] != rank_of[s]
                                                      else 0.0))
        return t

    def ready_bwd(s: int, m: int, j: int) -> float:
        t = done[(Op.FWD, s, m, j)]
        for c in grad_consumers[s]:
            end = done[(bwd_op, c, m, j if split[c] else -1)]
            t = max(t, end + (_call(costs.comm, s, c, m, j) if rank_of[c] != rank_of[s] else 0.0))
        return t

    touched: set[int] = set(range(num_ranks))

    def release(kind: str, t: tuple[int, int, int]) -> None:
        pending = fwd_pending if kind == "f" else bwd_pending
        pending[t] -= 1
        if pending[t]:
            return
        r = rank_of[t[0]]
        if kind == "f":
            insort(known_fwd[r], (fwd_order[t], ready_fwd(*t), *t))
        else:
            insort(known_bwd[r], (bwd_order[t], ready_bwd(*t), *t))
        touched.add(r)

    for t in tasks:
        if fwd_pending[t] == 0:
            fwd_pending[t] = 1
            release("f", t)

    def may_start(s: int, m: int) -> bool:
        return m in in_flight[s] or len(in_flight[s]) < in_flight_cap[s]

    def proposal(rank: int, r: _Rank) -> tuple | None:
        now = r.free_at
        fwd = next(((t, s, m, j) for _, t, s, m, j in known_fwd[rank]
                    if may_start(s, m) and r.memory + _call(costs.act, s, m, j) <= limits[rank] + 1e-9), None)
        bwd = next(((t, s, m, j) for _, t, s, m, j in known_bwd[rank]), None)
        fwd_now = fwd is not None and fwd[0] <= now
        bwd_now = bwd is not None and bwd[0] <= now
        if fwd_now and bwd_now:
            pick = (Op.FWD, fwd) if r.last is not Op.FWD else (bwd_op, bwd)
        elif fwd_now:
            pick = (Op.FWD, fwd)
        elif bwd_now:
            pick = (bwd_op, bwd)
        elif r.wgrad_todo:
            s, m, j = r.wgrad_todo[0]
            return now, Op.BWD_W, s, m, j
        else:
            options = [(Op.FWD, fwd)] * (fwd is not None) + [(bwd_op, bwd)] * (bwd is not None)
            if not options:
                return None
            pick = min(options, key=lambda o: o[1][0])
        op, (t, s, m, j) = pick
        return max(now, t), op, s, m, j

    total = len(tasks) * (3 if split_backward else 2)
    proposals: list = [None] * num_ranks
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
        rank, (start, op, s, m, j) = best
        r = ranks[rank]
        touched.add(rank)
        fn = {Op.FWD: costs.fwd, Op.BWD: costs.bwd, Op.BWD_I: costs.bwd, Op.BWD_W: costs.wgrad}[op]
        duration = _call(fn, s, m, j)
        done[(op, s, m, j)] = start + duration
        r.free_at, r.last = start + duration, op
        r.order.append(ComputeAction(op, s, m, j))
        if op is Op.FWD:
            known_fwd[rank].remove(next(x for x in known_fwd[rank] if x[2:] == (s, m, j)))
            fwd_left[rank] -= 1
            r.memory += _call(costs.act, s, m, j)
            in_flight[s][m] = in_flight[s].get(m, 0) + 1
            for c in consumers[s]:
                for k in ((j,) if split[c] else units[(c, m)]):
                    release("f", (c, m, k))
            release("b", (s, m, j))
        elif op is Op.BWD_W:
            r.wgrad_todo.remove((s, m, j))
            r.memory -= _call(costs.act, s, m, j)
        else:
            known_bwd[rank].remove(next(x for x in known_bwd[rank] if x[2:] == (s, m, j)))
            in_flight[s][m] -= 1
            if not in_flight[s][m] and all((bwd_op, s, m, k) in done for k in units[(s, m)]):
                del in_flight[s][m]   # the microbatch's slot frees when its last sub is backwarded
            if split_backward:
                r.wgrad_todo.append((s, m, j))
            else:
                r.memory -= _call(costs.act, s, m, j)
            for p in stages[s].grad_producers:
                for k in ((j,) if split[s] else units[(p, m)]):
                    release("b", (p, m, k))
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
