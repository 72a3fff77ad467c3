"""Runs every rank's stream in one process, interleaving ranks cooperatively (for debugging and
equivalence tests: the same interpreter and messages as the distributed executor)."""
from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

from dipc.errors import ScheduleError
from dipc.ir import Program
from dipc.passes.partition import StageSpec
from dipc.runtime.interpreter import RankInterpreter, StepStats
from dipc.runtime.recompute import apply_recompute
from dipc.runtime.timeline import MeasuredTimeline
from dipc.runtime.transport import LocalTransport


def run_local(program: Program, stages: Sequence[StageSpec], microbatches: Sequence[Mapping],
              loss_weights: Sequence[float], treespecs: Mapping[str, Any],
              optimizer_step: Callable[[], None] | None = None,
              sub_batches: Mapping[tuple[str, int, int], Mapping[str, Any]] | None = None,
              record_timeline: bool = False) -> list[StepStats]:
    """Run every rank's stream; returns each rank's stats. With ``record_timeline`` each stats'
    ``spans`` hold the executed instructions' wall-clock intervals (see :func:`local_timeline`)."""
    apply_recompute(program, stages)   # the program's activation-checkpointing choice
    transport = LocalTransport()
    ranks = [RankInterpreter(r, program, stages, microbatches, loss_weights, transport, treespecs,
                             sub_batches=sub_batches, record_timeline=record_timeline)
             for r in range(program.num_ranks)]
    while not all(r.done for r in ranks):
        progressed = False
        for r in ranks:
            progressed |= r.run(until_blocked=True)
        if not progressed:
            blocked = "; ".join(f"rank {r.rank} at step {r.pc}: {r.stream[r.pc]}" for r in ranks if not r.done)
            raise ScheduleError(f"local execution deadlocked: {blocked}. Fix: validate the program "
                                "(dipc.ir.validate) — every receive needs a matching earlier send.")
    if optimizer_step is not None:
        optimizer_step()
    return [r.stats for r in ranks]


def local_timeline(program: Program, stats: Sequence[StepStats], origin: float) -> MeasuredTimeline:
    """All ranks' recorded spans as one timeline; ``origin`` is the ``time.perf_counter()`` reading
    taken when the step began (every rank of the local executor shares this process's clock)."""
    spans = [s for st in stats for s in (st.spans or ())]
    return MeasuredTimeline.from_raw(program, spans, origin, executor="local")
