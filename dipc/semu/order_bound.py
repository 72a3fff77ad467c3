"""A lower bound of a schedule's simulated step time, read off its compute orders before lowering.

Lowering compute orders to a program (:func:`dipc.passes.codegen.lower`) and emulating it cost a
planner most of its time per candidate, and most candidates lose. This times the orders alone:
each rank runs its compute actions in order, an action starts once its rank is free and every
*cross-rank* message it receives has been produced (the producer's action has ended), and
messages take no time. Every rule only relaxes the emulator's (:mod:`dipc.semu.emulator`):
receives there block until the message *arrives* (send end + latency + bytes / bandwidth, behind
earlier messages on the link) and may be pulled earlier by ``fix_recv_order``, sends, loads,
REDUCE and OPTIM and each instruction's fixed overhead take time there, and recomputation
(phase 3) only lengthens backwards. So the emulator's start of every action is at least the one
here, by induction over the actions in the emulator's order, and the returned makespan is a
lower bound of the plain and of the fitted step time.

The messages are the ones ``lower`` emits (see ``_expand_rank``): FWD of stage s on (m, j)
receives, from each producer p on another rank, the subs k the consumer reads (``(j,)`` for a
split consumer, all of p's subs otherwise), each sent by p's FWD of that sub; a BWD / BWD_I of s
on (m, j) receives, from each stage c on another rank that sends s gradients, the gradient of
sub j, sent by c's backward of (m, j) when c is split, of (m, -1) otherwise. Same-rank edges
carry no message and constrain nothing here, as in the emulator. A dependency no order produces
is ignored (still a bound); a cycle of waits raises :class:`~dipc.errors.ScheduleError`, as the
emulator would on the lowered program.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

from dipc.errors import ScheduleError
from dipc.ir import Op, StageInfo
from dipc.ir.program import sub_indices

# Op.X is a slow class-attribute lookup on Python 3.11 enums, and these loops run per instruction
_BWD, _BWD_I, _BWD_W, _FWD = Op.BWD, Op.BWD_I, Op.BWD_W, Op.FWD

__all__ = ["order_lower_bound"]

Seconds = Callable[[Op, int, int, int], float]   # (op, stage, mb, sub) -> compute seconds


def order_lower_bound(stages: Sequence[StageInfo], compute_orders: Sequence[Sequence], seconds: Seconds,
                      subs: Sequence[tuple[str, Sequence[int]]] = ()) -> float:
    """Makespan of ``compute_orders`` (per rank, ``ComputeAction``-like: op, stage, mb, sub)
    with ``seconds(op, stage, mb, sub)`` per action and free messages: a lower bound of the
    lowered program's simulated step time (see the module docstring), e.g.
    ``order_lower_bound(stages, orders, step.compute_seconds, subs)``."""
    subs_t = tuple((name, tuple(counts)) for name, counts in subs)
    split = {name for name, _ in subs_t}
    is_split = [st.modality in split for st in stages]
    rank_of = [st.rank for st in stages]
    grad_from = [tuple(c.id for c in stages if st.id in c.grad_producers) for st in stages]
    made: set[tuple[str, int, int, int]] = set()      # units some order runs: ("F"|"B", stage, mb, sub)
    for order in compute_orders:
        for a in order:
            made.add(("F" if a.op is _FWD else "B", a.stage, a.mb, a.sub))
    ranges: dict[tuple[int, int], range | tuple[int]] = {}

    def deps(a) -> list[tuple[str, int, int, int]]:
        s, m, j = a.stage, a.mb, a.sub
        r = rank_of[s]
        out = []
        if a.op is _FWD:
            for p in stages[s].producers:
                if rank_of[p] == r:
                    continue
                if is_split[s]:
                    ks: range | tuple[int] = (j,)
                else:
                    ks = ranges.get((p, m))
                    if ks is None:
                        ks = ranges[(p, m)] = sub_indices(subs_t, stages[p].modality, m)
                out.extend(("F", p, m, k if is_split[p] else -1) for k in ks)
        elif a.op is _BWD or a.op is _BWD_I:
            out.extend(("B", c, m, j if is_split[c] else -1) for c in grad_from[s] if rank_of[c] != r)
        return [d for d in out if d in made]

    needs = [[deps(a) for a in order] for order in compute_orders]
    end: dict[tuple[str, int, int, int], float] = {}
    R = len(compute_orders)
    pc = [0] * R
    clock = [0.0] * R
    progress = True
    while progress:
        progress = False
        for r in range(R):
            order, need = compute_orders[r], needs[r]
            i, t = pc[r], clock[r]
            while i < len(order):
                a = order[i]
                start = t
                for d in need[i]:
                    e = end.get(d)
                    if e is None:
                        break
                    if e > start:
                        start = e
                else:
                    t = start + seconds(a.op, a.stage, a.mb, a.sub)
                    if a.op is not _BWD_W:          # a unit's first backward sends its gradients
                        key = ("F" if a.op is _FWD else "B", a.stage, a.mb, a.sub)
                        end.setdefault(key, t)
                    i += 1
                    continue
                break
            if i != pc[r]:
                progress = True
            pc[r], clock[r] = i, t
    stuck = [r for r in range(R) if pc[r] < len(compute_orders[r])]
    if stuck:
        where = "; ".join(f"rank {r} at action {pc[r]} ({compute_orders[r][pc[r]]})" for r in stuck[:4])
        raise ScheduleError(f"the compute orders wait on each other in a cycle: {where}. Fix: reorder them so "
                            "every action's cross-rank producers come first in time.")
    return max(clock, default=0.0)
