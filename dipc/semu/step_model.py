"""The glue that lets SEMU score a real pipeline: per-instruction times and memory from the
symbolic cost model, a device/cluster profile and a tensor-parallel degree.

Given a pipeline's stages (a compiled ``pipe``, or a paper model's layer -> stage split), a
:class:`~dipc.semu.costs.CostModel`, the length statistics of every microbatch (a mapping from
module path prefix to :class:`~dipc.semu.costs.LengthStats`, one per modality), a
:class:`~dipc.semu.profiles.ClusterProfile` and the tensor-parallel degree ``tp``,
:class:`StepModel` gives

- ``compute_time(instr)`` for :func:`dipc.semu.emulator.simulate`: FWD / BWD / BWD_I / BWD_W take
  the sum over the stage's layers of the layer's time on one GPU of its TP group, plus the layer's
  TP collectives; LOAD and OPTIM take 0; REDUCE takes a ring all-reduce of the stage's gradients
  over ``dp`` ranks on the inter-node link when ``dp > 1``, else 0;
- ``memory_model()``: a :class:`~dipc.semu.emulator.MemoryModel` with parameters, gradients and
  Adam states per stage and activations per (stage, microbatch), all divided by ``tp``.

How one layer is timed (per GPU of a TP group; ``c = cost_model.cost(path, stats)``):

- FLOPs and bytes are divided by ``tp`` (Megatron-style column/row-parallel split);
- the matmul FLOPs (``fwd_flops - attn_fwd_flops``, ``bwd_in_flops - 2·attn``, ``bwd_w_flops``)
  are timed as ``gemms_per_layer`` equal GEMMs with the profile's ``matmul`` curve (the curve is
  "efficiency vs the FLOPs of one op", and a transformer layer runs ~4 GEMMs per pass), the
  attention FLOPs as one ``attention`` op (forward ``attn``, backward ``2·attn`` in BWD_I);
- the memory traffic (``fwd_bytes``, ``bwd_bytes``, split between BWD_I and BWD_W by their FLOPs)
  is timed at the profile's bandwidth; ``bytes_mode="max"`` (the default unless the device
  profile's ``bytes_mode`` says otherwise) takes the roofline
  ``max(compute, memory)`` per layer and pass (the paper's operator formula, §6.1, at layer
  granularity), ``"sum"`` adds them (an upper bound: the byte count is an unfused estimate that
  also counts the GEMMs' own operands; what a calibrated CPU profile uses, since one CPU thread
  does not overlap them and calibration fits them as a sum);
- TP collectives: ``n`` all-reduces of the layer's output activation (``out_bytes``) in the
  forward and ``n`` in the backward (in BWD_I), each ``latency + 2·(tp-1)/tp · bytes / bw`` on the
  intra-node link (inter-node when ``tp`` exceeds a node). ``n`` defaults to the number of
  attention calls + 1 for layers with attention (2 for a transformer block: attention + MLP; 3
  for a DiT block with cross-attention) and 0 for the others; pass ``tp_allreduces`` to override.

Activation recomputation (a program's ``recompute`` attribute): see
:mod:`dipc.semu.recompute_costs`.

Calibrated profiles (:mod:`dipc.semu.calibrate`) add terms the GPU presets leave at 0 (besides
per-op fixed times ``device.op_overheads``, which also give sends and receives their CPU time, and
``probs_*_byte_time`` per byte of materialised masked-attention probabilities):
``device.op_overhead`` per ATen op the layer dispatches (``LocalCost.ops``, counted by the trace;
BWD_W is charged the whole backward's ops minus BWD_I's), ``device.instruction_overhead`` per
compute instruction (FWD/BWD/BWD_I/BWD_W: the interpreter and the stage's glue), and, with
``device.dense_masked_attention``, masked attention over *packed* streams costs the dense pairs
``(ΣL)²`` (cross: ``ΣL·ΣLc``) instead of the attended ``ΣL²``.

Not modelled: elementwise FLOPs, overlap of TP collectives with compute, sequence parallelism,
the work between layers (glue ops, the loss), and how BWD_I/BWD_W split the stashed activations
(BWD_I keeps all of them for BWD_W, the conservative choice).

Example::

    pipe = dipc.compile(model, batch, num_stages=4)
    cm = layer_cost_model(pipe.captured)
    mbs = data.microbatches(8, 2)
    sm = StepModel.for_pipeline(pipe, cm, load_preset("h800"), [pipeline_length_stats(pipe, mb) for mb in mbs], tp=4)
    result = sm.simulate(pipe.plan(mbs))
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch

from dipc.errors import DipcError
from dipc.ir import Instruction, Op, Program, StageInfo, TensorSpec
from dipc.ir.recompute import recompute_plan
from dipc.semu.costs import CostModel, LayerCost, LengthStats
from dipc.semu.emulator import MemoryModel, SimResult, simulate
from dipc.semu.length_stats import batch_length_stats, pipeline_length_stats
from dipc.semu.recompute_costs import (FULL, NONE, SELECTIVE, Footprint, layer_mode, recompute_compute_time,
                                       recompute_memory_model)
from dipc.semu.profiles import ClusterProfile, DeviceProfile, LinkProfile

__all__ = ["LayerTime", "StageTime", "StepModel", "allreduce_time", "batch_length_stats", "best_contiguous_split",
           "stage_ops", "chain_program", "first_weight_backwards", "layer_time", "pipeline_length_stats", "stats_for_layer", "StepModelError",
           "sub_length_stats"]

StatsLike = Mapping[str, LengthStats] | LengthStats

# Op.X is a slow class-attribute lookup on Python 3.11 enums; the emulator asks per instruction
_FWD, _BWD, _BWD_I, _BWD_W, _REDUCE = Op.FWD, Op.BWD, Op.BWD_I, Op.BWD_W, Op.REDUCE
_COMPUTE = frozenset({_FWD, _BWD, _BWD_I, _BWD_W})


class StepModelError(DipcError, ValueError):
    """Bad input to the step model (missing statistics, inconsistent stages)."""


# ------------------------------------------------------------------------------------------------
# one layer


@dataclass(frozen=True, slots=True)
class LayerTime:
    """Seconds one layer takes on one GPU of its TP group. ``fwd``/``bwd_in``/``bwd_w`` are compute
    (roofline of FLOPs and bytes), ``tp_fwd``/``tp_bwd`` its TP all-reduces (``tp_bwd`` runs in BWD_I)."""

    fwd: float
    bwd_in: float
    bwd_w: float
    tp_fwd: float = 0.0
    tp_bwd: float = 0.0

    @property
    def compute(self) -> float:
        return self.fwd + self.bwd_in + self.bwd_w

    @property
    def comm(self) -> float:
        return self.tp_fwd + self.tp_bwd

    @property
    def total(self) -> float:
        """Forward + backward, compute + TP collectives."""
        return self.compute + self.comm


def allreduce_time(num_bytes: float, ranks: int, link: LinkProfile) -> float:
    """Ring all-reduce of ``num_bytes`` over ``ranks`` GPUs: ``latency + 2·(n-1)/n · bytes / bw``
    (0 for one rank or no bytes)."""
    if ranks <= 1 or num_bytes <= 0:
        return 0.0
    return link.latency + 2.0 * (ranks - 1) / ranks * num_bytes / link.bandwidth


def _pass_time(device: DeviceProfile, matmul_flops: float, attn_flops: float, num_bytes: float, dtype: str,
               gemms: int, bytes_mode: str) -> float:
    t = 0.0
    if matmul_flops > 0:
        t += gemms * device.op_time("matmul", flops=matmul_flops / gemms, dtype=dtype)
    if attn_flops > 0:
        t += device.op_time("attention", flops=attn_flops, dtype=dtype)
    if num_bytes > 0:
        t_mem = num_bytes / device.memory_bandwidth
        if t == 0.0:   # a memory-bound layer (norm, embedding): one elementwise op on the curve
            return device.op_time("elementwise", bytes_moved=num_bytes, dtype=dtype)
        t = max(t, t_mem) if bytes_mode == "max" else t + t_mem
    return t


def layer_time(cost: LayerCost, cluster: ClusterProfile, *, tp: int = 1, dtype: str = "bfloat16",
               tp_allreduces: int = 0, gemms_per_layer: int = 4, bytes_mode: str = "max") -> LayerTime:
    """One layer's :class:`LayerTime` from its evaluated costs (see the module docstring)."""
    if bytes_mode not in ("max", "sum"):
        raise StepModelError(f"bytes_mode={bytes_mode!r}. Fix: use 'max' or 'sum'.")
    if tp < 1:
        raise StepModelError(f"tp={tp}. Fix: pass a tensor-parallel degree >= 1.")
    dev = cluster.device
    attn = cost.attn_fwd_flops / tp
    mm_f = max(cost.fwd_flops / tp - attn, 0.0)
    mm_bi = max(cost.bwd_in_flops / tp - 2 * attn, 0.0)
    mm_bw = cost.bwd_w_flops / tp
    bwd_total = cost.bwd_in_flops + cost.bwd_w_flops
    share_in = cost.bwd_in_flops / bwd_total if bwd_total > 0 else 1.0
    fwd = _pass_time(dev, mm_f, attn, cost.fwd_bytes / tp, dtype, gemms_per_layer, bytes_mode)
    bwd_in = _pass_time(dev, mm_bi, 2 * attn, cost.bwd_bytes / tp * share_in, dtype, gemms_per_layer, bytes_mode)
    bwd_w = _pass_time(dev, mm_bw, 0.0, cost.bwd_bytes / tp * (1 - share_in), dtype, gemms_per_layer, bytes_mode)
    ar = 0.0
    if tp > 1 and tp_allreduces > 0:
        link = cluster.intra_node if tp <= cluster.gpus_per_node else cluster.inter_node
        ar = tp_allreduces * allreduce_time(cost.out_bytes, tp, link)
    return LayerTime(fwd=fwd, bwd_in=bwd_in, bwd_w=bwd_w, tp_fwd=ar, tp_bwd=ar)


