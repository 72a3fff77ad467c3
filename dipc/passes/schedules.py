"""Baseline schedules: the order in which each rank runs its compute (FWD / BWD / BWD_I / BWD_W).

A schedule generator is a pure function
``(stages, num_ranks, num_microbatches) -> list[list[ComputeAction]]`` (one list per rank).
It decides only the compute order; :func:`dipc.passes.codegen.lower` adds loads, sends,
receives and the optimizer step, and :func:`dipc.ir.validate.validate` proves the result
executable.

The generators follow the literature exactly for the textbook layout (a chain of stages, stage
``s`` on rank ``s % P``) and generalise to a stage DAG (extra producers such as skip edges,
several encoder branches) by reading the stage graph instead of the rank number:

- a stage's *depth* is the longest path (in edges) from it to a stage without consumers; for a
  chain with one stage per rank that is ``P - 1 - r``, the textbook warmup of rank ``r``;
- interleaving uses the rank's stages in ascending id order as its chunks ``0..V-1``.

Example::

    >>> from dipc.ir import StageInfo
    >>> stages = [StageInfo(id=s, rank=s, producers=(s - 1,) if s else (),
    ...                     grad_producers=(s - 1,) if s else ()) for s in range(4)]
    >>> " ".join(map(str, one_f_one_b(stages, 4, 8)[0][:6]))
    'F0.0 F0.1 F0.2 F0.3 B0.0 F0.4'

Not handled: schedules driven by measured costs (that is DIP's search, not a baseline),
memory limits (SEMU checks them), and looped/BFS or V-shaped (ZB-V) placements.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from dipc.errors import ScheduleError
from dipc.ir.instructions import Op
from dipc.ir.program import StageInfo

__all__ = [
    "SCHEDULES",
    "expand_subs",
    "ComputeAction",
    "ScheduleFn",
    "format_compute_orders",
    "get_schedule",
    "gpipe",
    "interleaved_1f1b",
    "one_f_one_b",
    "zero_bubble_h1",
]

_COMPUTE = frozenset({Op.FWD, Op.BWD, Op.BWD_I, Op.BWD_W})
_SHORT = {Op.FWD: "F", Op.BWD: "B", Op.BWD_I: "I", Op.BWD_W: "W"}


@dataclass(frozen=True, slots=True)
class ComputeAction:
    """One compute step of a rank: ``op`` of ``stage`` on microbatch ``mb`` (sub-microbatch ``sub``).

    Prints as ``F<stage>.<mb>`` (``B``, ``I``, ``W`` for BWD, BWD_I, BWD_W), e.g. ``F2.0``; a sub
    adds ``:<sub>``, e.g. ``F0.1:2``.
    """

    op: Op
    stage: int
    mb: int
    sub: int = -1

    def __post_init__(self) -> None:
        if self.op not in _COMPUTE:
            raise ScheduleError(
                f"ComputeAction got op {self.op.value}, which is not a compute op. "
                f"Fix: use one of {sorted(o.value for o in _COMPUTE)}."
            )

    def __str__(self) -> str:
        return f"{_SHORT[self.op]}{self.stage}.{self.mb}" + (f":{self.sub}" if self.sub >= 0 else "")


ScheduleFn = Callable[[Sequence[StageInfo], int, int], list[list[ComputeAction]]]


def format_compute_orders(orders: Sequence[Sequence[ComputeAction]]) -> str:
    """The rank x step grid of a compute order, one rank per line (for dumps and errors)."""
    return "\n".join(f"rank {r}: " + " ".join(map(str, order)) for r, order in enumerate(orders))


# ----------------------------------------------------------------------------------------------
# helpers


def _check_inputs(stages: Sequence[StageInfo], num_ranks: int, num_microbatches: int) -> list[list[int]]:
    """Check the arguments every generator shares; return each rank's stage ids, ascending."""
    if num_ranks < 1:
        raise ScheduleError(f"num_ranks={num_ranks}. Fix: pass at least one rank.")
    if num_microbatches < 1:
        raise ScheduleError(f"num_microbatches={num_microbatches}. Fix: pass at least one microbatch.")
    if not stages:
        raise ScheduleError("no stages to schedule. Fix: partition the model into at least one stage.")
    by_rank: list[list[int]] = [[] for _ in range(num_ranks)]
    for index, st in enumerate(stages):
        if st.id != index:
            raise ScheduleError(
                f"stage at position {index} has id {st.id}. "
                "Fix: list stages by id, 0..S-1, in topological order."
            )
        if not 0 <= st.rank < num_ranks:
            raise ScheduleError(
                f"stage {st.id} is placed on rank {st.rank}, outside 0..{num_ranks - 1}. "
                "Fix: place every stage on an existing rank."
            )
        for p in st.producers:
            if not 0 <= p < st.id:
                raise ScheduleError(
                    f"stage {st.id} reads stage {p}, which is not an earlier stage. "
                    "Fix: number stages in topological order (producers first)."
                )
        extra = set(st.grad_producers) - set(st.producers)
        if extra:
            raise ScheduleError(
                f"stage {st.id} sends gradients to {sorted(extra)}, which it does not read. "
                "Fix: grad_producers must be a subset of producers."
            )
        by_rank[st.rank].append(st.id)
    return by_rank


