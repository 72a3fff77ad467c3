"""SEMU's accounting of activation recomputation: stash, re-run time and transient memory.

A layer run under checkpointing keeps only its stream input (``in_bytes``) from forward to
backward instead of everything its backward reads (``act_bytes``), and re-runs its forward in
each backward graph task that reaches it: once in BWD, once in BWD_I *and* once more in BWD_W
under the zero-bubble split (torch frees the recomputed tensors at the end of each graph task;
see :mod:`dipc.runtime.recompute`). BWD_I of a stage without input gradients (the first stage)
runs no graph task at all, so it re-runs nothing. While a recomputed layer's backward runs, its
recomputed activations exist on top of the stash: charged as workspace, the largest
``act_bytes - in_bytes`` among the stage's recomputed layers (layers are re-run one at a time).

The plan is per (stage, microbatch) (:func:`dipc.ir.recompute.expand_recompute`): a FWD stashes,
and a backward re-runs and takes workspace for, the layers its own microbatch recomputes (all
sub-microbatches of a microbatch share its choice, as in the runtime).

A unit that recomputes layers takes the runtime's plain zero-bubble split (BWD_W walks again
from the outputs, :mod:`dipc.runtime.split_backward`), so its BWD_I captures and keeps no
gradients for BWD_W; the other units keep the cost model's ``wgrad_seed_bytes`` from BWD_I to BWD_W.

Not modelled: a recomputed layer's input may also be saved by the previous, non-recomputed
layer (e.g. when that layer's last op saves its output); it is then counted twice
(conservative). Recomputation reads the same inputs, so its time is the layer's forward time.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from dipc.errors import ScheduleError
from dipc.ir import Instruction, Op, Program
from dipc.ir.recompute import RecomputePlan, UnitRecompute, expand_recompute, stage_union
from dipc.semu.emulator import ComputeTimeFn, MemoryModel

# Op.X is a slow class-attribute lookup on Python 3.11 enums, and these loops run per instruction
_BWD, _BWD_I, _BWD_W = Op.BWD, Op.BWD_I, Op.BWD_W

__all__ = ["Footprint", "RecomputeCosts", "recompute_compute_time", "recompute_memory_model",
           "recompute_seconds", "recomputes_in", "stash_bytes", "workspace_bytes"]


@dataclass(frozen=True, slots=True)
class Footprint:
    """One layer on one microbatch, per GPU: bytes stashed normally, bytes stashed when
    recomputed (its stream input), and seconds of one forward re-run."""

    act_bytes: float
    in_bytes: float
    fwd_seconds: float

    @property
    def saved_bytes(self) -> float:
        return self.act_bytes - self.in_bytes


class RecomputeCosts(Protocol):
    """What phase 3 needs of a cost model (``StepModel`` provides it)."""

    stage_layers: list[list[str]]

    def static_bytes(self, stage: int) -> float: ...

    def layer_footprint(self, stage: int, mb: int, path: str, sub: int = -1) -> Footprint: ...


def stash_bytes(costs: RecomputeCosts, stage: int, mb: int, recompute: frozenset[str], sub: int = -1) -> float:
    """Bytes a FWD of ``stage`` on ``mb`` (sub ``sub``) keeps for its backward when ``recompute`` is
    checkpointed."""
    total = 0.0
    for p in costs.stage_layers[stage]:
        f = costs.layer_footprint(stage, mb, p, sub)
        total += f.in_bytes if p in recompute else f.act_bytes
    return total


def workspace_bytes(costs: RecomputeCosts, stage: int, mb: int, recompute: frozenset[str], sub: int = -1) -> float:
    """Transient bytes while a backward re-runs the recomputed layers (the largest one's)."""
    return max((max(costs.layer_footprint(stage, mb, p, sub).saved_bytes, 0.0) for p in recompute), default=0.0)


def recompute_seconds(costs: RecomputeCosts, stage: int, mb: int, recompute: frozenset[str], sub: int = -1) -> float:
    """Seconds of one re-run of the recomputed layers' forwards."""
    return sum(costs.layer_footprint(stage, mb, p, sub).fwd_seconds for p in recompute)


def recomputes_in(ins: Instruction, program: Program) -> bool:
    """Whether this instruction re-runs the stage's recomputed forwards (see the module docstring)."""
    if ins.op is _BWD or ins.op is _BWD_W:
        return True
    return ins.op is _BWD_I and bool(program.stage(ins.stage).grad_producers)


def _sets(costs: RecomputeCosts, plan: RecomputePlan, num_microbatches: int) -> UnitRecompute:
    """The plan per (stage, microbatch), after checking every named layer belongs to its stage."""
    for stage, layers in stage_union(plan).items():
        own = costs.stage_layers[stage] if 0 <= stage < len(costs.stage_layers) else []
        bad = [p for p in layers if p not in own]
        if bad:
            raise ScheduleError(f"the program recomputes {bad[:3]} in stage {stage}, which holds {own[:4]}"
                                f"{'...' if len(own) > 4 else ''}. Fix: plan the recomputation for this "
                                "pipeline's stages (pipe.plan(..., memory_limit=...)).")
    return expand_recompute(plan, num_microbatches)


def recompute_compute_time(base: ComputeTimeFn, costs: RecomputeCosts, program: Program,
                           plan: RecomputePlan) -> ComputeTimeFn:
    """``base`` plus the re-run forwards in every backward instruction that recomputes."""
    sets = _sets(costs, plan, program.num_microbatches)
    if not sets:
        return base
    cache: dict[tuple[int, int, int], float] = {}
    unit = getattr(costs, "unit_key", None)

    def time(ins: Instruction) -> float:
        t = base(ins)
        layers = sets.get((ins.stage, ins.mb))
        if layers and recomputes_in(ins, program):
            key = (ins.stage, ins.mb, ins.sub)
            hit = cache.get(key)
            if hit is None:
                m, j = unit(ins.mb, ins.sub) if unit is not None else (ins.mb, ins.sub)
                hit = cache[key] = recompute_seconds(costs, ins.stage, m, layers, j)
            t += hit
        return t

    return time


def recompute_memory_model(costs: RecomputeCosts, program: Program, plan: RecomputePlan) -> MemoryModel:
    """Static bytes per stage; per-FWD stash under ``plan``; recompute workspace in backwards.
    Layers' ``act_bytes`` include their inputs, so received messages are not counted again."""
    sets = _sets(costs, plan, program.num_microbatches)
    empty: frozenset[str] = frozenset()

    unit = getattr(costs, "unit_key", None)     # StepModel: units of equal statistics share numbers
    stashes: dict[tuple[int, int, int] | tuple[int, int, int, frozenset[str]], float] = {}

    def activations(ins: Instruction) -> float:
        key = (ins.stage, ins.mb, ins.sub)
        hit = stashes.get(key)
        if hit is None:
            m, j = unit(ins.mb, ins.sub) if unit is not None else (ins.mb, ins.sub)
            layers = sets.get((ins.stage, ins.mb), empty)
            shared = (ins.stage, m, j, layers)   # units of equal statistics and choice share bytes
            hit = stashes.get(shared)
            if hit is None:
                hit = stashes[shared] = stash_bytes(costs, ins.stage, m, layers, j)
            stashes[key] = hit
        return hit

    from dipc.semu.step_model import first_weight_backwards

    base = getattr(costs, "workspace_bytes", None)
    grads = getattr(costs, "grad_bytes", None)
    firsts = first_weight_backwards(program)

    rerun: dict[tuple[int, int, int], float] = {}

    def workspace(ins: Instruction) -> float:
        layers = sets.get((ins.stage, ins.mb))
        extra = (base(ins, first=(ins.stage, ins.mb, ins.sub) in firsts, rewalk=bool(layers))
                 if base is not None else 0.0)
        if not layers or not recomputes_in(ins, program):
            return extra
        key = (ins.stage, ins.mb, ins.sub)
        hit = rerun.get(key)
        if hit is None:
            m, j = unit(ins.mb, ins.sub) if unit is not None else (ins.mb, ins.sub)
            hit = rerun[key] = workspace_bytes(costs, ins.stage, m, layers, j)
        return extra + hit

    seed_bytes = getattr(costs, "wgrad_seed_bytes", None)

    def seeds(ins: Instruction) -> float:
        return 0.0 if seed_bytes is None or sets.get((ins.stage, ins.mb)) else seed_bytes(ins.stage, ins.mb, ins.sub)

    static = costs.static_bytes if grads is None else (lambda stage: costs.static_bytes(stage) - grads(stage))
    return MemoryModel(static=static, activations=activations, grads=grads, seeds_for_wgrad=seeds,
                       workspace=workspace if (sets or base is not None) else None, count_messages=False)
