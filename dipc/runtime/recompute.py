"""Activation recomputation that the runtime executes: checkpointing of layer leaves, switched per step.

A layer the program recomputes is replaced, in its stage GraphModule, by a
:class:`RecomputableLayer` that wraps the user's module object; every other layer is called
directly. Only the stage module's own container chain is rewired — ``fx.GraphModule`` copies
intermediate containers and keeps the leaves — so the user's model, its parameter names and the
stages' parameter lists are unchanged. Executors call :func:`apply_recompute` with the program
before the step: it wraps the layers the program's ``recompute`` attribute (:mod:`dipc.ir.recompute`)
names and unwraps the others, so the interpreter's handlers never see recomputation, and a step
that recomputes nothing pays no wrapper call per layer (an ``nn.Module`` call each, ~2 us on CPU).

A wrapper in full mode runs its layer under ``torch.utils.checkpoint`` (non-reentrant): the forward
keeps only the layer's inputs, and every backward graph task that reaches the layer re-runs its
forward. BWD re-runs it once; the zero-bubble split re-runs it twice (BWD_I's
``autograd.grad(..., retain_graph=True)`` and BWD_W's backward to the parameters are two graph
tasks, and torch discards the recomputed tensors at the end of each), which SEMU charges too.
RNG state is restored for the re-run (torch's default), so dropout masks match.

A wrapper's mode is off, full (the above) or selective (entries ``<layer>~sel``). Selective runs
the layer under torch's selective activation checkpointing: the forward keeps the outputs of the
ops in :data:`dipc.ir.recompute.SELECTIVE_SAVED_OPS` (matmuls, convolutions, fused attention) and
the backward re-runs only the cheap ops between them, so it frees most of full recomputation's
memory at a fraction of its re-run time. The policy and its op set are built once, at import.
Torch hands each kept output to one backward only (it is marked consumed), so a selective layer
cannot be re-run by both graph tasks of the zero-bubble split: :func:`apply_recompute` refuses a
unit that would (its stage takes input gradients and the program splits its backward) before the
step runs, and full recomputation is the fix there.

Per-microbatch choices (``<stage>@<mb>:...``): :func:`apply_recompute` wraps, per stage, every
layer some microbatch recomputes; for a stage whose choice differs between microbatches,
:func:`microbatch_switches` gives per microbatch the mode of each wrapper, and the
interpreter sets them before that microbatch's FWD. ``checkpoint`` decides at forward time, so
the backward re-runs exactly what that microbatch's forward checkpointed; a wrapper that is off
costs one extra Python call per layer. Stages with one choice for all microbatches are never
switched, and a step that recomputes nothing still pays no wrapper.
"""
from __future__ import annotations

import functools
from collections.abc import Iterable, Sequence
from enum import Enum
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from dipc.errors import ScheduleError
from dipc.ir import Op, Program
from dipc.ir.recompute import (SELECTIVE_SAVED_OPS, SELECTIVE_SUFFIX, RecomputePlan, check_recompute, expand_recompute,
                               is_per_microbatch, layers_of, recompute_plan, split_entry, stage_union)
from dipc.passes.partition import StageSpec

__all__ = ["MicrobatchSwitches", "RecomputableLayer", "RecomputeMode", "apply_recompute", "microbatch_switches",
           "selective_policy", "wrap_layers"]


class RecomputeMode(str, Enum):
    """How a wrapped layer runs: directly, fully checkpointed, or selectively checkpointed."""

    OFF = "off"
    FULL = "full"
    SELECTIVE = "selective"


# the aten overload packets whose outputs selective checkpointing keeps (names this torch lacks skipped)
_SAVED_PACKETS = frozenset(getattr(torch.ops.aten, n) for n in SELECTIVE_SAVED_OPS if hasattr(torch.ops.aten, n))


def selective_policy(ctx: Any, func: Any, *args: Any, **kwargs: Any) -> CheckpointPolicy:
    """Keep the outputs of the expensive ops (:data:`SELECTIVE_SAVED_OPS`), re-run the rest."""
    if getattr(func, "overloadpacket", None) in _SAVED_PACKETS:
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


