"""Pick the fastest of a planner's candidate programs after phase 3, running phase 3 on as few as possible.

Phase 3 (the per-rank recompute ILP, :mod:`dipc.semu.memory_opt`) costs several plain
simulations, so running it on every candidate dominated DIP's planning time. Instead every
candidate is simulated once as it is. That step time is a **lower bound** on its time after
phase 3: recomputation only lengthens backward instructions, and with every rank's order fixed
the emulator's step time never falls when an instruction gets longer (start times are maxima of
sums of durations). A candidate that already fits memory has its exact time. The others are
fitted in ascending lower-bound order, stopping as soon as the next bound is no better than the
best time found: the winner is the one fitting every candidate would give (up to ties), and
usually only one or two ILPs run. Branch and bound, one level deep.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from dipc.errors import DipcError, InfeasibleMemoryError
from dipc.ir import Program
from dipc.semu.emulator import SimResult

__all__ = ["Choice", "pick_fastest"]

Build = Callable[[], tuple[Program, Any]]                  # -> (program, the cost model that scores it)
Simulate = Callable[[Program, Any], SimResult]
Fit = Callable[[Program, Any], tuple[Program, SimResult]]


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


def _fits(result: SimResult, capacity: Sequence[float]) -> bool:
    return result.peak_memory is not None and all(p <= c for p, c in zip(result.peak_memory, capacity))


def pick_fastest(candidates: Iterable[tuple[str, Build]], simulate: Simulate, capacity: float | Sequence[float],
                 fit: Fit, num_ranks: int, max_fits: int | None = None) -> Choice:
    """The candidate with the lowest step time once it fits ``capacity`` (bytes per rank, static
    memory included). ``candidates`` yields (label, build) where ``build()`` returns the lowered
    program and the cost model that scores it (candidates may differ, e.g. with and without
    sub-microbatches); a :class:`~dipc.errors.DipcError` drops the candidate. ``simulate(program,
    model)`` gives the plain result; ``fit(program, model)`` is phase 3, returning the fitted
    program and its result, or raising :class:`InfeasibleMemoryError`.
    Raises the closest :class:`InfeasibleMemoryError` if nothing fits."""
    caps = [float(capacity)] * num_ranks if isinstance(capacity, (int, float)) else [float(c) for c in capacity]
    bounds: dict[str, float] = {}
    failures: dict[str, str] = {}
    over: list[tuple[float, str, Program, Any]] = []
    best: tuple[float, str, Program, SimResult] | None = None
    simulated = 0
    for label, build in candidates:
        try:
            program, model = build()
            result = simulate(program, model)
        except DipcError as e:
            bounds[label] = float("inf")
            failures[label] = f"{type(e).__name__}: {str(e).splitlines()[0]}"
            continue
        simulated += 1
        bounds[label] = result.step_time
        if _fits(result, caps):
            if best is None or result.step_time < best[0]:
                best = (result.step_time, label, program, result)
        else:
            over.append((result.step_time, label, program, model))
    fitted = 0
    errors: list[InfeasibleMemoryError] = []
    for bound, label, program, model in sorted(over, key=lambda x: x[0]):
        if best is not None and (bound >= best[0] or (max_fits is not None and fitted >= max_fits)):
            break                                   # no later candidate can win (or out of fits)
        fitted += 1
        try:
            program, result = fit(program, model)
        except InfeasibleMemoryError as e:
            errors.append(e)
            failures[label] = f"{type(e).__name__}: {str(e).splitlines()[0]}"
            continue
        if best is None or result.step_time < best[0]:
            best = (result.step_time, label, program, result)
    if best is None:
        if errors:
            raise min(errors, key=lambda e: e.excess)
        raise InfeasibleMemoryError(f"no candidate could be lowered and simulated: {failures}. Fix: check the "
                                    "candidate generators' orders (dipc.ir.validate).")
    _, label, program, result = best
    return Choice(label=label, program=program, result=result, simulated=simulated, fitted=fitted,
                  bounds=bounds, failures=failures)
