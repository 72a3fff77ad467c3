"""Plan batch i+1 on CPU workers while batch i trains (the paper's online loop, §2.3).

:class:`AsyncPlanner` forks worker processes once, after ``dipc.compile``: they inherit the
compiled pipeline (stage graphs, shape templates, cost model) without pickling it, and each plan
request ships only the microbatches. Planning is Python-heavy (shape inference, the dual queue,
SEMU), so a process, not a thread, keeps it off the training loop's interpreter lock.

The loop::

    planner = AsyncPlanner(pipe, plan_fn)          # plan_fn(pipe, mbs) -> Program (default: pipe.plan)
    planner.submit(0, batches[0])
    for i, mbs in enumerate(batches):
        if i + 1 < len(batches):
            planner.submit(i + 1, batches[i + 1])   # blocks while `depth` plans are pending (back-pressure)
        outcome = planner.get(i, mbs)              # the worker's plan, validated, or a fallback
        pipe.step(mbs, outcome.program)

Choices (the paper leaves them open):

- a plan that is late (not done ``deadline_s`` after ``get`` asks for it) or fails is replaced
  by the *last valid schedule* — the previous plan's compute order per rank, re-lowered with this
  batch's shapes (orders are shape-free, shapes are not) — or, with no previous plan or a
  different microbatch count, by the pipeline's static schedule; ``outcome.source`` says which,
  ``outcome.reason`` why;
- every program is validated in this process before it is returned, whoever built it;
- workers default to half the CPU cores (at least one), as the paper caps its search;
- under torch.distributed only one process plans (rank 0 by default) and
  :func:`broadcast_program` sends the program text to the others, which parse it, so every rank
  runs the same program even when the planner is not deterministic (a time-budgeted search).
"""
from __future__ import annotations

import multiprocessing
import os
import time
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Hashable, Mapping, Sequence

from dipc.errors import DipcError
from dipc.ir import COMPUTE_OPS, Program
from dipc.ir.validate import validate

if TYPE_CHECKING:
    from dipc.api import CompiledPipeline

__all__ = ["AsyncPlanner", "PlanOutcome", "broadcast_program", "compute_orders_of"]

PlanFn = Callable[["CompiledPipeline", Sequence[Mapping[str, Any]]], Program]

_WORKER: dict[str, Any] = {}      # what a forked worker inherited: the pipeline and the plan function


def _init_worker() -> None:
    import torch

    torch.set_num_threads(1)       # planning is tiny tensor work; do not fight the trainer for cores


def _plan_in_worker(microbatches: Sequence[Mapping[str, Any]]) -> tuple[Program, float]:
    t0 = time.perf_counter()
    program = _WORKER["plan_fn"](_WORKER["pipe"], microbatches)
    return program, time.perf_counter() - t0


def _default_plan(pipe: "CompiledPipeline", microbatches: Sequence[Mapping[str, Any]]) -> Program:
    return pipe.plan(microbatches)


def compute_orders_of(program: Program) -> list[list[Any]]:
    """The compute order per rank of a program (what a schedule generator returns)."""
    from dipc.passes.schedules import ComputeAction

    return [[ComputeAction(i.op, i.stage, i.mb, i.sub) for i in stream if i.op in COMPUTE_OPS]
            for stream in program.streams]


@dataclass(frozen=True)
class PlanOutcome:
    """A validated program and where it came from: ``"worker"`` (planned ahead), ``"fallback"``
    (last valid schedule re-lowered, or the static schedule) — ``reason`` says why."""

    program: Program
    source: str
    wait_s: float
    plan_s: float | None = None
    reason: str = ""


