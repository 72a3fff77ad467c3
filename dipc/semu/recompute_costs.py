"""SEMU's accounting of activation recomputation: stash, re-run time and transient memory.

A layer run under checkpointing keeps only its stream input (``in_bytes``) from forward to
backward instead of everything its backward reads (``act_bytes``), and re-runs its forward in
each backward graph task that reaches it: once in BWD, once in BWD_I *and* once more in BWD_W
under the zero-bubble split (torch frees the recomputed tensors at the end of each graph task;
see :mod:`dipc.runtime.recompute`). BWD_I of a stage without input gradients (the first stage)
runs no graph task at all, so it re-runs nothing. While a recomputed layer's backward runs, its
recomputed activations exist on top of the stash: charged as workspace while that layer's
backward runs (:meth:`dipc.semu.step_model.StepModel.workspace_bytes` walks the layers as autograd
does, so a re-run meets only what is still live there); cost models without that walk get the
largest ``act_bytes - in_bytes`` among the recomputed layers on top of their own workspace.

The plan is per (stage, microbatch) (:func:`dipc.ir.recompute.expand_recompute`): a FWD stashes,
and a backward re-runs and takes workspace for, the layers its own microbatch recomputes (all
sub-microbatches of a microbatch share its choice, as in the runtime).

A unit that recomputes layers takes the runtime's plain zero-bubble split (BWD_W walks again
from the outputs, :mod:`dipc.runtime.split_backward`), so its BWD_I captures and keeps no
gradients for BWD_W; the other units keep the cost model's ``wgrad_seed_bytes`` from BWD_I to BWD_W.

Selective checkpointing (``<layer>~sel``, :mod:`dipc.ir.recompute`) stashes the layer's stream
input plus the outputs of its expensive ops (the cost model's ``sel_act_bytes``) and re-runs only
its other forward ops (``sel_rerun_bytes`` at the device's elementwise speed, plus their per-op
overhead); its workspace is what that re-run rebuilds, ``act_bytes - sel_act_bytes``. Torch's
dispatch modes for it cost the profile's ``sac_op_overhead`` per op of the layer's forward, in the
FWD and again in the re-run (measured on CPU; 0 on the GPU presets).

Not modelled: a recomputed layer's input may also be saved by the previous, non-recomputed
layer (e.g. when that layer's last op saves its output); it is then counted twice
(conservative). Recomputation reads the same inputs, so its time is the layer's forward time,
plus, for a fully checkpointed layer, the profile's ``ckpt_op_overhead`` per forward op (torch's
saved-tensor hooks and re-recording: measured on CPU, where on the example models it doubled
what recomputation costs; 0 on the GPU presets).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from dipc.errors import ScheduleError
from dipc.ir import Instruction, Op, Program
from dipc.ir.recompute import RecomputePlan, UnitRecompute, expand_recompute, selective, split_entry, stage_union
from dipc.semu.emulator import ComputeTimeFn, MemoryModel

# Op.X is a slow class-attribute lookup on Python 3.11 enums, and these loops run per instruction
_BWD, _BWD_I, _BWD_W, _FWD = Op.BWD, Op.BWD_I, Op.BWD_W, Op.FWD

__all__ = ["FULL", "NONE", "SELECTIVE", "Footprint", "RecomputeCosts", "forward_extra_seconds", "layer_mode",
           "recompute_compute_time", "recompute_memory_model", "recompute_seconds", "recomputes_in",
           "stash_bytes", "workspace_bytes"]


@dataclass(frozen=True, slots=True)
class Footprint:
    """One layer on one microbatch, per GPU: bytes stashed normally, bytes stashed when
    recomputed (its stream input), and seconds of one forward re-run; under selective
    checkpointing (``<layer>~sel``), its stash and the seconds of its partial re-run
    (``sel_bytes <= 0``: no selective choice for this layer)."""

    act_bytes: float
    in_bytes: float
    fwd_seconds: float                 # one full re-run: the forward and checkpointing's overhead
    sel_bytes: float = 0.0
    sel_seconds: float = 0.0
    sel_fwd_seconds: float = 0.0       # what selective checkpointing adds to the layer's own forward

    @property
    def saved_bytes(self) -> float:
        return self.act_bytes - self.in_bytes

    @property
    def has_selective(self) -> bool:
        """Whether selective checkpointing keeps less than no checkpointing (and is known)."""
        return 0.0 < self.sel_bytes < self.act_bytes

    def stash(self, mode: int) -> float:
        """Bytes kept for backward under ``mode`` (:data:`NONE`, :data:`SELECTIVE`, :data:`FULL`)."""
        return self.act_bytes if mode == NONE else self.sel_bytes if mode == SELECTIVE else self.in_bytes

    def rerun_seconds(self, mode: int) -> float:
        return 0.0 if mode == NONE else self.sel_seconds if mode == SELECTIVE else self.fwd_seconds

    def forward_extra(self, mode: int) -> float:
        """Seconds ``mode`` adds to the layer's forward (selective: torch's dispatch modes)."""
        return self.sel_fwd_seconds if mode == SELECTIVE else 0.0

    def workspace(self, mode: int) -> float:
        """Transient bytes while a backward re-runs this layer: what its re-run rebuilds."""
        return 0.0 if mode == NONE else max(self.act_bytes - self.stash(mode), 0.0)


NONE, SELECTIVE, FULL = 0, 1, 2     # how a layer is checkpointed


def layer_mode(path: str, recompute: frozenset[str]) -> int:
    """How ``recompute`` (a unit's plan entries) checkpoints layer ``path``."""
    if path in recompute:
        return FULL
    return SELECTIVE if selective(path) in recompute else NONE


class RecomputeCosts(Protocol):
    """What phase 3 needs of a cost model (``StepModel`` provides it)."""

    stage_layers: list[list[str]]

    def static_bytes(self, stage: int) -> float: ...

    def layer_footprint(self, stage: int, mb: int, path: str, sub: int = -1) -> Footprint: ...


def stash_bytes(costs: RecomputeCosts, stage: int, mb: int, recompute: frozenset[str], sub: int = -1) -> float:
    """Bytes a FWD of ``stage`` on ``mb`` (sub ``sub``) keeps for its backward when ``recompute`` is
    checkpointed."""
    return sum(costs.layer_footprint(stage, mb, p, sub).stash(layer_mode(p, recompute))
               for p in costs.stage_layers[stage])


def workspace_bytes(costs: RecomputeCosts, stage: int, mb: int, recompute: frozenset[str], sub: int = -1) -> float:
    """Transient bytes while a backward re-runs the recomputed layers (the largest one's)."""
    return max((costs.layer_footprint(stage, mb, p, sub).workspace(layer_mode(p, recompute))
                for p in costs.stage_layers[stage]), default=0.0)


def recompute_seconds(costs: RecomputeCosts, stage: int, mb: int, recompute: frozenset[str], sub: int = -1) -> float:
    """Seconds of one re-run of the recomputed layers' forwards (selective ones: their cheap ops)."""
    return sum(costs.layer_footprint(stage, mb, p, sub).rerun_seconds(layer_mode(p, recompute))
               for p in costs.stage_layers[stage])


def forward_extra_seconds(costs: RecomputeCosts, stage: int, mb: int, recompute: frozenset[str],
                          sub: int = -1) -> float:
    """Seconds the plan adds to a FWD of ``stage`` on ``mb`` (selectively checkpointed layers)."""
    return sum(costs.layer_footprint(stage, mb, p, sub).forward_extra(layer_mode(p, recompute))
               for p in costs.stage_layers[stage])


def recomputes_in(ins: Instruction, program: Program) -> bool:
    """Whether this instruction re-runs the stage's recomputed forwards (see the module docstring)."""
    if ins.op is _BWD or ins.op is _BWD_W:
        return True
    return ins.op is _BWD_I and bool(program.stage(ins.stage).grad_producers)


def _sets(costs: RecomputeCosts, plan: RecomputePlan, num_microbatches: int) -> UnitRecompute:
    """The plan per (stage, microbatch), after checking every named layer belongs to its stage."""
    for stage, layers in stage_union(plan).items():
        own = costs.stage_layers[stage] if 0 <= stage < len(costs.stage_layers) else []
        bad = [p for p in layers if split_entry(p)[0] not in own]
        if bad:
            raise ScheduleError(f"the program recomputes {bad[:3]} in stage {stage}, which holds {own[:4]}"
                                f"{'...' if len(own) > 4 else ''}. Fix: plan the recomputation for this "
                                "pipeline's stages (pipe.plan(..., memory_limit=...)).")
    return expand_recompute(plan, num_microbatches)


def recompute_compute_time(base: ComputeTimeFn, costs: RecomputeCosts, program: Program,
                           plan: RecomputePlan) -> ComputeTimeFn:
    """``base`` plus the re-run forwards in every backward instruction that recomputes, and selective
    checkpointing's dispatch in the FWDs of units that checkpoint a layer selectively."""
    sets = _sets(costs, plan, program.num_microbatches)
    if not sets:
        return base
    # (is a FWD, stage, mb, sub) -> seconds the plan adds: a FWD's selective dispatch, a backward's re-run;
    # behind it, per unit of equal statistics and layer choice, the cost model's cache shared by every
    # plan it scores (phase 3 simulates many plans of one batch: VLM-L spent ~30% of them here)
    cache: dict[tuple[bool, int, int, int], float] = {}
    shared: dict = getattr(costs, "recompute_seconds_cache", None)
    if shared is None:
        shared = {}
    unit = getattr(costs, "unit_key", None)

    def time(ins: Instruction) -> float:
        t = base(ins)
        layers = sets.get((ins.stage, ins.mb))
        if not layers:
            return t
        fwd = ins.op is _FWD
        if not fwd and not recomputes_in(ins, program):
            return t
        key = (fwd, ins.stage, ins.mb, ins.sub)
        hit = cache.get(key)
        if hit is None:
            m, j = unit(ins.mb, ins.sub) if unit is not None else (ins.mb, ins.sub)
            same = (fwd, ins.stage, m, j, layers)
            hit = shared.get(same)
            if hit is None:
                extra = forward_extra_seconds if fwd else recompute_seconds
                hit = shared[same] = extra(costs, ins.stage, m, layers, j)
            cache[key] = hit
        return t + hit

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
    walks = hasattr(costs, "workspace_choices")   # its walk places each re-run at its layer
    grads = getattr(costs, "grad_bytes", None)
    firsts = first_weight_backwards(program)

    rerun: dict[tuple[int, int, int], float] = {}

    def workspace(ins: Instruction) -> float:
        layers = sets.get((ins.stage, ins.mb))
        reruns = bool(layers) and recomputes_in(ins, program)
        if base is not None and walks:   # StepModel: each re-run charged at its own layer
            return base(ins, first=(ins.stage, ins.mb, ins.sub) in firsts, rewalk=bool(layers),
                        recompute=layers if reruns else empty)
        extra = (base(ins, first=(ins.stage, ins.mb, ins.sub) in firsts, rewalk=bool(layers))
                 if base is not None else 0.0)
        if not reruns:
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
