"""Pick the fastest of a planner's candidate programs after phase 3, running phase 3 on as few as possible.

Phase 3 (the per-rank recompute ILP, :mod:`dipc.semu.memory_opt`) costs several plain
simulations, so running it on every candidate dominated DIP's planning time. Instead every
candidate is simulated once as it is. That step time is a **lower bound** on its time after
phase 3: recomputation only lengthens backward instructions, and with every rank's order fixed
the emulator's step time never falls when an instruction gets longer (start times are maxima of
sums of durations). A candidate that already fits memory has its exact time.

A candidate may also come with a cheaper bound, known before it is lowered: e.g.
:func:`dipc.semu.order_bound.order_lower_bound`, its compute orders timed without messages. Then
the search is best first over three levels of bounds (cheap bound -> plain simulation -> phase
3): always refine the candidate with the lowest bound so far, stop when the lowest is exact. The
winner is the one fitting every candidate would give (up to ties), candidates whose cheap bound
is already slower than it are never lowered or simulated, and usually only one or two ILPs run.
"""
from __future__ import annotations

import gc
import heapq
import math
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from dipc.errors import DipcError, InfeasibleMemoryError
from dipc.ir import Program
from dipc.semu.emulator import SimResult

__all__ = ["Choice", "gc_paused", "pick_fastest"]

Build = Callable[[], tuple[Program, Any]]                  # -> (program, the cost model that scores it)
Simulate = Callable[[Program, Any], SimResult]
Fit = Callable[[Program, Any], tuple[Program, SimResult]]
Bound = Callable[[], float]                                # a lower bound of the plain step time, cheap


@dataclass(frozen=True)
class Choice:
    """The winner (its program as fitted, its simulated result), how many candidates were simulated
    and fitted, each candidate's lower bound (``inf``: it did not lower or simulate) and the
    errors of the candidates that could not be fitted."""

    label: str
    program: Program
    result: SimResult
    simulated: int
    fitted: int
    bounds: dict[str, float] = field(default_factory=dict)
    failures: dict[str, str] = field(default_factory=dict)
    model: Any = None                  # the cost model that scored the winner (its build's)