class AsyncPlanner:
    """Plans submitted batches on forked CPU workers; see the module docstring."""

    def __init__(self, pipe: "CompiledPipeline", plan_fn: PlanFn | None = None, *, workers: int | None = None,
                 deadline_s: float | None = None, depth: int = 2):
        if depth < 1:
            raise DipcError(f"depth={depth}. Fix: allow at least one pending plan (depth >= 1).")
        self.pipe = pipe
        self.plan_fn = plan_fn or _default_plan
        self.deadline_s = deadline_s
        self.depth = depth
        self.workers = workers or max(1, (os.cpu_count() or 2) // 2)
        self._pending: dict[Hashable, Future] = {}
        self._last: Program | None = None
        _WORKER.update(pipe=pipe, plan_fn=self.plan_fn)   # inherited by the fork, never pickled
        self._pool = ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("fork"),
                                         initializer=_init_worker)
        self.stats = {"worker": 0, "fallback": 0, "wait_s": 0.0}

    # -- submitting ---------------------------------------------------------------------------
    def submit(self, key: Hashable, microbatches: Sequence[Mapping[str, Any]]) -> None:
        """Start planning ``microbatches`` under ``key``; waits for the oldest pending plan first
        when ``depth`` plans are already pending (back-pressure: planning cannot run away)."""
        if key in self._pending:
            raise DipcError(f"a plan for {key!r} is already pending. Fix: submit each batch once.")
        if len(self._pending) >= self.depth:
            oldest = next(iter(self._pending.values()))
            try:
                oldest.result()                # wait for it; its outcome is reported by get()
            except Exception:  # noqa: BLE001
                pass
        self._pending[key] = self._pool.submit(_plan_in_worker, [dict(mb) for mb in microbatches])

    # -- collecting ---------------------------------------------------------------------------
    def get(self, key: Hashable, microbatches: Sequence[Mapping[str, Any]]) -> PlanOutcome:
        """The plan for ``key`` (validated), or a fallback if it is late, failed or was never
        submitted."""
        t0 = time.perf_counter()
        future = self._pending.pop(key, None)
        reason = ""
        if future is None:
            reason = f"no plan was submitted for {key!r}"
        else:
            try:
                program, plan_s = future.result(timeout=self.deadline_s)
                self.pipe.check_program(program, microbatches)
                validate(program)
            except FutureTimeout:
                future.cancel()
                reason = f"the plan was not ready {self.deadline_s} s after it was needed"
            except Exception as e:  # noqa: BLE001 - any planner failure falls back, with its reason
                reason = f"planning failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}"
            else:
                self._last = program
                return self._outcome(program, "worker", t0, plan_s)
        return self._outcome(self._fallback(microbatches), "fallback", t0, None, reason)

    def _outcome(self, program: Program, source: str, t0: float, plan_s: float | None,
                 reason: str = "") -> PlanOutcome:
        wait = time.perf_counter() - t0
        self.stats[source] += 1
        self.stats["wait_s"] += wait
        return PlanOutcome(program=program, source=source, wait_s=wait, plan_s=plan_s, reason=reason)

    def _fallback(self, microbatches: Sequence[Mapping[str, Any]]) -> Program:
        last = self._last
        if last is not None and last.num_microbatches == len(microbatches) and not last.subs:
            program = self.pipe.plan(microbatches, schedule=last.schedule, compute_orders=compute_orders_of(last))
        else:   # a static schedule: cheap, where the pipeline's own may be DIP's search
            program = self.pipe.plan(microbatches, schedule=self.pipe.fallback_schedule())
        self._last = program
        return program

    def close(self) -> None:
        for f in self._pending.values():
            f.cancel()
        self._pending.clear()
        self._pool.shutdown(wait=False, cancel_futures=True)

    def __enter__(self) -> "AsyncPlanner":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def broadcast_program(program: Program | None, src: int = 0, group=None) -> Program:
    """``program`` on rank ``src``, parsed from its text dump on every other rank of ``group``."""
    import torch.distributed as dist

    from dipc.ir.text import dump_program, parse_program
    from dipc.runtime.distributed import collective

    rank = dist.get_rank()
    if rank == src and program is None:
        raise DipcError(f"rank {src} broadcasts the plan but has none. Fix: plan on the source rank.")
    box = [dump_program(program) if rank == src else None]
    collective("plan broadcast", rank, lambda: dist.broadcast_object_list(box, src=src, group=group))
    return program if rank == src else parse_program(box[0])
