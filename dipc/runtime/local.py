"""Runs every rank's stream in one process, interleaving ranks cooperatively (for debugging and
equivalence tests: the same interpreter and messages as the distributed executor)."""
from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

from dipc.errors import ScheduleError
from dipc.ir import Program
from dipc.passes.partition import StageSpec
from dipc.runtime.interpreter import RankInterpreter, StepStats
from dipc.runtime.recompute import apply_recompute
from dipc.runtime.transport import LocalTransport


def run_local(program: Program, stages: Sequence[StageSpec], microbatches: Sequence[Mapping],
              loss_weights: Sequence[float], treespecs: Mapping[str, Any],
              optimizer_step: Callable[[], None] | None = None) -> list[StepStats]:
    apply_recompute(program, stages)   # the program's activation-checkpointing choice
    transport = LocalTransport()
    ranks = [RankInterpreter(r, program, stages, microbatches, loss_weights, transport, treespecs)
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