@contextmanager
def gc_paused() -> Iterator[None]:
    """Pause Python's cyclic garbage collector while a plan is made; collect its youngest
    generation after. Lowering and emulating a VLM-L candidate allocate ~10^5 short-lived objects,
    which trigger full collections that walk the whole heap (the model, SEMU's caches) several
    times per plan: ~30% of the planner's CPU time. A plan must leave no reference cycles (see
    :func:`_dropped`): reference counting then frees its objects when the caller drops them.

    Tried and dropped: promoting what a plan leaves alive to the oldest generation in constant
    time (``gc.freeze()`` + ``gc.unfreeze()``) instead of this collection, which walks it. It
    saved ~0.25 s per VLM-L plan at 64 microbatches, but it bypasses CPython's count of objects
    reaching the oldest generation, which is what triggers its full collections, so it needed a
    forced full collection every few plans (~1 s there): ~4% on average, and a spike."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()
            gc.collect(0)


def _dropped(error: DipcError) -> str:
    """A failed candidate's one-line reason. The error loses its traceback: a candidate (a
    planner's memo of orders that failed) or this search (the closest infeasible fit) may keep
    the error, and the traceback's frames refer back to its keeper: a reference cycle that held
    the plan's orders and cost models until the next full collection (~0.7M objects per VLM-L
    plan at 64 microbatches)."""
    error.with_traceback(None)
    return f"{type(error).__name__}: {str(error).splitlines()[0]}"


def _fits(result: SimResult, capacity: Sequence[float]) -> bool:
    return result.peak_memory is not None and all(p <= c for p, c in zip(result.peak_memory, capacity))


def pick_fastest(candidates: Iterable[tuple[str, Build] | tuple[str, Build, Bound]], simulate: Simulate,
                 capacity: float | Sequence[float], fit: Fit, num_ranks: int,
                 max_fits: int | Mapping[str, int] | None = None, groups: Mapping[str, str] | None = None,
                 deadline: float | None = None, incumbent: float | None = None) -> Choice | None:
    """The candidate with the lowest step time once it fits ``capacity`` (bytes per rank, static
    memory included). ``candidates`` yields (label, build) or (label, build, bound) where
    ``build()`` returns the lowered program and the cost model that scores it (candidates may
    differ, e.g. with and without sub-microbatches) and ``bound()`` a lower bound of its plain
    step time (cheaper than building it); a :class:`~dipc.errors.DipcError` from either drops the
    candidate. ``simulate(program, model)`` gives the plain result; ``fit(program, model)`` is
    phase 3, returning the fitted program and its result, or raising :class:`InfeasibleMemoryError`.
    At most ``max_fits`` phase-3 runs (cheapest plain bounds first); with ``groups`` (label ->
    group, default ``""``) and a mapping ``max_fits`` (group -> runs; a group not named is not
    capped), each group has its own budget, so candidates added to a planner cannot take the
    phase-3 runs its other candidates had before. ``Choice.bounds`` holds each
    candidate's tightest known lower bound (its plain time when it was simulated).
    ``deadline`` (a ``time.perf_counter()`` time) makes the search anytime: past it, the best
    candidate fitted so far wins (no further phase-3 run starts; candidates that fit as they are
    still count), and with none fitted yet the search goes on until one fits.
    ``incumbent``: a step time found elsewhere (another plan of the same batch) that a winner must
    beat; candidates whose bound is not below it are never built, and None is returned when none
    can beat it.
    Raises the closest :class:`InfeasibleMemoryError` if nothing fits."""
    caps = [float(capacity)] * num_ranks if isinstance(capacity, (int, float)) else [float(c) for c in capacity]
    bounds: dict[str, float] = {}
    failures: dict[str, str] = {}
    # (bound, -level, arrival, label, payload): level 0 = cheap bound (payload: build), 1 = simulated
    # but over memory (payload: program, model), 2 = exact (payload: program, result); on equal
    # bounds the exact entry comes first, so a tie is never refined
    heap: list[tuple[float, int, int, str, Any]] = []
    for n, (label, build, *rest) in enumerate(candidates):
        bound = -math.inf
        if rest:
            try:
                bound = float(rest[0]())
            except DipcError as e:
                bounds[label] = float("inf")
                failures[label] = _dropped(e)
                continue
            bounds[label] = bound
        heap.append((bound, 0, n, label, build))
    if incumbent is not None:   # exact, so it wins against every candidate whose bound is not lower
        heap.append((float(incumbent), -2, -1, "", None))
    heapq.heapify(heap)
    arrival = len(heap)
    simulated = fitted = 0
    errors: list[InfeasibleMemoryError] = []
    deferred: list[tuple[float, str, Any]] = []
    used: dict[str, int] = {}                    # phase-3 runs per group
    best_exact: tuple[float, str, Any] | None = None   # the fastest fitted so far, for a search out of time

    def _fit(label: str, payload: tuple[Program, Any]) -> tuple[Program, SimResult] | None:
        try:
            return fit(*payload)
        except InfeasibleMemoryError as e:
            failures[label] = _dropped(e)   # kept in ``errors``: its traceback's frames hold ``errors``
            errors.append(e)
            return None

    while heap:
        bound, level, _, label, payload = heapq.heappop(heap)
        level = -level
        if level == 2:                           # exact and no other bound is lower: the winner
            if payload is None:
                return None                      # the incumbent: no candidate beats it
            program, result, model = payload
            return Choice(label=label, program=program, result=result, simulated=simulated, fitted=fitted,
                          bounds=bounds, failures=failures, model=model)
        if level == 0:
            try:
                program, model = payload()
                result = simulate(program, model)
            except DipcError as e:
                bounds[label] = float("inf")
                failures[label] = _dropped(e)
                continue
            simulated += 1
            bounds[label] = result.step_time
            if _fits(result, caps):
                heapq.heappush(heap, (result.step_time, -2, arrival, label, (program, result, model)))
                if best_exact is None or result.step_time < best_exact[0]:
                    best_exact = (result.step_time, label, (program, result, model))
            else:
                heapq.heappush(heap, (result.step_time, -1, arrival, label, (program, model)))
            arrival += 1
            continue
        if best_exact is not None and deadline is not None and time.perf_counter() > deadline:
            _, label, (program, result, model) = best_exact   # out of time: the best fitted so far
            return Choice(label=label, program=program, result=result, simulated=simulated, fitted=fitted,
                          bounds=bounds, failures=failures, model=model)
        group = groups.get(label, "") if groups is not None else ""
        cap = max_fits.get(group) if isinstance(max_fits, Mapping) else max_fits
        if cap is not None and used.get(group, 0) >= cap:
            deferred.append((bound, label, payload))   # out of phase-3 runs: only fitting candidates remain,
            continue                                   # unless none does
        used[group] = used.get(group, 0) + 1
        fitted += 1
        got = _fit(label, payload)
        if got is not None:
            heapq.heappush(heap, (got[1].step_time, -2, arrival, label, (*got, payload[1])))
            arrival += 1
            if best_exact is None or got[1].step_time < best_exact[0]:
                best_exact = (got[1].step_time, label, (*got, payload[1]))
    for _, label, payload in deferred:        # nothing fits as it is: fit past max_fits until one does
        fitted += 1
        got = _fit(label, payload)
        if got is not None:
            return Choice(label=label, program=got[0], result=got[1], simulated=simulated, fitted=fitted,
                          bounds=bounds, failures=failures, model=payload[1])
    if errors:
        raise min(errors, key=lambda e: e.excess)
    raise InfeasibleMemoryError(f"no candidate could be lowered and simulated: {failures}. Fix: check the "
                                "candidate generators' orders (dipc.ir.validate).")
