"""Encoder look-ahead orders: the backbone's own static schedule with the encoders' work woven
around it (a candidate family of DIP's per-batch planner, beyond the paper's dual queue).

An LMM's encoders (vision, audio, a T2V text encoder...) feed the backbone but take no input from
it, so their forwards can run any time before the backbone needs them and their backwards any
time after the backbone's input gradient comes back. :func:`encoder_ahead_orders` runs each
rank's backbone stages under the backbone's static schedule (interleaved 1F1B, 1F1B or ZB-H1)
and inserts the encoder forwards of microbatch ``m + ahead`` before the rank's first backbone
forward of ``m``, and the encoder backwards of ``m`` after its last backbone backward of
``m + lag``. ``ahead=None`` is Optimus's coarse order: every encoder forward first, every encoder
backward last (fills the backbone's warm-up at once, but keeps every encoder stash alive); a small
``ahead`` keeps fewer stashes alive. The dual queue reaches neither shape: it alternates forwards
and backwards as soon as both are ready.

Why it pays: on image-heavy batches the encoder's work fills the backbone's warm-up and cool-down
bubbles, which the static schedules leave empty (``benchmarks/schedule_quality.py``: VLM-S DIP
+sub-microbatches 1.51x -> +encoder-first order 1.75x Megatron-LM's throughput).
"""
from __future__ import annotations

from collections.abc import Sequence

from dipc.errors import ScheduleError
from dipc.ir.instructions import Op
from dipc.ir.program import StageInfo
from dipc.passes.schedules import SCHEDULES, ComputeAction, expand_subs

__all__ = ["ENCODER_AHEAD", "BACKBONE", "backbone_schedules", "check_no_wait_cycle", "encoder_ahead_orders"]

BACKBONE = "backbone"
# (ahead, lag) pairs the planner tries beside the coarse order (ahead=None): measured on the paper's
# VLM/T2V workloads, deeper look-ahead never won once memory was fitted
ENCODER_AHEAD = ((2, 2), (3, 2), (4, 4))


def _split(stages: Sequence[StageInfo]) -> tuple[list[StageInfo], list[StageInfo]]:
    """(encoder stages, backbone stages); ScheduleError unless the encoders come first by id and
    take no input from the backbone (the shape :func:`encoder_ahead_orders` needs)."""
    enc = [s for s in stages if s.modality != BACKBONE]
    lm = [s for s in stages if s.modality == BACKBONE]
    if not enc or not lm:
        raise ScheduleError("encoder look-ahead orders need encoder stages and backbone stages; this layout has "
                            f"{'no encoder' if not enc else 'no backbone'} stage. Fix: use a static schedule.")
    base = len(enc)
    if any(s.id >= base for s in enc) or any(p >= base for s in enc for p in s.producers):
        raise ScheduleError("encoder look-ahead orders need every encoder stage before the backbone's (by stage id) "
                            "and fed by no backbone stage. Fix: use a static schedule or the dual queue.")
    return enc, lm


def backbone_schedules(stages: Sequence[StageInfo], num_ranks: int) -> list[str]:
    """The static schedules the backbone can run under in :func:`encoder_ahead_orders`: 1F1B and
    ZB-H1 with one backbone stage per rank, interleaved 1F1B with the same number (> 1) on every
    rank; GPipe otherwise (an uneven placement, which the others do not define)."""
    _, lm = _split(stages)
    per_rank = [sum(s.rank == r for s in lm) for r in range(num_ranks)]
    if all(n == 1 for n in per_rank):
        return ["1f1b", "zb_h1"]
    if len(set(per_rank)) == 1:
        return ["interleaved_1f1b"]
    return ["gpipe"]


