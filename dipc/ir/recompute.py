"""Which layers a program recomputes (activation checkpointing), stored in ``Program.attrs``.

The choice is per program (DIP re-plans it per batch) and per stage: ``recompute`` holds
``"<stage>:<layer>,<layer>;<stage>:<layer>"`` with stages ascending and each stage's layers in
the order given (module paths contain neither ``,`` ``;`` nor ``:``). A program without the key
recomputes nothing, so dumps written before this attribute existed read back unchanged, and an
empty plan removes the key rather than writing an empty value.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping

from dipc.errors import IRParseError
from dipc.ir.program import Program

__all__ = ["RECOMPUTE_ATTR", "RecomputePlan", "format_recompute", "parse_recompute", "recompute_plan",
           "with_recompute"]

RECOMPUTE_ATTR = "recompute"

RecomputePlan = dict[int, tuple[str, ...]]
"""stage id -> module paths of its layers that run under activation checkpointing."""

_SEPARATORS = (",", ";", ":")


def _normalise(plan: Mapping[int, Iterable[str]]) -> RecomputePlan:
    out: RecomputePlan = {}
    for stage, layers in sorted(plan.items()):
        names = tuple(dict.fromkeys(layers))
        if not isinstance(stage, int) or isinstance(stage, bool) or stage < 0:
            raise ValueError(f"recompute plan stage {stage!r}. Fix: use stage ids (ints >= 0).")
        for name in names:
            if not name or any(c in name for c in _SEPARATORS) or name != name.strip():
                raise ValueError(f"recompute plan layer {name!r} of stage {stage} cannot be written "
                                 "(empty, padded, or contains ',', ';' or ':'). Fix: use module paths.")
        if names:
            out[stage] = names
    return out


def format_recompute(plan: Mapping[int, Iterable[str]]) -> str:
    """The attribute value of ``plan`` (``""`` for an empty plan)."""
    return ";".join(f"{s}:{','.join(layers)}" for s, layers in _normalise(plan).items())


def parse_recompute(value: str) -> RecomputePlan:
    """Inverse of :func:`format_recompute`; raises ``IRParseError`` naming the bad part."""
    plan: RecomputePlan = {}
    for part in value.split(";") if value else ():
        stage, sep, layers = part.partition(":")
        if not sep or not stage.isdigit() or not layers:
            raise IRParseError(f"recompute={value!r}: part {part!r} is not '<stage>:<layer>,<layer>'. "
                               "Fix: e.g. recompute=\"0:vision.blocks.0,vision.blocks.1;2:lm.layers.3\".")
        names = tuple(layers.split(","))
        if int(stage) in plan or any(not n or n != n.strip() for n in names):
            raise IRParseError(f"recompute={value!r}: stage {stage} repeats or names an empty layer. "
                               "Fix: one '<stage>:...' part per stage, layers separated by single commas.")
        plan[int(stage)] = names
    return plan


def recompute_plan(program: Program) -> RecomputePlan:
    """The program's recompute choice (empty when it has none)."""
    for key, value in program.attrs:
        if key == RECOMPUTE_ATTR:
            return parse_recompute(value)
    return {}


def with_recompute(program: Program, plan: Mapping[int, Iterable[str]]) -> Program:
    """A copy of ``program`` recomputing ``plan``'s layers (replacing any earlier choice)."""
    value = format_recompute(plan)
    stage_ids = {s.id for s in program.stages}
    unknown = [s for s in _normalise(plan) if s not in stage_ids]
    if unknown:
        raise ValueError(f"recompute plan names stages {unknown} but the program has stages "
                         f"{sorted(stage_ids)}. Fix: plan for this program's stages.")
    attrs = tuple((k, v) for k, v in program.attrs if k != RECOMPUTE_ATTR)
    if value:
        attrs += ((RECOMPUTE_ATTR, value),)
    return dataclasses.replace(program, attrs=attrs)
