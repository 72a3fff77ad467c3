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

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from dipc.errors import InfeasibleMemoryError, ScheduleError
from dipc.ir.instructions import Op
from dipc.ir.program import StageInfo
from dipc.ir.program import sub_indices
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
    fwd_todo: list[_Task] = field(default_factory=list)
    bwd_todo: list[_Task] = field(default_factory=list)
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
    by_rank = _check_inputs(stages, num_ranks, num_microbatches)
    costs = costs or TaskCosts(fwd=lambda *t: 1.0, bwd=(lambda *t: 1.0) if split_backward else (lambda *t: 2.0),
                               wgrad=(lambda *t: 1.0) if split_backward else None, act=lambda *t: 1.0,
                               comm=lambda *t: 0.0)
    if split_backward and costs.wgrad is None:
        raise ScheduleError("split_backward needs costs.wgrad (the weight-gradient durations). "
                            "Fix: pass TaskCosts(wgrad=...) or split_backward=False.")
    prio = priority or (lambda op, s, m: (m, s) if op is Op.FWD else (m, -s))
    limits = _limits(memory_limit, num_ranks)
    in_flight_cap = {s.id: max(len(stages) - s.id, num_ranks) if caps else num_microbatches for s in stages}
    # in_flight[s][m]: units of microbatch m that stage s has forwarded and not yet backwarded
    in_flight: dict[int, dict[int, int]] = {s.id: {} for s in stages}
    grad_consumers = {s.id: [c.id for c in stages if s.id in c.grad_producers] for s in stages}
    rank_of = {s.id: s.rank for s in stages}
    split_mods = {name for name, _ in subs}
    split = {s.id: s.modality in split_mods for s in stages}

    def units(s: int, m: int):
        return sub_indices(subs, stages[s].modality, m)

    ranks = [_Rank(stages=ids) for ids in by_rank]
    for r in ranks:
        tasks = [(s, m, j) for s in r.stages for m in range(num_microbatches) for j in units(s, m)]
        r.fwd_todo = sorted(tasks, key=lambda t: (*prio(Op.FWD, t[0], t[1]), t[2]))
        r.bwd_todo = sorted(tasks, key=lambda t: (*prio(Op.BWD, t[0], t[1]), t[2]))
    done: dict[tuple[Op, int, int, int], float] = {}
    bwd_op = Op.BWD_I if split_backward else Op.BWD

    def fwd_ready(s: int, m: int, j: int) -> float | None:
        t = 0.0
        for p in stages[s].producers:
            for k in ((j,) if split[s] else units(p, m)):
                end = done.get((Op.FWD, p, m, k))
                if end is None:
                    return None
                t = max(t, end + (_call(costs.comm, p, s, m, k) if rank_of[p] != rank_of[s] else 0.0))
        return t

    def bwd_ready(s: int, m: int, j: int) -> float | None:
        t = done.get((Op.FWD, s, m, j))
        if t is None:
            return None
        for c in grad_consumers[s]:
            end = done.get((bwd_op, c, m, j if split[c] else -1))
            if end is None:
                return None
            t = max(t, end + (_call(costs.comm, s, c, m, j) if rank_of[c] != rank_of[s] else 0.0))
        return t

    def may_start(s: int, m: int) -> bool:
        return m in in_flight[s] or len(in_flight[s]) < in_flight_cap[s]

    def proposal(rank: int, r: _Rank) -> tuple[float, Op, int, int] | None:
        now = r.free_at
        fwd = next(((t, s, m, j) for s, m, j in r.fwd_todo if (t := fwd_ready(s, m, j)) is not None
                    and may_start(s, m) and r.memory + _call(costs.act, s, m, j) <= limits[rank] + 1e-9),
                   None)
        bwd = next(((t, s, m, j) for s, m, j in r.bwd_todo if (t := bwd_ready(s, m, j)) is not None), None)
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

    total = sum(len(r.fwd_todo) + len(r.bwd_todo) for r in ranks) * (1.5 if split_backward else 1)
    placed = 0
    while placed < total:
        best = None
        for rank, r in enumerate(ranks):
            p = proposal(rank, r)
            if p is not None and (best is None or p[0] < best[1][0]):
                best = (rank, p)
        if best is None:
            full = [i for i, r in enumerate(ranks) if r.fwd_todo]
            raise InfeasibleMemoryError(
                f"no task can start: ranks {full} hold {[ranks[i].memory for i in full]} of stashed activations "
                f"and their memory limits {[limits[i] for i in full]} leave no room for the next forward. "
                "Fix: raise the memory limit, use more microbatches of smaller size, or recompute activations.")
        rank, (start, op, s, m, j) = best
        r = ranks[rank]
        fn = {Op.FWD: costs.fwd, Op.BWD: costs.bwd, Op.BWD_I: costs.bwd, Op.BWD_W: costs.wgrad}[op]
        duration = _call(fn, s, m, j)
        done[(op, s, m, j)] = start + duration
        r.free_at, r.last = start + duration, op
        r.order.append(ComputeAction(op, s, m, j))
        if op is Op.FWD:
            r.fwd_todo.remove((s, m, j))
            r.memory += _call(costs.act, s, m, j)
            in_flight[s][m] = in_flight[s].get(m, 0) + 1
        elif op is Op.BWD_W:
            r.wgrad_todo.remove((s, m, j))
            r.memory -= _call(costs.act, s, m, j)
        else:
            r.bwd_todo.remove((s, m, j))
            in_flight[s][m] -= 1
            if not in_flight[s][m] and all((bwd_op, s, m, k) in done for k in units(s, m)):
                del in_flight[s][m]   # the microbatch's slot frees when its last sub is backwarded
            if split_backward:
                r.wgrad_todo.append((s, m, j))
            else:
                r.memory -= _call(costs.act, s, m, j)
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