def _dense_attention(cm: CostModel, path: str, stats: LengthStats, cost: LayerCost) -> LayerCost:
    """``cost`` with its attention FLOPs counted densely over packed streams (see module docstring)."""
    from dataclasses import replace

    from dipc.semu.costs import STAT_SYMBOLS

    bound = set(cm.expr(path).binding.values())
    padded, padded_ctx = STAT_SYMBOLS[3] in bound, STAT_SYMBOLS[7] in bound   # T / Tc: a padded stream
    ctx = stats.context
    if ctx is not None and not padded_ctx:
        ctx = replace(ctx, sum_sq=ctx.tokens * ctx.tokens)
    dense = replace(stats, sum_sq=stats.sum_sq if padded else stats.tokens * stats.tokens, context=ctx,
                    cross_pairs=(stats.tokens * stats.context.tokens if stats.context is not None
                                 and not (padded or padded_ctx) else stats.cross_pairs))
    extra = cm.cost(path, dense).attn_fwd_flops - cost.attn_fwd_flops
    if extra <= 0:
        return cost
    return replace(cost, fwd_flops=cost.fwd_flops + extra, bwd_in_flops=cost.bwd_in_flops + 2 * extra,
                   attn_fwd_flops=cost.attn_fwd_flops + extra)


# ------------------------------------------------------------------------------------------------
# length statistics per layer


def stats_for_layer(stats: StatsLike, path: str) -> LengthStats:
    """The statistics layer ``path`` sees: the entry of the longest module-path prefix of ``path``
    (``""`` matches every layer), or ``stats`` itself when it is one LengthStats."""
    if isinstance(stats, LengthStats):
        return stats
    best = max((k for k in stats if k == "" or path == k or path.startswith(k + ".")), key=len, default=None)
    if best is None:
        raise StepModelError(f"no length statistics for layer {path!r} (given prefixes {sorted(stats)}). "
                             "Fix: add an entry for its module path prefix, or '' for all layers.")
    return stats[best]


_lookup = stats_for_layer


def sub_length_stats(pipe: Any, microbatches: Sequence[Mapping[str, Any]]
                     ) -> dict[tuple[int, int], dict[str, LengthStats]]:
    """``(mb, sub) -> statistics`` of every sub-microbatch of a compiled pipeline with
    ``sub_microbatches`` (``StepModel(sub_stats=...)``): the microbatch with the split modality's
    keys replaced by the sub's, through :func:`pipeline_length_stats`."""
    return {(m, j): pipeline_length_stats(pipe, {**microbatches[m], **part})
            for (_, m, j), part in pipe.sub_batches(microbatches).items()}


# ------------------------------------------------------------------------------------------------
# stages and the step


def first_weight_backwards(program: Program) -> frozenset[tuple[int, int, int]]:
    """``(stage, mb, sub)`` of each stage's first BWD or BWD_W in its rank's stream: where the
    step allocates the stage's parameter gradients. Remembered for the last few programs' streams
    (immutable; phase 3's fitted copies share them): phase 3 asks once per rank and the emulator
    once per simulation, and on a VLM-L batch each walk of every stream took ~5 ms."""
    hit = _FIRSTS.get(id(program.streams))
    if hit is not None and hit[0] is program.streams:
        return hit[1]
    seen: dict[int, tuple[int, int, int]] = {}
    bwd, bwd_w = Op.BWD, Op.BWD_W
    for stream in program.streams:
        for ins in stream:
            op = ins.op
            if (op is bwd or op is bwd_w) and ins.stage not in seen:
                seen[ins.stage] = (ins.stage, ins.mb, ins.sub)
    firsts = frozenset(seen.values())
    if len(_FIRSTS) >= 8:
        try:
            _FIRSTS.pop(next(iter(_FIRSTS)))
        except (StopIteration, KeyError, RuntimeError):   # another planner thread got there first
            _FIRSTS.clear()
    _FIRSTS[id(program.streams)] = (program.streams, firsts)   # held, so the id is not reused meanwhile
    return firsts


_FIRSTS: dict[int, tuple[tuple, frozenset[tuple[int, int, int]]]] = {}


@dataclass(frozen=True, slots=True)
class StageTime:
    """Seconds of one stage on one microbatch (per GPU, TP collectives included)."""

    fwd: float
    bwd_in: float
    bwd_w: float
    comm: float      # the TP-collective part of the three above

    @property
    def bwd(self) -> float:
        return self.bwd_in + self.bwd_w

    @property
    def total(self) -> float:
        return self.fwd + self.bwd_in + self.bwd_w


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _module_dtype(module: torch.nn.Module) -> str | None:
    for t in list(module.parameters()) + list(module.buffers()):
        if t.is_floating_point():
            return _dtype_name(t.dtype)
    return None