def _depths(stages: Sequence[StageInfo]) -> list[int]:
    """Longest path (in edges) from each stage to a stage with no consumers."""
    depth = [0] * len(stages)
    for st in reversed(stages):  # ids are topological, so consumers are settled first
        for p in st.producers:
            depth[p] = max(depth[p], depth[st.id] + 1)
    return depth


def _one_stage_per_rank(by_rank: list[list[int]], name: str) -> list[int]:
    for rank, ids in enumerate(by_rank):
        if len(ids) != 1:
            raise ScheduleError(
                f"{name} needs exactly one stage per rank, but rank {rank} holds "
                f"{len(ids)} stage(s) {ids}. Fix: use interleaved_1f1b (or gpipe) for several "
                "stages per rank, or partition into one stage per rank."
            )
    return [ids[0] for ids in by_rank]


def _fwd(stage: int, mb: int) -> ComputeAction:
    return ComputeAction(Op.FWD, stage, mb)


# ----------------------------------------------------------------------------------------------
# generators


def gpipe(stages: Sequence[StageInfo], num_ranks: int, num_microbatches: int) -> list[list[ComputeAction]]:
    """GPipe: every forward, then every backward.

    Forwards run in ascending stage order (each stage over all microbatches), backwards in
    descending stage order, microbatches ascending. Any number of stages per rank (ranks with
    none get an empty list). Deadlock-free for any stage DAG: both phases follow a topological
    order of the whole pipeline.
    """
    by_rank = _check_inputs(stages, num_ranks, num_microbatches)
    mbs = range(num_microbatches)
    orders: list[list[ComputeAction]] = []
    for ids in by_rank:
        order = [_fwd(s, m) for s in ids for m in mbs]
        order += [ComputeAction(Op.BWD, s, m) for s in reversed(ids) for m in mbs]
        orders.append(order)
    return orders


def _one_f_one_b_order(stage: int, warmup: int, num_microbatches: int, bwd: Op) -> list[ComputeAction]:
    """Warmup forwards, then (F, B) pairs, then the remaining backwards."""
    order = [_fwd(stage, m) for m in range(warmup)]
    for i in range(num_microbatches - warmup):
        order += [_fwd(stage, warmup + i), ComputeAction(bwd, stage, i)]
    order += [ComputeAction(bwd, stage, m) for m in range(num_microbatches - warmup, num_microbatches)]
    return order


def one_f_one_b(stages: Sequence[StageInfo], num_ranks: int, num_microbatches: int) -> list[list[ComputeAction]]:
    """1F1B (PipeDream-flush, Megatron's non-interleaved schedule). One stage per rank.

    Rank ``r`` runs ``min(P - r - 1, M)`` warmup forwards, then alternates one forward and one
    backward, then drains the remaining backwards. For a stage DAG the warmup is the stage's
    depth (longest path to an output stage), which equals ``P - r - 1`` on a chain; a consumer
    always has a smaller depth than its producers, which is what keeps the schedule
    deadlock-free.
    """
    by_rank = _check_inputs(stages, num_ranks, num_microbatches)
    stage_of_rank = _one_stage_per_rank(by_rank, "1f1b")
    depth = _depths(stages)
    return [_one_f_one_b_order(s, min(depth[s], num_microbatches), num_microbatches, Op.BWD) for s in stage_of_rank]