# built once: each call of it makes the fresh pair of modes (and cache) one checkpoint call needs
_SELECTIVE_CONTEXTS = functools.partial(create_selective_checkpoint_contexts, selective_policy)


class RecomputableLayer(nn.Module):
    """A layer that checkpoints its forward, fully or selectively per ``mode``, while autograd records."""

    def __init__(self, layer: nn.Module, mode: RecomputeMode = RecomputeMode.OFF) -> None:
        super().__init__()
        self.layer = layer
        self.mode = mode

    @property
    def enabled(self) -> bool:
        """Whether the layer is checkpointed (fully or selectively)."""
        return self.mode is not RecomputeMode.OFF

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        mode = self.mode
        if mode is RecomputeMode.OFF or not torch.is_grad_enabled():
            return self.layer(*args, **kwargs)
        if mode is RecomputeMode.FULL:
            return checkpoint(self.layer, *args, use_reentrant=False, **kwargs)
        return checkpoint(self.layer, *args, use_reentrant=False, context_fn=_SELECTIVE_CONTEXTS, **kwargs)


def _modes(entries: Iterable[str]) -> dict[str, RecomputeMode]:
    """Module path -> mode of plan entries (``<layer>`` full, ``<layer>~sel`` selective)."""
    out = {}
    for entry in entries:
        path, sel = split_entry(entry)
        out.setdefault(path, RecomputeMode.SELECTIVE if sel else RecomputeMode.FULL)
    return out


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


def _switch(stage: StageSpec, recompute: dict[str, RecomputeMode]) -> int:
    """Wrap each named layer of ``stage`` in its mode, or unwrap it (``OFF``); returns how many are wrapped."""
    count = 0
    for path, mode in recompute.items():
        try:
            owner, name = _owner(stage, path)
        except AttributeError:
            continue
        layer = getattr(owner, name, None)
        if layer is None:
            continue
        if mode is not RecomputeMode.OFF:
            if not isinstance(layer, RecomputableLayer):
                layer = RecomputableLayer(layer)
                setattr(owner, name, layer)
            layer.mode = mode
            count += 1
        elif isinstance(layer, RecomputableLayer):
            setattr(owner, name, layer.layer)   # called directly again: no wrapper on the hot path
    return count


MicrobatchSwitches = dict[int, list[tuple[tuple["RecomputableLayer", RecomputeMode], ...]]]
"""stage -> per microbatch, (wrapper, mode) for each of the stage's wrapped layers; only stages
whose choice differs between microbatches."""

# id(stages) -> (stages, the program applied last, its plan, its switches, wrapped count): a step
# with the same program skips every walk, one with the same choice skips the rewiring
_APPLIED: dict[int, tuple[Sequence[StageSpec], Program, RecomputePlan, MicrobatchSwitches, int]] = {}


def _stage_modes(plan: RecomputePlan) -> dict[int, dict[str, RecomputeMode]]:
    """Per stage, each layer some microbatch recomputes -> its mode (the whole-stage entry's where
    there is one; a stage whose choice varies has its FWDs set the mode per microbatch)."""
    return {s: _modes(entries) for s, entries in stage_union(plan).items()}


def _switches(plan: RecomputePlan, stages: Sequence[StageSpec], num_microbatches: int) -> MicrobatchSwitches:
    out: MicrobatchSwitches = {}
    if not is_per_microbatch(plan):
        return out
    by_id = {st.id: st for st in stages}
    for stage_id, modes in _stage_modes(plan).items():
        if not any(isinstance(k, tuple) and k[0] == stage_id for k in plan):
            continue
        owners = [(_owner(by_id[stage_id], p), p) for p in modes]
        wrappers = [(getattr(owner, name), p) for (owner, name), p in owners]
        per_mb = []
        for m in range(num_microbatches):
            mine = _modes(layers_of(plan, stage_id, m))
            per_mb.append(tuple((w, mine.get(p, RecomputeMode.OFF)) for w, p in wrappers
                                if isinstance(w, RecomputableLayer)))
        out[stage_id] = per_mb
    return out