def stage_ops(cost_model: CostModel, layers: Sequence[str], op: str, input_grads: bool = True,
              wgrad_recomputes: bool = False) -> int:
    """ATen ops the instruction ``op`` dispatches over a stage's ``layers`` (counted by the
    symbolic trace; :mod:`dipc.semu.calibrate` fits a time per op); without ``input_grads`` BWD_I
    does nothing and BWD_W the whole backward (also when ``wgrad_recomputes``: BWD_W walks whole,
    see :class:`StepModel`)."""
    if op == "BWD_I" and not input_grads:
        return 0
    if op == "BWD_W" and (wgrad_recomputes or not input_grads):
        return stage_ops(cost_model, layers, "BWD")
    total = 0
    for p in layers:
        ops = cost_model.expr(p).local.ops
        if not ops:
            raise StepModelError(f"layer {p!r} has no op counts. Fix: rebuild the cost model with this dipc "
                                 "(layer_cost_model counts ops while tracing).")
        if op == "FWD":
            total += ops["fwd"]
        elif op == "BWD":
            total += ops["bwd"]
        elif op == "BWD_I":
            total += ops["bwd_in"]
        else:
            total += max(ops["bwd"] - ops["bwd_in"], 0)
    return total


class StepModel:
    """Per-instruction times and memory of a pipeline step (see the module docstring).

    ``stage_layers[s]``: layer paths of stage ``s`` (stage ids are positions). ``microbatch_stats[m]``:
    the statistics of microbatch ``m`` (a prefix -> LengthStats mapping, or one LengthStats for all
    layers). ``dtype``: compute dtype name for every layer, or a path -> name mapping; default
    ``layer_dtypes`` (filled by :meth:`for_pipeline` from the modules' parameters), else bfloat16.
    ``dp``: data-parallel degree; REDUCE then takes a ring all-reduce of the stage's gradients.
    ``sub_stats[(m, j)]``: the statistics of sub-microbatch ``j`` of microbatch ``m`` (see
    :func:`sub_length_stats`); an instruction with ``sub=j`` is timed and its activations
    counted from these, so a program with sub-microbatches is scored from each sub's own lengths.
    ``no_input_grads``: stages whose inputs take no gradient (the first stage): their BWD_I does
    nothing (0 s) and their BWD_W runs the whole backward.
    ``wgrad_recomputes``: BWD_W walks the whole backward graph again (activation gradients
    included) and costs a full backward; False (the default) models the zero-bubble split dipc's
    interpreter runs (:mod:`dipc.runtime.split_backward`: BWD_W runs only the weight-gradient
    nodes). The interpreter still re-walks in stages with recomputed layers; not modelled here.
    ``whole_wgrad_stages``: stages whose split backward walks the whole graph in BWD_W anyway (a
    parameter shared across depths, :meth:`dipc.api.Pipeline.whole_wgrad_stages`): their BWD_W
    costs a full backward, their BWD_I still the input-gradient pass.
    ``loss_stages``: stages whose glue computes the loss over their last layer's output (filled by
    :meth:`for_pipeline`); their forward and backward get the loss head's workspace.
    """

    def __init__(self, cost_model: CostModel, cluster: ClusterProfile, stage_layers: Sequence[Sequence[str]],
                 microbatch_stats: Sequence[StatsLike], *, tp: int = 1, dp: int = 1,
                 dtype: str | Mapping[str, str] | None = None,
                 tp_allreduces: Callable[[str], int] | None = None, gemms_per_layer: int = 4,
                 bytes_mode: str | None = None,
                 sub_stats: Mapping[tuple[int, int], StatsLike] | None = None, no_input_grads: Sequence[int] = (),
                 wgrad_recomputes: bool = False, whole_wgrad_stages: Sequence[int] = (),
                 loss_stages: Sequence[int] = ()) -> None:
        if tp < 1 or dp < 1:
            raise StepModelError(f"tp={tp}, dp={dp}. Fix: pass degrees >= 1.")
        unknown = [p for layers in stage_layers for p in layers if p not in cost_model.exprs]
        if unknown:
            raise StepModelError(f"layers {unknown[:3]} are not in the cost model. Fix: build the cost model "
                                 "from the same captured model as the stages (layer_cost_model(pipe.captured)).")
        self.cost_model = cost_model
        self.cluster = cluster
        self.stage_layers = [list(layers) for layers in stage_layers]
        self.microbatch_stats = list(microbatch_stats)
        self.sub_stats = dict(sub_stats or {})
        self.tp, self.dp = tp, dp
        self.dtype = dtype
        self.tp_allreduces = tp_allreduces
        self.gemms_per_layer = gemms_per_layer
        self.bytes_mode = bytes_mode or cluster.device.bytes_mode
        self.no_input_grads = frozenset(no_input_grads)
        self.wgrad_recomputes = wgrad_recomputes
        self.whole_wgrad_stages = frozenset(whole_wgrad_stages)
        self.loss_stages = frozenset(loss_stages)
        self._layer_cache: dict[tuple, LayerTime] = {}
        self._stage_cache: dict[tuple[int, int, int], StageTime] = {}
        self._act_cache: dict[tuple[int, int, int], float] = {}
        self._seed_cache: dict[tuple[int, int, int], float] = {}
        self._footprint_cache: dict[tuple[int, int, str], Footprint] = {}
        self._ops_cache: dict[tuple[Op, int], int] = {}
        self._per_op_dispatch = bool(cluster.device.kind_op_overheads)   # compute_time runs per instruction
        self._costs_cache: dict[tuple[int, int, int], list[LayerCost]] = {}
        self._workspace_cache: dict[tuple[Op, int, int, int, bool, bool, frozenset[str]], float] = {}
        self._walk_cache: dict[tuple[int, int, int], tuple[np.ndarray, ...]] = {}
        self._walk_list_cache: dict[tuple[int, int, int], tuple[list[float], ...]] = {}
        self._unit_keys: dict[tuple[int, int], tuple[int, int]] = {}
        self._overheads: dict = {}
        # (op, stage, mb, sub) -> compute_time, for the profile they were computed on (see timed)
        self._times: dict[tuple[Op, int, int, int], float] = {}
        self._times_of: tuple | None = None
        self._units_by_stats: dict[tuple, tuple[int, int]] = {}
        # (is a FWD, stage, unit mb, unit sub, recomputed layers) -> seconds a plan adds there
        # (dipc.semu.recompute_costs.recompute_compute_time): shared by every plan scored on this model
        self.recompute_seconds_cache: dict[tuple[bool, int, int, int, frozenset[str]], float] = {}
        # which of the caller's microbatches each slot of microbatch_stats holds (empty: slot m is m);
        # set by reordered(), read by for_program()
        self.microbatch_order: tuple[int, ...] = ()
        self._reorders: dict[tuple[int, ...], StepModel] = {}

    @staticmethod
    def runtime_options(pipe: Any) -> dict[str, Any]:
        """The options that make the model follow dipc's interpreter rather than an ideal runtime:
        the stages without input gradients (their BWD_W runs the whole backward) and those whose
        split backward walks whole anyway (probed once, :meth:`dipc.api.Pipeline.whole_wgrad_stages`).
        Elsewhere BWD_W no longer re-walks the activation gradients
        (:mod:`dipc.runtime.split_backward`), so ``wgrad_recomputes`` is off. Calibration and the
        accuracy benchmark use these options."""
        return {"no_input_grads": [s.id for s in pipe.stages if not s.grad_producers], "wgrad_recomputes": False,
                "whole_wgrad_stages": sorted(pipe.whole_wgrad_stages())}

    def wgrad_is_whole(self, stage: int) -> bool:
        """Whether BWD_W of ``stage`` runs the whole backward (see the class docstring)."""
        return self.wgrad_recomputes or stage in self.no_input_grads or stage in self.whole_wgrad_stages

    @classmethod
    def for_pipeline(cls, pipe: Any, cost_model: CostModel, cluster: ClusterProfile,
                     microbatch_stats: Sequence[StatsLike], **kwargs: Any) -> "StepModel":
        """A step model of a compiled pipeline (``dipc.compile``): its stages' layers, and each
        layer's compute dtype read from its parameters (unless ``dtype=`` is given)."""
        stages = sorted(pipe.stages, key=lambda s: s.id)
        kwargs.setdefault("loss_stages", [s.id for s in stages if s.has_loss])
        if kwargs.get("dtype") is None:
            gm = pipe.captured.graph_module
            kwargs["dtype"] = {p: _module_dtype(gm.get_submodule(p)) or "float32"
                               for s in stages for p in s.layers}
        return cls(cost_model, cluster, [s.layers for s in stages], microbatch_stats, **kwargs)

    def for_program(self, program: Program) -> "StepModel":
        """The model whose microbatch slots are ``program``'s: this one, or for a program that
        runs the batch in another order (``Program.microbatch_order``) this model reordered so
        (cached). A model describes the caller's batch unless :meth:`reordered` made it, so a plan
        that reorders its batch is scored on its own slots however the model was made; a model
        reordered some other way cannot score it and raises."""
        order = program.microbatch_order
        if not order or order == self.microbatch_order:
            return self
        if self.microbatch_order:
            raise StepModelError(f"the program runs the batch's microbatches in order {list(order)}, this model in "
                                 f"order {list(self.microbatch_order)}. Fix: score it on a model of the batch as "
                                 "given (step_model(pipe, microbatches)).")
        hit = self._reorders.get(order)
        if hit is None:
            hit = self._reorders[order] = self.reordered(order)
        return hit

    def reordered(self, order: Sequence[int]) -> "StepModel":
        """This model for the same microbatches run in ``order`` (slot ``m`` runs microbatch
        ``order[m]``, as ``Program.microbatch_order``): the statistics permuted, the layer times
        (keyed by layer signature and statistics, not by microbatch) shared with this model.
        Its ``microbatch_order`` says which of the caller's microbatches each slot holds."""
        slot_of = {i: m for m, i in enumerate(order)}
        if sorted(slot_of) != list(range(len(self.microbatch_stats))):
            raise StepModelError(f"order {list(order)} is not a permutation of the model's "
                                 f"{len(self.microbatch_stats)} microbatches. Fix: pass each index once.")
        new = StepModel(self.cost_model, self.cluster, self.stage_layers, [self.microbatch_stats[i] for i in order],
                        tp=self.tp, dp=self.dp, dtype=self.dtype, tp_allreduces=self.tp_allreduces,
                        gemms_per_layer=self.gemms_per_layer, bytes_mode=self.bytes_mode,
                        sub_stats={(slot_of[m], j): s for (m, j), s in self.sub_stats.items()},
                        no_input_grads=self.no_input_grads, wgrad_recomputes=self.wgrad_recomputes,
                        whole_wgrad_stages=self.whole_wgrad_stages, loss_stages=self.loss_stages)
        new._layer_cache = self._layer_cache
        new.microbatch_order = tuple(self.microbatch_order[i] for i in order) if self.microbatch_order else tuple(order)
        return new

    # -- per layer -----------------------------------------------------------------------------
    def layer_dtype(self, path: str) -> str:
        if isinstance(self.dtype, str):
            return self.dtype
        if isinstance(self.dtype, Mapping):
            return self.dtype.get(path, "bfloat16")
        return "bfloat16"

    def num_allreduces(self, path: str) -> int:
        """TP all-reduces per pass of layer ``path`` (see the module docstring)."""
        if self.tp_allreduces is not None:
            return int(self.tp_allreduces(path))
        calls = self.cost_model.expr(path).local.attention
        return len(calls) + 1 if calls else 0

    def layer_time(self, path: str, stats: LengthStats) -> LayerTime:
        """:class:`LayerTime` of layer ``path`` at ``stats`` (cached by signature and statistics)."""
        dtype, n_ar = self.layer_dtype(path), self.num_allreduces(path)
        key = (self.cost_model.signature(path), stats.values(), dtype, n_ar)
        hit = self._layer_cache.get(key)
        if hit is None:
            dev = self.cluster.device
            cost = self.cost_model.cost(path, stats)
            if dev.dense_masked_attention and cost.attn_fwd_flops > 0:
                cost = _dense_attention(self.cost_model, path, stats, cost)
            t = layer_time(cost, self.cluster, tp=self.tp, dtype=dtype, tp_allreduces=n_ar,
                           gemms_per_layer=self.gemms_per_layer, bytes_mode=self.bytes_mode)
            if dev.dense_masked_attention and cost.attn_probs_bytes > 0 and (dev.probs_fwd_byte_time
                                                                            or dev.probs_bwd_byte_time):
                t = LayerTime(fwd=t.fwd + dev.probs_fwd_byte_time * cost.attn_probs_bytes,
                              bwd_in=t.bwd_in + dev.probs_bwd_byte_time * cost.attn_probs_bytes,
                              bwd_w=t.bwd_w, tp_fwd=t.tp_fwd, tp_bwd=t.tp_bwd)
            if dev.op_overhead:
                ops = self.cost_model.expr(path).local.ops
                f, bi, b = ops.get("fwd", 0), ops.get("bwd_in", 0), ops.get("bwd", 0)
                oo = dev.op_overhead
                t = LayerTime(fwd=t.fwd + f * oo, bwd_in=t.bwd_in + bi * oo, bwd_w=t.bwd_w + max(b - bi, 0) * oo,
                              tp_fwd=t.tp_fwd, tp_bwd=t.tp_bwd)
            hit = self._layer_cache[key] = t
        return hit

    def _stats(self, mb: int, sub: int = -1) -> StatsLike:
        if sub >= 0:
            try:
                return self.sub_stats[(mb, sub)]
            except KeyError:
                raise StepModelError(f"no statistics for sub-microbatch {sub} of microbatch {mb}. Fix: pass "
                                     "sub_stats=sub_length_stats(pipe, microbatches).") from None
        try:
            return self.microbatch_stats[mb]
        except IndexError:
            raise StepModelError(f"no statistics for microbatch {mb} ({len(self.microbatch_stats)} given). "
                                 "Fix: pass one entry per microbatch of the program.") from None

    def unit_key(self, mb: int, sub: int = -1) -> tuple[int, int]:
        """The first (microbatch, sub) seen with the same length statistics as (``mb``, ``sub``).

        Every per-unit number (times, stashes, workspace, footprints) depends on a unit's
        statistics only, and a batch's sub-microbatches repeat them a lot (a caption batch's ~650
        one-image subs have ~16 distinct statistics), so the per-unit caches compute each number
        once per distinct statistics and file it under every unit that shares them."""
        key = (mb, sub)
        hit = self._unit_keys.get(key)
        if hit is None:
            stats = self._stats(mb, sub)
            sig = (stats.values() if isinstance(stats, LengthStats) else
                   tuple(sorted((k, v.values()) for k, v in stats.items())))
            hit = self._unit_keys[key] = self._units_by_stats.setdefault(sig, key)
        return hit

    def _layers(self, stage: int) -> list[str]:
        try:
            return self.stage_layers[stage]
        except IndexError:
            raise StepModelError(f"stage {stage} unknown ({len(self.stage_layers)} stages given). Fix: pass "
                                 "the layers of every stage of the program.") from None

    # -- per stage -----------------------------------------------------------------------------
    def stage_time(self, stage: int, mb: int, sub: int = -1) -> StageTime:
        """Seconds of stage ``stage`` on microbatch ``mb`` (its sub-microbatch ``sub``; cached)."""
        key = (stage, mb, sub)
        hit = self._stage_cache.get(key)
        if hit is None:
            unit = self.unit_key(mb, sub)
            if unit != (mb, sub):
                hit = self._stage_cache[key] = self.stage_time(stage, *unit)
                return hit
            stats = self._stats(mb, sub)
            f = bi = bw = comm = 0.0
            for p in self._layers(stage):
                t = self.layer_time(p, _lookup(stats, p))
                f += t.fwd + t.tp_fwd
                bi += t.bwd_in + t.tp_bwd
                bw += t.bwd_w
                comm += t.comm
            hit = self._stage_cache[key] = StageTime(fwd=f, bwd_in=bi, bwd_w=bw, comm=comm)
        return hit

    def stage_cost(self, stage: int, mb: int) -> LayerCost:
        """Summed (un-split, whole-TP-group) costs of the stage's layers on microbatch ``mb``."""
        stats = self._stats(mb)
        layers = self._layers(stage)
        if isinstance(stats, LengthStats):
            return self.cost_model.cost_sum(layers, stats)
        groups: dict[int, tuple[LengthStats, list[str]]] = {}
        for p in layers:
            s = _lookup(stats, p)
            groups.setdefault(id(s), (s, []))[1].append(p)
        parts = [self.cost_model.cost_sum(ps, s) for s, ps in groups.values()]
        if not parts:
            return LayerCost(**{f: 0 for f in LayerCost.__slots__})
        return LayerCost(**{f: sum(getattr(c, f) for c in parts) for f in LayerCost.__slots__})

    def static_bytes(self, stage: int) -> float:
        """Parameters + gradients + optimizer states of the stage, per GPU (÷ tp)."""
        cm = self.cost_model
        total = 0
        for p in self._layers(stage):
            sig = cm.signature(p)
            pb, gb, ob, _ = cm._static[sig]
            total += pb + gb + ob
        return total / self.tp

    def grad_bytes(self, stage: int) -> float:
        """The stage's parameter gradients, per GPU (÷ tp)."""
        cm = self.cost_model
        return sum(cm._static[cm.signature(p)][1] for p in self._layers(stage)) / self.tp

    def workspace_bytes(self, ins: Instruction, first: bool = False, rewalk: bool = False,
                        recompute: frozenset[str] = frozenset()) -> float:
        """Peak transient bytes while a compute instruction runs, above the memory before it.

        Walks the stage's layers the way autograd does (loss head, then the layers in reverse): a
        layer's backward holds its output gradient and, on top, its own traced peak
        (``bwd_peak_bytes``: the gradients it creates less the stash it frees by then, at least
        its input gradient); on a loss stage the loss
        head materialises one copy of the last layer's output (log-softmax over the vocabulary) in
        the forward and two (its gradient and the output's) in the backward. Only BWD frees each
        layer's stash once past it (BWD_I keeps the graph for BWD_W, which walks it with
        ``retain_graph``), and ``first`` (the stage's first weight backward of the step) allocates
        the layer's parameter gradients as it goes. Where nothing is freed on the way, a masked
        attention whose kernel materialises the probabilities (``dense_masked_attention``) holds
        two probability-sized gradients at once on top (dP, then dS from the softmax backward);
        under BWD that transient takes the place of the probabilities autograd just freed. A BWD_I
        that captures BWD_W's seeds (:meth:`captures_seeds`; not when its unit recomputes layers,
        ``rewalk``) gathers them as it goes and holds them all at its end.

        ``recompute``: the checkpointed layers this instruction re-runs (its unit's plan entries,
        :mod:`dipc.semu.recompute_costs`). A re-run layer's rebuilt activations exist while *its*
        backward runs, on top of what the walk holds there, and a BWD frees each layer's stash as
        the plan left it (a checkpointed layer: its input). Charging the largest re-run on top of
        the loss head's peak instead over-predicted loss ranks by 16-19% (the re-run comes after
        the later layers' stashes are freed)."""
        op = ins.op
        if op not in _COMPUTE:
            return 0.0
        key = (op, ins.stage, ins.mb, ins.sub, bool(first), bool(rewalk), recompute)
        hit = self._workspace_cache.get(key)
        if hit is None:       # the emulator asks once per instruction, per simulated candidate
            unit = self.unit_key(ins.mb, ins.sub)
            if unit != (ins.mb, ins.sub):    # units of equal statistics share one walk
                hit = self.workspace_bytes(replace(ins, mb=unit[0], sub=unit[1]), first, rewalk, recompute)
            else:
                hit = self._walk_one(ins, first, rewalk, recompute)
            self._workspace_cache[key] = hit
        return hit

    def _walk_one(self, ins: Instruction, first: bool, rewalk: bool, recompute: frozenset[str]) -> float:
        """:meth:`workspace_choices` for one choice, as a plain loop: the emulator asks per
        instruction, where numpy's per-call cost (~50 us) is most of the walk. The two must agree
        (tests/semu/test_recompute_memory.py checks them against each other)."""
        op = ins.op
        costs = self._stage_costs(ins.stage, ins.mb, ins.sub)
        loss = costs[-1].out_bytes / self.tp if ins.stage in self.loss_stages and costs else 0.0
        if op is _FWD:
            return loss
        if not costs:
            return 0.0
        frees = op is _BWD
        makes_grads = first and op is not _BWD_I
        captures = op is _BWD_I and self.captures_seeds(ins.stage) and not rewalk
        dense = not frees and self.cluster.device.dense_masked_attention
        act, inp, sel_b, held, probs_b, grads, seeds = self._walk_lists(ins.stage, ins.mb, ins.sub)
        modes = [layer_mode(p, recompute) for p in self._layers(ins.stage)] if recompute else None
        peak, live = 2 * loss, 0.0
        for k in range(len(costs) - 1, -1, -1):    # autograd walks the layers last to first
            mode = modes[k] if modes else NONE
            if makes_grads:
                live += grads[k]
            here = live + held[k] + (2.0 * probs_b[k] if dense else 0.0)
            if mode != NONE:                        # ``recompute`` is given only where this re-runs
                here += max(act[k] - (inp[k] if mode == FULL else sel_b[k]), 0.0)
            peak = max(peak, here)
            if frees:
                live -= act[k] if mode == NONE else inp[k] if mode == FULL else sel_b[k]
            if captures:
                live += seeds[k]
        return max(peak, live, 0.0)

    def _walk_lists(self, stage: int, mb: int, sub: int) -> tuple[list[float], ...]:
        key = (stage, mb, sub)
        hit = self._walk_list_cache.get(key)
        if hit is None:
            hit = self._walk_list_cache[key] = tuple(a.tolist() for a in self._walk_arrays(stage, mb, sub))
        return hit

    def _mode_masks(self, stage: int, choices: Sequence[frozenset[str]]) -> tuple[np.ndarray, np.ndarray]:
        """(full, selective) 0/1 masks, one row per recompute choice, one column per stage layer."""
        modes = np.array([[layer_mode(p, c) for p in self._layers(stage)] for c in choices], dtype=int).reshape(
            len(choices), -1)
        return (modes == FULL).astype(float), (modes == SELECTIVE).astype(float)

    def workspace_choices(self, ins: Instruction, first: bool, full: np.ndarray, sel: np.ndarray,
                          rewalk: np.ndarray, reruns: bool) -> np.ndarray:
        """:meth:`workspace_bytes` of ``ins`` for several recompute choices at once (phase 3's
        candidates): ``full`` / ``sel`` are (choices x stage layers) 0/1 masks of the layers each
        choice checkpoints fully / selectively, ``rewalk`` per choice whether its unit recomputes
        (no seeds captured), ``reruns`` whether this instruction re-runs checkpointed layers.
        Bytes per GPU (÷ tp), one per choice."""
        op = ins.op
        n = full.shape[0]
        if op not in _COMPUTE:
            return np.zeros(n)
        unit = self.unit_key(ins.mb, ins.sub)
        mb, sub = unit
        costs = self._stage_costs(ins.stage, mb, sub)
        tp = self.tp
        loss = costs[-1].out_bytes / tp if ins.stage in self.loss_stages and costs else 0.0
        if op is _FWD:
            return np.full(n, loss)
        if not costs:
            return np.zeros(n)
        frees = op is _BWD
        makes_grads = first and op is not _BWD_I
        captures = op is _BWD_I and self.captures_seeds(ins.stage)
        act, inp, sel_b, held, probs_b, grads, seeds = self._walk_arrays(ins.stage, mb, sub)
        if not frees and self.cluster.device.dense_masked_attention:
            held = held + 2.0 * probs_b
        gain = np.tile(grads, (n, 1)) if makes_grads else np.zeros((n, len(costs)))
        after = np.zeros((n, len(costs)))      # what changes once the walk is past a layer
        if frees:
            after -= full * inp + sel * sel_b + (1.0 - full - sel) * act
        if captures:
            after += np.outer(~np.asarray(rewalk, dtype=bool), seeds)
        rebuilt = (full * np.maximum(act - inp, 0.0) + sel * np.maximum(act - sel_b, 0.0)) if reruns else 0.0
        # autograd walks the layers last to first
        g, a = gain[:, ::-1].cumsum(axis=1), after[:, ::-1].cumsum(axis=1)
        live = g + np.concatenate([np.zeros((n, 1)), a[:, :-1]], axis=1)
        peak = (live + held[::-1] + (rebuilt[:, ::-1] if reruns else 0.0)).max(axis=1)
        return np.maximum(np.maximum(np.maximum(peak, 2 * loss), g[:, -1] + a[:, -1]), 0.0)

    def _walk_arrays(self, stage: int, mb: int, sub: int) -> tuple[np.ndarray, ...]:
        """Per layer of ``stage`` on a unit, per GPU: stash, stream input, selective stash, what
        its backward holds (output gradient + its own peak), masked-attention probabilities,
        parameter gradients and captured seeds; the walk's inputs, built once per unit."""
        key = (stage, mb, sub)
        hit = self._walk_cache.get(key)
        if hit is None:
            tp = self.tp
            costs = self._stage_costs(stage, mb, sub)   # the footprints' bytes, without their times
            hit = self._walk_cache[key] = (
                np.array([self._stash(c) / tp for c in costs]), np.array([c.in_bytes / tp for c in costs]),
                np.array([self._sel_stash(c) / tp for c in costs]),
                np.array([(c.out_bytes + max(c.in_bytes, c.bwd_peak_bytes)) / tp for c in costs]),
                np.array([c.attn_probs_bytes / tp for c in costs]), np.array([c.grad_bytes / tp for c in costs]),
                np.array([c.wgrad_seed_bytes / tp for c in costs]))
        return hit

    def captures_seeds(self, stage: int) -> bool:
        """Whether BWD_I of ``stage`` captures gradients for BWD_W (:mod:`dipc.runtime.split_backward`):
        it runs an input-gradient pass and the model follows dipc's split (not ``wgrad_recomputes``)."""
        return stage not in self.no_input_grads and not self.wgrad_recomputes

    def wgrad_seed_bytes(self, stage: int, mb: int, sub: int = -1) -> float:
        """Bytes a BWD_I of ``stage`` on (``mb``, ``sub``) keeps alive until its BWD_W besides the
        stash, per GPU (÷ tp): the gradients it captured at the layers' intermediates
        (``LayerCost.wgrad_seed_bytes``), BWD_W's seeds. 0 where it captures none, and where BWD_W
        walks the whole backward (``whole_wgrad_stages``: BWD_I drops what it captured). A unit
        that recomputes layers captures none either; :func:`recompute_memory_model` says so.
        Not modelled: captures in the glue between layers (a VLM's text embeddings merging with
        the image features: ~2% of the VLM's), and the stage's received output gradients, which
        BWD_W also keeps (one activation, small next to the seeds)."""
        if not self.captures_seeds(stage) or stage in self.whole_wgrad_stages:
            return 0.0
        key = (stage, mb, sub)
        hit = self._seed_cache.get(key)
        if hit is None:
            hit = self._seed_cache[key] = sum(c.wgrad_seed_bytes for c in self._stage_costs(stage, mb, sub)) / self.tp
        return hit

    def _stage_costs(self, stage: int, mb: int, sub: int = -1) -> list[LayerCost]:
        """Each layer's :class:`LayerCost` of ``stage`` on (``mb``, ``sub``), in order (cached)."""
        key = (stage, mb, sub)
        hit = self._costs_cache.get(key)
        if hit is None:
            unit = self.unit_key(mb, sub)
            if unit != (mb, sub):
                hit = self._costs_cache[key] = self._stage_costs(stage, *unit)
                return hit
            stats = self._stats(mb, sub)
            hit = self._costs_cache[key] = [self.cost_model.cost(p, _lookup(stats, p)) for p in self._layers(stage)]
        return hit

    def activation_bytes(self, stage: int, mb: int, sub: int = -1) -> float:
        """Activations the stage's forward on ``mb`` (sub ``sub``) keeps for backward, per GPU (÷ tp)."""
        key = (stage, mb, sub)
        hit = self._act_cache.get(key)
        if hit is None:
            hit = self._act_cache[key] = sum(self._stash(c) for c in self._stage_costs(stage, mb, sub)) / self.tp
        return hit

    def _selective(self, path: str, cost: LayerCost) -> tuple[float, float, float]:
        """(stash bytes for all of TP, seconds of one re-run, seconds added to its forward) of
        ``path`` under selective checkpointing: the traced stash of its kept outputs (plus the
        masked-attention scores a dense kernel keeps, as in :meth:`_stash`); its other forward ops
        at the device's elementwise speed plus their per-op overhead (no TP all-reduce: it is not
        re-run); and the profile's ``sac_op_overhead`` per forward op, in the forward and the re-run."""
        if cost.sel_act_bytes <= 0:
            return 0.0, 0.0, 0.0
        dev = self.cluster.device
        dense = dev.dense_masked_attention and cost.attn_probs_bytes > 0
        stash = self._sel_stash(cost)
        secs = _pass_time(dev, 0.0, 0.0, cost.sel_rerun_bytes / self.tp, self.layer_dtype(path),
                          self.gemms_per_layer, self.bytes_mode)
        if dense and dev.probs_fwd_byte_time:   # the softmax over the kept scores is re-run
            secs += dev.probs_fwd_byte_time * cost.attn_probs_bytes
        ops = self.cost_model.expr(path).local.ops
        if dev.op_overhead:
            secs += ops.get("sel_fwd", 0) * dev.op_overhead
        dispatch = ops.get("fwd", 0) * dev.sac_op_overhead   # torch's modes see every forward op
        return stash, secs + dispatch, dispatch

    def _sel_stash(self, cost: LayerCost) -> float:
        """Bytes a selectively checkpointed layer keeps (all of TP; 0: no selective choice)."""
        if cost.sel_act_bytes <= 0:
            return 0.0
        dense = self.cluster.device.dense_masked_attention and cost.attn_probs_bytes > 0
        return cost.sel_act_bytes + (cost.attn_probs_bytes if dense else 0.0)

    def _stash(self, cost: LayerCost) -> float:
        """Bytes a layer keeps for backward: its traced stash, plus the dense softmax probabilities
        of masked attention where the device's kernel materialises them (``dense_masked_attention``)."""
        if self.cluster.device.dense_masked_attention:
            return cost.act_bytes + cost.attn_probs_bytes
        return cost.act_bytes

    def reduce_time(self, stage: int) -> float:
        """DP all-reduce of the stage's gradients (per GPU) over ``dp`` ranks on the inter-node link."""
        if self.dp <= 1:
            return 0.0
        cm = self.cost_model
        grad = sum(cm._static[cm.signature(p)][1] for p in self._layers(stage)) / self.tp
        return allreduce_time(grad, self.dp, self.cluster.inter_node)

    # -- what the emulator takes ---------------------------------------------------------------
    def instruction_overhead(self, op: Op) -> float:
        """The profile's fixed seconds per ``op`` instruction: its ``op_overheads`` entry, else (for
        compute instructions) ``instruction_overhead``, else 0 (cached per op and device)."""
        dev = self.cluster.device
        cache = self._overheads
        if cache.get(None) is not dev:
            cache.clear()
            cache[None] = dev
        hit = cache.get(op)
        if hit is None:
            hit = dev.op_overheads.get(op.value)
            if hit is None:
                hit = dev.instruction_overhead if op in _COMPUTE else 0.0
            cache[op] = hit
        return hit

    def comm_overhead(self, ins: Instruction) -> float:
        """CPU seconds a send or receive takes on its own rank (packing, copying; a ``ComputeTimeFn``
        for :func:`~dipc.semu.emulator.simulate`'s ``comm_overhead``)."""
        return self.instruction_overhead(ins.op)

    def dispatch_time(self, op: Op, stage: int) -> float:
        """The profile's ``kind_op_overheads`` time of a ``op`` instruction of ``stage``: seconds
        per ATen op of that kind times the ops the instruction dispatches (:func:`stage_ops`)."""
        per_op = self.cluster.device.kind_op_overheads.get(op.value)
        if not per_op:
            return 0.0
        key = (op, stage)
        hit = self._ops_cache.get(key)
        if hit is None:
            hit = self._ops_cache[key] = stage_ops(self.cost_model, self._layers(stage), op.value,
                                                   stage not in self.no_input_grads, self.wgrad_is_whole(stage))
        return hit * per_op

    def compute_time(self, ins: Instruction) -> float:
        """Seconds ``ins`` occupies its rank's compute stream (a ``ComputeTimeFn``)."""
        op = ins.op
        fixed = self.instruction_overhead(op)
        if self._per_op_dispatch and op in _COMPUTE:
            fixed += self.dispatch_time(op, ins.stage)
        if op is _BWD_I and ins.stage in self.no_input_grads:
            return 0.0
        if op is _REDUCE:
            return self.reduce_time(ins.stage) + fixed
        return self.compute_seconds(op, ins.stage, ins.mb, ins.sub) + fixed

    def timed(self) -> Callable[[Instruction], float]:
        """:meth:`compute_time` memoised per (op, stage, mb, sub) for the current profile: the
        emulator asks once per instruction of every program a planner scores (VLM-L: ~350k asks
        per batch, each four method calls deep), and a batch's programs share their units."""
        of = (self.cluster, self.cluster.device)
        if self._times_of is None or self._times_of[0] is not of[0] or self._times_of[1] is not of[1]:
            self._times.clear()
            self._times_of = of
        times, slow = self._times, self.compute_time

        def compute(ins: Instruction) -> float:
            key = (ins.op, ins.stage, ins.mb, ins.sub)
            hit = times.get(key)
            if hit is None:
                hit = times[key] = slow(ins)
            return hit
        return compute

    def compute_seconds(self, op: Op, stage: int, mb: int, sub: int = -1) -> float:
        """Seconds of a FWD / BWD / BWD_I / BWD_W of ``stage`` on (``mb``, ``sub``), without the
        profile's fixed per-instruction overhead (0 for other ops): :meth:`compute_time` less
        that overhead, for bounds on compute orders that are not lowered yet."""
        if op is _FWD:
            return self.stage_time(stage, mb, sub).fwd
        if op is _BWD:
            return self.stage_time(stage, mb, sub).bwd
        if op is _BWD_I:
            return 0.0 if stage in self.no_input_grads else self.stage_time(stage, mb, sub).bwd_in
        if op is _BWD_W:
            if self.wgrad_is_whole(stage):
                return self.stage_time(stage, mb, sub).bwd
            return self.stage_time(stage, mb, sub).bwd_w
        return 0.0

    def layer_footprint(self, stage: int, mb: int, path: str, sub: int = -1) -> Footprint:
        """Layer ``path`` of ``stage`` on ``mb`` (sub ``sub``), per GPU: its stash, its stash when
        recomputed and one re-run of its forward (for :mod:`dipc.semu.recompute_costs`)."""
        key = (mb, sub, path)
        hit = self._footprint_cache.get(key)
        if hit is None:
            unit = self.unit_key(mb, sub)
            if unit != (mb, sub):
                hit = self._footprint_cache[key] = self.layer_footprint(stage, unit[0], path, unit[1])
                return hit
            stats = _lookup(self._stats(mb, sub), path)
            c, t = self.cost_model.cost(path, stats), self.layer_time(path, stats)
            sel_bytes, sel_seconds, sel_fwd = self._selective(path, c)
            # a full re-run: the layer's forward plus what torch's checkpointing adds per op (its
            # saved-tensor hooks and re-recording; the profile's ckpt_op_overhead, 0 on GPUs)
            ckpt = self.cost_model.expr(path).local.ops.get("fwd", 0) * self.cluster.device.ckpt_op_overhead
            hit = Footprint(act_bytes=self._stash(c) / self.tp, in_bytes=c.in_bytes / self.tp,
                            fwd_seconds=t.fwd + t.tp_fwd + ckpt, sel_bytes=sel_bytes / self.tp, sel_seconds=sel_seconds,
                            sel_fwd_seconds=sel_fwd)
            self._footprint_cache[key] = hit
        return hit

    def memory_model(self, program: Program | None = None) -> MemoryModel:
        """Per-GPU memory: parameters and optimizer states per stage, gradients from the stage's first
        backward on (the runtime frees them after the optimizer step), activations per (stage,
        microbatch), the seeds a BWD_I keeps for its BWD_W (:meth:`wgrad_seed_bytes`), a backward's
        workspace (:meth:`workspace_bytes`). The layers' ``act_bytes`` include each layer's input,
        so received messages are not counted again.
        With a ``program`` that recomputes layers, its recomputed layers stash only their inputs."""
        plan = recompute_plan(program) if program is not None else {}
        if plan:
            return recompute_memory_model(self, program, plan)
        firsts = first_weight_backwards(program) if program is not None else None

        def workspace(ins: Instruction) -> float:
            return self.workspace_bytes(ins, first=firsts is not None and (ins.stage, ins.mb, ins.sub) in firsts)

        return MemoryModel(static=lambda stage: self.static_bytes(stage) - self.grad_bytes(stage),
                           activations=lambda ins: self.activation_bytes(ins.stage, ins.mb, ins.sub),
                           seeds_for_wgrad=lambda ins: self.wgrad_seed_bytes(ins.stage, ins.mb, ins.sub),
                           grads=self.grad_bytes, workspace=workspace, count_messages=False)

    def simulate(self, program: Program, *, memory: bool = True, **kwargs: Any) -> SimResult:
        """:func:`dipc.semu.emulator.simulate` of ``program`` with this model's times (and memory),
        one pipeline rank spanning ``tp`` GPUs; the program's ``recompute`` attribute adds the
        re-run forwards to its backwards and shrinks the stashes."""
        if program.num_microbatches > len(self.microbatch_stats):
            raise StepModelError(f"the program has {program.num_microbatches} microbatches but "
                                 f"{len(self.microbatch_stats)} statistics were given. Fix: one per microbatch.")
        model = self.for_program(program)
        if model is not self:
            return model.simulate(program, memory=memory, **kwargs)
        kwargs.setdefault("gpus_per_rank", self.tp)
        kwargs.setdefault("p2p", self.cluster.p2p)   # the runtime's protocol the profile was fitted to
        kwargs.setdefault("recv_lookahead", self.cluster.recv_lookahead)
        if self.cluster.device.recv_wake_latency:
            kwargs.setdefault("wake_latency", self.cluster.device.recv_wake_latency)
        plan = recompute_plan(program)
        compute = recompute_compute_time(self.timed(), self, program, plan)
        if self.cluster.device.op_overheads:
            kwargs.setdefault("comm_overhead", self.comm_overhead)
        mem = self.memory_model(program) if memory else None
        slowdown = self.cluster.device.colocated_slowdown
        if not slowdown:
            return simulate(program, self.cluster, compute, memory=mem, **kwargs)
        from dipc.semu.contention import contended   # co-located CPU ranks (calibrated profiles only)

        record = kwargs.pop("record", True)
        return contended(lambda fn, rec: simulate(program, self.cluster, fn, memory=mem, record=rec, **kwargs),
                         compute, self.cluster, slowdown, gpus_per_rank=kwargs["gpus_per_rank"], record=record)