def encoder_ahead_orders(stages: Sequence[StageInfo], num_ranks: int, num_microbatches: int,
                         subs: Sequence[tuple[str, Sequence[int]]] = (), ahead: int | None = None, lag: int = 1,
                         backbone: str | None = None) -> list[list[ComputeAction]]:
    """Per rank, the backbone's ``backbone`` schedule (default: the first of
    :func:`backbone_schedules`) with the encoder forwards of microbatch ``m + ahead`` before the
    rank's first backbone forward of ``m`` and the encoder backwards of ``m`` after its last
    backbone backward of ``m + lag`` (the rest at the end); ``ahead=None``: every encoder
    forward first and every encoder backward last. ``subs`` (``Program.subs``) runs split stages
    once per sub-microbatch.

    The look-ahead is counted on each rank's own backbone order, so on deep pipelines a rank with
    a short warm-up can hold back encoder work a rank with a long one waits for: such orders raise
    ScheduleError (:func:`check_no_wait_cycle`), before any lowering."""
    enc, lm = _split(stages)
    P, M = num_ranks, num_microbatches
    base = len(enc)
    sub = [StageInfo(id=s.id - base, rank=s.rank, modality=s.modality,
                     producers=tuple(p - base for p in s.producers if p >= base),
                     grad_producers=tuple(p - base for p in s.grad_producers if p >= base),
                     loads=s.loads, has_loss=s.has_loss) for s in lm]
    lm_sched = SCHEDULES[backbone or backbone_schedules(stages, P)[0]](sub, P, M)
    orders = []
    for r in range(P):
        mine = [s.id for s in enc if s.rank == r]
        body = [ComputeAction(a.op, a.stage + base, a.mb) for a in lm_sched[r]]
        if ahead is None:
            head = [ComputeAction(Op.FWD, s, m) for m in range(M) for s in mine]
            tail = [ComputeAction(Op.BWD, s, m) for m in range(M) for s in reversed(mine)]
            orders.append(head + body + tail)
            continue
        last_bwd = {a.mb: i for i, a in enumerate(body) if a.op is Op.BWD or a.op is Op.BWD_I}   # W: local
        out: list[ComputeAction] = []
        fwd_next = bwd_next = 0            # next microbatch whose encoder forwards / backwards to emit
        seen: set[int] = set()
        for i, a in enumerate(body):
            if a.op is Op.FWD and a.mb not in seen:
                seen.add(a.mb)
                while fwd_next <= min(M - 1, a.mb + ahead):
                    out.extend(ComputeAction(Op.FWD, s, fwd_next) for s in mine)
                    fwd_next += 1
            out.append(a)
            if a.op is not Op.FWD and last_bwd.get(a.mb) == i:   # the backbone's input gradient is out
                while bwd_next <= a.mb - lag and bwd_next < fwd_next:
                    out.extend(ComputeAction(Op.BWD, s, bwd_next) for s in reversed(mine))
                    bwd_next += 1
        while fwd_next < M:
            out.extend(ComputeAction(Op.FWD, s, fwd_next) for s in mine)
            fwd_next += 1
        while bwd_next < M:
            out.extend(ComputeAction(Op.BWD, s, bwd_next) for s in reversed(mine))
            bwd_next += 1
        orders.append(out)
    check_no_wait_cycle(stages, orders)
    return expand_subs(orders, stages, subs) if subs else orders


def check_no_wait_cycle(stages: Sequence[StageInfo], orders: Sequence[Sequence[ComputeAction]]) -> dict:
    """Start step of every (FWD or BWD, stage, mb) when each action takes one step, or
    ScheduleError if the per-rank orders wait on each other in a cycle (a forward needs its
    producers' forwards, a backward its consumers' backwards and its own forward; BWD_I and BWD_W
    count as the backward)."""
    consumers = {s.id: [c.id for c in stages if s.id in c.grad_producers] for s in stages}
    done: dict[tuple, int] = {}
    pc = [0] * len(orders)
    clock = [0] * len(orders)
    progress = True
    while progress:
        progress = False
        for r, order in enumerate(orders):
            while pc[r] < len(order):
                a = order[pc[r]]
                if a.op is Op.FWD:
                    deps = [(Op.FWD, p, a.mb) for p in stages[a.stage].producers]
                else:
                    deps = [(Op.BWD, c, a.mb) for c in consumers[a.stage]] + [(Op.FWD, a.stage, a.mb)]
                if any(d not in done for d in deps):
                    break
                t = max([clock[r]] + [done[d] + 1 for d in deps])
                done[(Op.FWD if a.op is Op.FWD else Op.BWD, a.stage, a.mb)] = t
                clock[r] = t + 1
                pc[r] += 1
                progress = True
    if any(pc[r] < len(o) for r, o in enumerate(orders)):
        raise ScheduleError(f"the compute orders deadlock (ranks stop at actions {pc}). Fix: reorder them so every "
                            "action's producers come first in time.")
    return done