def zero_bubble_h1(stages: Sequence[StageInfo], num_ranks: int, num_microbatches: int) -> list[list[ComputeAction]]:
    """ZB-H1 ("Zero Bubble Pipeline Parallelism", Qi et al., ICLR 2024). One stage per rank.

    The backward is split into BWD_I (input gradient, on the critical path) and BWD_W (weight
    gradient, deferrable). The order is 1F1B with BWD_I in place of BWD (same warmup, so every
    BWD_I runs as early as in 1F1B relative to the forwards), and rank ``r`` starts its BWD_W
    ``r`` microbatches late: after the BWD_I of microbatch ``i`` it runs the BWD_W of microbatch
    ``i - r``, from the steady state through the cooldown, and flushes the last ``r`` BWD_W at
    the end, where they fill the tail bubble (the last rank idles there while the final
    gradients travel back to rank 0). On a chain with ``tf = tb_i = tb_w`` the step takes
    ``M (tf + tb_i + tb_w) + (P - 1)(tf + tb_i - tb_w)``: a third of 1F1B's bubble
    ``(P - 1)(tf + tb_i + tb_w)`` (27 vs 33 at P=4, M=8).

    Memory, as in the paper: every rank holds at most ``P`` microbatches between FWD and BWD_W
    (``P - 1 - r`` warmup, one in flight, ``r`` deferred), which is 1F1B's peak (rank 0's) but
    more than 1F1B's ``P - r`` on rank ``r > 0``; between FWD and BWD_I (the full stash) rank
    ``r`` holds at most ``P - r``, exactly like 1F1B. So rank ``r`` exceeds its 1F1B peak only
    by ``r`` BWD_W residues, which stays under rank 0's peak as long as a residue is no larger
    than a full stash. Keeping every rank at its 1F1B count *until BWD_W* instead forces the
    last rank into F, I, W with no deferral and costs at least ``(P - 1)(tf + tb_i)`` of bubble,
    two thirds of 1F1B's (30 at P=4, M=8).

    On a stage DAG the warmup is the stage's depth, as in :func:`one_f_one_b` (the consumer has
    the smaller depth, which keeps it deadlock-free), and the deferral is ``D - depth`` with
    ``D`` the largest depth (``r`` on a chain), so every rank again holds at most ``D + 1``
    microbatches until BWD_W. BWD_W needs no communication, so where it goes never affects
    deadlock freedom.
    """
    by_rank = _check_inputs(stages, num_ranks, num_microbatches)
    stage_of_rank = _one_stage_per_rank(by_rank, "zb_h1")
    depth = _depths(stages)
    deepest = max(depth)
    orders = []
    for s in stage_of_rank:
        warmup = min(depth[s], num_microbatches)
        defer = deepest - depth[s]
        order = [_fwd(s, m) for m in range(warmup)]
        for m in range(num_microbatches):
            if warmup + m < num_microbatches:  # steady state: one forward per BWD_I
                order.append(_fwd(s, warmup + m))
            order.append(ComputeAction(Op.BWD_I, s, m))
            if m >= defer:
                order.append(ComputeAction(Op.BWD_W, s, m - defer))
        # the deferred BWD_W fill the tail, where the next gradient would be waited for
        order += [ComputeAction(Op.BWD_W, s, m)
                  for m in range(max(0, num_microbatches - defer), num_microbatches)]
        orders.append(order)
    return orders