# ------------------------------------------------------------------------------------------------
# paper models: a chain of stages without a compiled pipeline


def chain_program(step: StepModel, num_microbatches: int, schedule: str = "1f1b", *,
                  message_dtype: str = "bfloat16", shard_messages: bool = True) -> Program:
    """The program of a linear chain of ``step``'s stages (stage ``s`` on rank ``s``), with each
    message the output of the sending stage's last layer on that microbatch (``out_bytes``; split
    over the TP group's GPUs, Megatron's scatter-gather, when ``shard_messages``)."""
    from dipc.ir.validate import validate
    from dipc.passes.codegen import build_program
    from dipc.semu.profiles import DTYPE_BYTES

    P = len(step.stage_layers)
    stages = [StageInfo(id=s, rank=s, producers=(s - 1,) if s else (), grad_producers=(s - 1,) if s else (),
                        loads=("batch",) if s == 0 else (), has_loss=s == P - 1) for s in range(P)]
    width = DTYPE_BYTES[message_dtype]

    def specs(kind: str, mb: int, producer: int, consumer: int, sub: int = -1):
        last = step._layers(producer)[-1]
        nbytes = step.cost_model.cost(last, _lookup(step._stats(mb), last)).out_bytes
        if shard_messages:
            nbytes /= step.tp
        return (TensorSpec(kind="tensor", dtype=message_dtype, shape=(max(1, int(nbytes // width)),)),)

    program = build_program(stages, P, num_microbatches, schedule, specs=specs)
    validate(program)
    return program


def best_contiguous_split(times: Sequence[float], num_stages: int) -> list[int]:
    """Stage sizes (layers per stage) of the contiguous split minimising the slowest stage, then
    maximising the fastest. Two exact DPs over prefix sums (O(stages · layers²))."""
    n = len(times)
    if not 1 <= num_stages <= n:
        raise StepModelError(f"cannot split {n} layers into {num_stages} non-empty stages. "
                             "Fix: use 1 <= num_stages <= number of layers.")
    prefix = [0.0]
    for t in times:
        prefix.append(prefix[-1] + t)
    inf = float("inf")
    best_max = [[inf] * (n + 1) for _ in range(num_stages + 1)]
    best_max[0][0] = 0.0
    for k in range(1, num_stages + 1):
        prev, row = best_max[k - 1], best_max[k]
        for j in range(k, n - (num_stages - k) + 1):
            pj = prefix[j]
            row[j] = min(max(prev[i], pj - prefix[i]) for i in range(k - 1, j))
    bound = best_max[num_stages][n] * (1 + 1e-12) + 1e-15
    best_min = [[-inf] * (n + 1) for _ in range(num_stages + 1)]
    choice = [[-1] * (n + 1) for _ in range(num_stages + 1)]
    best_min[0][0] = inf
    for k in range(1, num_stages + 1):
        prev, row, ch = best_min[k - 1], best_min[k], choice[k]
        for j in range(k, n - (num_stages - k) + 1):
            pj = prefix[j]
            for i in range(k - 1, j):
                c = pj - prefix[i]
                if c <= bound and prev[i] > -inf:
                    v = prev[i] if prev[i] < c else c
                    if v > row[j]:
                        row[j], ch[j] = v, i
    sizes, j = [], n
    for k in range(num_stages, 0, -1):
        i = choice[k][j]
        sizes.append(j - i)
        j = i
    return sizes[::-1]
