"""Activation recomputation that the runtime executes: checkpointing of layer leaves, switched per step.

A layer the program recomputes is replaced, in its stage GraphModule, by a
:class:`RecomputableLayer` that wraps the user's module object; every other layer is called
directly. Only the stage module's own container chain is rewired — ``fx.GraphModule`` copies
intermediate containers and keeps the leaves — so the user's model, its parameter names and the
stages' parameter lists are unchanged. Executors call :func:`apply_recompute` with the program
before the step: it wraps the layers the program's ``recompute`` attribute (:mod:`dipc.ir.recompute`)
names and unwraps the others, so the interpreter's handlers never see recomputation, and a step
that recomputes nothing pays no wrapper call per layer (an ``nn.Module`` call each, ~2 us on CPU).

An enabled wrapper runs its layer under ``torch.utils.checkpoint`` (non-reentrant): the forward
keeps only the layer's inputs, and every backward graph task that reaches the layer re-runs its
forward. BWD re-runs it once; the zero-bubble split re-runs it twice (BWD_I's
``autograd.grad(..., retain_graph=True)`` and BWD_W's backward to the parameters are two graph
tasks, and torch discards the recomputed tensors at the end of each), which SEMU charges too.
RNG state is restored for the re-run (torch's default), so dropout masks match.

Per-microbatch choices (``<stage>@<mb>:...``): :func:`apply_recompute` wraps, per stage, every
layer some microbatch recomputes; for a stage whose choice differs between microbatches,
:func:`microbatch_switches` gives per microbatch the ``enabled`` flag of each wrapper, and the
interpreter sets them before that microbatch's FWD. ``checkpoint`` decides at forward time, so
the backward re-runs exactly what that microbatch's forward checkpointed; a wrapper that is off
costs one extra Python call per layer. Stages with one choice for all microbatches are never
switched, and a step that recomputes nothing still pays no wrapper.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from dipc.errors import ScheduleError
from dipc.ir import Program
from dipc.ir.recompute import RecomputePlan, is_per_microbatch, layers_of, recompute_plan, stage_union
from dipc.passes.partition import StageSpec

__all__ = ["MicrobatchSwitches", "RecomputableLayer", "apply_recompute", "microbatch_switches", "wrap_layers"]


class RecomputableLayer(nn.Module):
    """A layer that checkpoints its forward while ``enabled`` (and autograd records)."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer
        self.enabled = False

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.enabled and torch.is_grad_enabled():
            return checkpoint(self.layer, *args, use_reentrant=False, **kwargs)
        return self.layer(*args, **kwargs)


def _owner(stage: StageSpec, path: str) -> tuple[nn.Module, str]:
    parent, _, name = path.rpartition(".")
    return (stage.module.get_submodule(parent) if parent else stage.module), name


def wrap_layers(stages: Sequence[StageSpec]) -> None:
    """Put every layer leaf of every stage behind a (disabled) :class:`RecomputableLayer`.
    Idempotent; layers a stage's graph does not call (none, normally) are left alone. Executors do
    not need this (:func:`apply_recompute` wraps what a program recomputes); the next
    :func:`apply_recompute` unwraps the layers its program does not recompute."""
    _APPLIED.clear()
    for st in stages:
        called = {n.target for n in st.module.graph.nodes if n.op == "call_module"}
        for path in st.layers:
            if path not in called:
                continue
            owner, name = _owner(st, path)
            layer = getattr(owner, name)
            if not isinstance(layer, RecomputableLayer):
                setattr(owner, name, RecomputableLayer(layer))


def _switch(stage: StageSpec, recompute: dict[str, bool]) -> int:
    """Wrap (True) or unwrap (False) each named layer of ``stage``; returns how many are wrapped."""
    count = 0
    for path, on in recompute.items():
        try:
            owner, name = _owner(stage, path)
        except AttributeError:
            continue
        layer = getattr(owner, name, None)
        if layer is None:
            continue
        if on:
            if not isinstance(layer, RecomputableLayer):
                layer = RecomputableLayer(layer)
                setattr(owner, name, layer)
            layer.enabled = True
            count += 1
        elif isinstance(layer, RecomputableLayer):
            setattr(owner, name, layer.layer)   # called directly again: no wrapper on the hot path
    return count


MicrobatchSwitches = dict[int, list[tuple[tuple["RecomputableLayer", bool], ...]]]
"""stage -> per microbatch, (wrapper, enabled) for each of the stage's wrapped layers; only stages
whose choice differs between microbatches."""

# id(stages) -> (stages, the plan applied last, its switches): a step with the same choice skips the walk
_APPLIED: dict[int, tuple[Sequence[StageSpec], RecomputePlan, MicrobatchSwitches]] = {}


def _switches(plan: RecomputePlan, stages: Sequence[StageSpec], num_microbatches: int) -> MicrobatchSwitches:
    out: MicrobatchSwitches = {}
    if not is_per_microbatch(plan):
        return out
    by_id = {st.id: st for st in stages}
    for stage_id, layers in stage_union(plan).items():
        if not any(isinstance(k, tuple) and k[0] == stage_id for k in plan):
            continue
        owners = [(_owner(by_id[stage_id], p), p) for p in layers]
        wrappers = [(getattr(owner, name), p) for (owner, name), p in owners]
        per_mb = []
        for m in range(num_microbatches):
            mine = set(layers_of(plan, stage_id, m))
            per_mb.append(tuple((w, p in mine) for w, p in wrappers if isinstance(w, RecomputableLayer)))
        out[stage_id] = per_mb
    return out


def microbatch_switches(program: Program, stages: Sequence[StageSpec]) -> MicrobatchSwitches:
    """The per-microbatch ``enabled`` flags of ``program``'s choice (applying it first if the
    stages carry another one); empty when no stage's choice differs between microbatches."""
    plan = recompute_plan(program)
    if not is_per_microbatch(plan):
        return {}
    hit = _APPLIED.get(id(stages))
    if hit is None or hit[0] is not stages or hit[1] != plan:
        apply_recompute(program, stages)
        hit = _APPLIED[id(stages)]
    return hit[2]


def apply_recompute(program: Program, stages: Sequence[StageSpec]) -> int:
    """Wrap exactly the layers ``program`` recomputes for some microbatch (none without a
    choice), unwrap the rest. Returns how many layers are wrapped. Raises ``ScheduleError`` for a
    layer the stage lacks."""
    plan = recompute_plan(program)
    union = stage_union(plan)
    by_id = {st.id: st for st in stages}
    for stage_id, layers in union.items():
        st = by_id.get(stage_id)
        missing = [p for p in layers if st is None or p not in st.layers]
        if missing:
            have = st.layers if st is not None else []
            raise ScheduleError(f"the program recomputes {missing[:3]} in stage {stage_id}, whose layers are "
                                f"{have[:4]}{'...' if len(have) > 4 else ''}. Fix: plan the program for this "
                                "pipeline (pipe.plan(..., memory_limit=...)), or drop its 'recompute' attribute.")
    last = _APPLIED.get(id(stages))
    if last is not None and last[0] is stages and last[1] == plan:
        return sum(len(v) for v in union.values())
    count = 0
    for st in stages:
        chosen = set(union.get(st.id, ()))
        count += _switch(st, {p: p in chosen for p in st.layers})
    if len(_APPLIED) >= 16:
        _APPLIED.pop(next(iter(_APPLIED)))
    _APPLIED[id(stages)] = (stages, plan, _switches(plan, stages, program.num_microbatches))
    return count