def microbatch_switches(program: Program, stages: Sequence[StageSpec]) -> MicrobatchSwitches:
    """The per-microbatch modes of ``program``'s choice (applying it first if the stages carry
    another one); empty when no stage's choice differs between microbatches."""
    if not is_per_microbatch(recompute_plan(program)):
        return {}
    apply_recompute(program, stages)
    return _APPLIED[id(stages)][3]


def _check_layers_exist(plan: RecomputePlan, by_id: dict[int, StageSpec]) -> None:
    """Refuse a plan naming a layer its stage lacks (a program planned for another pipeline)."""
    for stage_id, modes in _stage_modes(plan).items():
        st = by_id.get(stage_id)
        missing = [p for p in modes if st is None or p not in st.layers]
        if missing:
            have = st.layers if st is not None else []
            raise ScheduleError(f"the program recomputes {missing[:3]} in stage {stage_id}, whose layers are "
                                f"{have[:4]}{'...' if len(have) > 4 else ''}. Fix: plan the program for this "
                                "pipeline (pipe.plan(..., memory_limit=...)), or drop its 'recompute' attribute.")


def _check_selective_backward(program: Program, plan: RecomputePlan, by_id: dict[int, StageSpec]) -> None:
    """Refuse a selective layer in a unit whose backward the program splits (BWD_I, BWD_W) and
    whose stage takes input gradients: both graph tasks would re-run the layer, and torch lets
    the outputs selective checkpointing kept serve one backward only (the second raises
    "Trying to backward an extra time" mid-step). A stage without input gradients runs its whole
    backward in BWD_W, once, so it may recompute selectively."""
    if not any(e.endswith(SELECTIVE_SUFFIX) for entries in plan.values() for e in entries):
        return
    split = {(i.stage, i.mb) for stream in program.streams for i in stream if i.op is Op.BWD_I}
    for (stage, mb), entries in sorted(expand_recompute(plan, program.num_microbatches).items()):
        st = by_id.get(stage)
        if (stage, mb) not in split or st is None or not st.grad_producers:
            continue
        sel = [p for p, mode in _modes(entries).items() if mode is RecomputeMode.SELECTIVE]
        if sel:
            raise ScheduleError(
                f"the program recomputes layer {sel[0]!r} of stage {stage}, microbatch {mb} selectively "
                f"({sel[0]}{SELECTIVE_SUFFIX}), but splits that unit's backward into BWD_I and BWD_W (zero-bubble): "
                "both re-run the layer, and torch's selective checkpointing lets the outputs it kept serve one "
                f"backward only. Fix: recompute it fully ({sel[0]!r} without {SELECTIVE_SUFFIX}) under a "
                "split-backward schedule, or use a schedule with a plain BWD (e.g. 1f1b).")


def apply_recompute(program: Program, stages: Sequence[StageSpec]) -> int:
    """Wrap exactly the layers ``program`` recomputes for some microbatch (none without a
    choice), each in its mode, unwrap the rest. Returns how many layers are wrapped. Raises
    ``ScheduleError`` before anything runs for a layer the stage lacks, a layer one unit runs
    both fully and selectively, or a selective layer the split backward would re-run twice."""
    last = _APPLIED.get(id(stages))
    if last is not None and last[0] is stages and last[1] is program:
        return last[4]
    plan = recompute_plan(program)
    by_id = {st.id: st for st in stages}
    check_recompute(program, plan)
    _check_layers_exist(plan, by_id)
    _check_selective_backward(program, plan, by_id)
    if last is not None and last[0] is stages and last[2] == plan:
        _APPLIED[id(stages)] = (stages, program, *last[2:])
        return last[4]
    modes = _stage_modes(plan)
    count = 0
    for st in stages:
        mine = modes.get(st.id, {})
        count += _switch(st, {p: mine.get(p, RecomputeMode.OFF) for p in st.layers})
    if len(_APPLIED) >= 16:
        _APPLIED.pop(next(iter(_APPLIED)))
    _APPLIED[id(stages)] = (stages, program, plan, _switches(plan, stages, program.num_microbatches), count)
    return count