def _megatron_table(num_microbatches: int, num_chunks: int, group_size: int) -> tuple[list[tuple[int, int]], int]:
    """Megatron's virtual-pipeline schedule table, and the size of its largest microbatch group.

    The k-th forward of a rank is ``table[k] = (mb, chunk)``: microbatches go in groups of
    ``group_size``, and each group runs through chunk 0, then chunk 1, ... When ``group_size``
    does not divide ``num_microbatches``, the remainder joins the *last* group (so it holds
    ``group_size .. 2 * group_size - 1`` microbatches), and with fewer microbatches than
    ``group_size`` there is a single group of all of them. (Megatron-core instead makes the
    last group smaller; under blocking receives that deadlocks, e.g. P=4, V=3, M=5, because a
    small group reaches its next chunk before the pipeline has carried it there.)
    """
    num_groups = max(1, num_microbatches // group_size)
    table = []
    for g in range(num_groups):
        end = num_microbatches if g == num_groups - 1 else (g + 1) * group_size
        table += [(m, c) for c in range(num_chunks) for m in range(g * group_size, end)]
    largest = max(group_size, num_microbatches - (num_groups - 1) * group_size) if num_groups > 1 else num_microbatches
    return table, largest


def interleaved_1f1b(
    stages: Sequence[StageInfo], num_ranks: int, num_microbatches: int
) -> list[list[ComputeAction]]:
    """Interleaved 1F1B (Megatron-LM virtual pipeline, Narayanan et al. 2021). V chunks per rank.

    Every rank must hold the same number V of stages; its chunks are its stages in ascending id
    order (chunk ``c`` of rank ``r`` is stage ``c * P + r`` in the usual placement). Forward
    ``k`` runs chunk ``(k // P) % V`` on microbatches taken group-wise (P at a time); backward
    ``k`` runs the same table with the chunks reversed. Rank ``r`` warms up with
    ``(P - r - 1) * 2 + (V - 1) * G`` forwards, ``G = P`` the group size (all of them when
    ``M == P``, as Megatron does), capped at ``M * V``; then it alternates forward/backward, then
    drains. Here ``r`` is the rank's position in the pipeline (ranks sorted by their first
    stage), which is the rank itself in the usual placement.

    Megatron requires ``M % P == 0``. Here any ``M >= 1`` works: the remainder joins the last
    group, and ``G`` is then the largest group's size (``M`` when ``M < P``), which costs
    warmup memory only in that case; the property tests check deadlock freedom. With ``V == 1``
    this is plain 1F1B (Megatron never interleaves one chunk; its formula would double the
    warmup). Not guaranteed for placements other than round-robin (the warmup assumes each
    chunk hands over to the next rank); validate such programs before running them.
    """
    by_rank = _check_inputs(stages, num_ranks, num_microbatches)
    num_chunks = len(by_rank[0])
    uneven = [r for r, ids in enumerate(by_rank) if len(ids) != num_chunks]
    if num_chunks == 0 or uneven:
        raise ScheduleError(
            "interleaved_1f1b needs the same number of stages on every rank, got "
            f"{[len(ids) for ids in by_rank]} stages per rank. "
            "Fix: partition into P * V stages placed round-robin (stage s on rank s % P), or use gpipe."
        )
    if num_chunks == 1:
        return one_f_one_b(stages, num_ranks, num_microbatches)
    total = num_microbatches * num_chunks
    table, group = _megatron_table(num_microbatches, num_chunks, num_ranks)
    position = {r: i for i, r in enumerate(sorted(range(num_ranks), key=lambda r: by_rank[r][0]))}
    orders = []
    for rank, chunks in enumerate(by_rank):
        if num_microbatches == num_ranks:
            warmup = total
        else:
            warmup = min((num_ranks - position[rank] - 1) * 2 + (num_chunks - 1) * group, total)
        fwd = [_fwd(chunks[c], m) for m, c in table]
        bwd = [ComputeAction(Op.BWD, chunks[num_chunks - 1 - c], m) for m, c in table]
        order = fwd[:warmup]
        for k in range(total - warmup):
            order += [fwd[warmup + k], bwd[k]]
        order += bwd[total - warmup:]
        orders.append(order)
    return orders


def _dual_queue(stages: Sequence[StageInfo], num_ranks: int, num_microbatches: int) -> list[list[ComputeAction]]:
    """DIP's dual-queue interleaving with unit costs (it lives in :mod:`dipc.passes.dual_queue`)."""
    from dipc.passes.dual_queue import dual_queue

    return dual_queue(stages, num_ranks, num_microbatches)


SCHEDULES: dict[str, ScheduleFn] = {
    "gpipe": gpipe,
    "1f1b": one_f_one_b,
    "interleaved_1f1b": interleaved_1f1b,
    "zb_h1": zero_bubble_h1,
    "dual_queue": _dual_queue,
}


def expand_subs(orders: Sequence[Sequence[ComputeAction]], stages: Sequence[StageInfo],
                subs: Sequence[tuple[str, Sequence[int]]]) -> list[list[ComputeAction]]:
    """Run every action of a split stage once per sub, the subs of one microbatch back to back.

    This is how the baseline generators (which order whole microbatches) serve programs with
    sub-microbatches: each microbatch-level action of a stage whose modality ``subs`` splits
    becomes a block of consecutive actions ``sub=0..n-1``. Every dependency between blocks is
    one the microbatch-level order already respected (a consumer's FWD needs the whole block, a
    sub's backward needs the consumer's backward of that microbatch, sub j of a split consumer
    needs sub j of its producer, which comes in the producer's block), so a deadlock-free
    microbatch order stays deadlock-free. The dual-queue scheduler instead schedules subs as
    separate tasks (that is what lets them fill gaps).
    """
    from dipc.ir.program import sub_indices

    subs_t = tuple((name, tuple(counts)) for name, counts in subs)
    out: list[list[ComputeAction]] = []
    for order in orders:
        expanded: list[ComputeAction] = []
        for a in order:
            expanded.extend(ComputeAction(a.op, a.stage, a.mb, j)
                            for j in sub_indices(subs_t, stages[a.stage].modality, a.mb))
        out.append(expanded)
    return out


def get_schedule(name: str) -> ScheduleFn:
    """The generator registered under ``name`` (see :data:`SCHEDULES`)."""
    try:
        return SCHEDULES[name]
    except KeyError:
        raise ScheduleError(
            f"unknown schedule {name!r}. Fix: use one of {', '.join(sorted(SCHEDULES))}."
        ) from None
