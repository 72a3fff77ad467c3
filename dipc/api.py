"""``dipc.compile``: model + example batch -> a compiled pipeline that plans and runs batches."""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
from torch import fx, nn
from torch.utils._pytree import tree_flatten

from dipc.dump import maybe_dump
from dipc.errors import BatchError, PartitionError, ScheduleError
from dipc.ir import Program, StageInfo
from dipc.passes.capture import CapturedModel, capture
from dipc.passes.layers import resolve_layers
from dipc.passes.partition import StageSpec, assign_layers, build_stages, layer_costs
from dipc.passes.shapes import ShapeInference
from dipc.passes.tag import LayerTag, tag_modalities

Batch = Mapping[str, Any]
OptimizerFactory = Callable[[list[nn.Parameter]], torch.optim.Optimizer]


def default_loss_weight(batch: Batch) -> float:
    """Number of label tokens that count (``labels != -100``); 1 for batches without labels.
    Weighting microbatch losses by this makes pipelined training equal full-batch training."""
    labels = batch.get("labels")
    if isinstance(labels, torch.Tensor):
        return float((labels != -100).sum())
    return 1.0


@dataclass
class StepResult:
    loss: float                      # full-batch loss (weighted mean of microbatch losses)
    microbatch_losses: list[float]
    seconds: float
    program: Program


@dataclass
class CompiledPipeline:
    """A model laid out as pipeline stages, ready to plan and run batches."""

    model: nn.Module
    captured: CapturedModel
    tags: list[LayerTag]
    stages: list[StageSpec]
    num_ranks: int
    chunks: int
    schedule: str
    loss_weight: Callable[[Batch], float] = default_loss_weight
    optimizer_factory: OptimizerFactory | None = None
    history: list[tuple[str, Any, float]] = field(default_factory=list)
    # microbatch -> per-module-prefix LengthStats for SEMU (dipc.semu.step_model.pipeline_length_stats);
    # None: derived from the batch keys dipc knows
    length_stats: Callable[[Batch], Any] | None = None

    def __post_init__(self) -> None:
        self.shapes = ShapeInference(self.stages)
        # which parameters train decides which stage edges carry gradients and what optimizers hold
        self.trainable = tuple(p.requires_grad for p in self.model.parameters())
        self.treespecs = {name: tree_flatten(v)[1] for name, v in self.captured.example_values.items()}
        self.optimizers: dict[int, torch.optim.Optimizer] = {}
        if self.optimizer_factory is not None:
            for r in range(self.num_ranks):
                params = self.rank_parameters(r)
                if params:
                    self.optimizers[r] = self.optimizer_factory(params)

    # -- inspection --------------------------------------------------------------------------
    @property
    def stage_infos(self) -> tuple[StageInfo, ...]:
        return tuple(StageInfo(id=s.id, rank=s.rank, modality=s.modality, producers=s.producers,
                               grad_producers=s.grad_producers, loads=tuple(s.input_keys), has_loss=s.has_loss)
                     for s in self.stages)

    def rank_parameters(self, rank: int) -> list[nn.Parameter]:
        return list(dict.fromkeys(p for s in self.stages if s.rank == rank for p in s.params if p.requires_grad))

    def describe(self) -> str:
        """The partition, one line per stage."""
        lines = [f"{len(self.stages)} stages on {self.num_ranks} ranks, schedule {self.schedule}"]
        for s in self.stages:
            layers = s.layers if len(s.layers) <= 3 else [s.layers[0], "...", s.layers[-1]]
            lines.append(f"  stage {s.id} rank {s.rank} [{s.modality}] {len(s.layers)} layers: {', '.join(layers)}")
        return "\n".join(lines)

    # -- planning ----------------------------------------------------------------------------
    def check_batch(self, microbatches: Sequence[Batch]) -> None:
        if not microbatches:
            raise BatchError("no microbatches given. Fix: pass a non-empty list of collated microbatches.")
        for m, mb in enumerate(microbatches):
            missing = [k for k in self.captured.input_keys if k not in mb]
            if missing:
                raise BatchError(f"microbatch {m} lacks batch key {missing[0]!r} that the example batch had "
                                 f"(it has {sorted(mb)}). Fix: give every microbatch the example batch's keys.")

    def plan(self, microbatches: Sequence[Batch], schedule: str | None = None,
             compute_orders: Sequence[Sequence[Any]] | None = None) -> Program:
        """The program for these microbatches (shapes of every message known, validated).

        ``compute_orders`` (one list of ``ComputeAction`` per rank, e.g. from
        :func:`dipc.passes.dual_queue.dual_queue_schedule` fed with SEMU's durations) replaces the
        named schedule's generator; ``schedule`` then only names the program.
        """
        from dipc.ir.validate import validate
        from dipc.passes.codegen import build_program, lower

        self.check_batch(microbatches)
        self.check_trainable()
        t0 = time.perf_counter()
        edge_specs = [self.shapes.edge_specs(mb) for mb in microbatches]

        def specs(kind: str, mb: int, producer: int, consumer: int):
            act, grad = edge_specs[mb][(producer, consumer)]
            return act if kind == "act" else grad

        if compute_orders is None:
            program = build_program(list(self.stage_infos), self.num_ranks, len(microbatches),
                                    schedule or self.schedule, specs=specs)
        else:
            program = lower(list(self.stage_infos), self.num_ranks, len(microbatches), compute_orders,
                            schedule=schedule or "custom", specs=specs)
        validate(program)
        maybe_dump(self, program, microbatches)
        entry = ("plan", program, (time.perf_counter() - t0) * 1e3)
        if self.history and self.history[-1][0] == "plan":   # keep the latest plan, not one per step
            self.history[-1] = entry
        else:
            self.history.append(entry)
        return program

    def check_trainable(self) -> None:
        if tuple(p.requires_grad for p in self.model.parameters()) != self.trainable:
            raise PartitionError("parameters were frozen or unfrozen (requires_grad changed) after dipc.compile; "
                                 "the stage graph decided from the old setting which values carry gradients. "
                                 "Fix: call dipc.compile again after changing requires_grad.")

    def program_for(self, microbatches: Sequence[Batch], program: Program | None) -> Program:
        """``program`` checked against these microbatches, or a fresh plan when none is given."""
        if program is None:
            return self.plan(microbatches)
        self.check_batch(microbatches)
        self.check_program(program, microbatches)
        return program

    def check_program(self, program: Program, microbatches: Sequence[Batch]) -> None:
        if program.num_microbatches != len(microbatches) or program.num_ranks != self.num_ranks:
            raise BatchError(f"the program was planned for {program.num_microbatches} microbatches on "
                             f"{program.num_ranks} ranks, but got {len(microbatches)} microbatches for a "
                             f"{self.num_ranks}-rank pipeline. Fix: plan these microbatches (pipe.plan(mbs)).")

    def result(self, weights: Sequence[float], microbatch_losses: Sequence[float], t0: float,
               program: Program) -> StepResult:
        """The step's full-batch loss; microbatches with weight 0 (no loss tokens) do not count."""
        loss = sum(w * l for w, l in zip(weights, microbatch_losses) if w != 0)
        return StepResult(loss=loss, microbatch_losses=list(microbatch_losses),
                          seconds=time.perf_counter() - t0, program=program)

    def loss_weights(self, microbatches: Sequence[Batch]) -> list[float]:
        w = [float(self.loss_weight(mb)) for mb in microbatches]
        total = sum(w)
        if total <= 0:
            raise BatchError("every microbatch has loss weight 0 (no label tokens?). Fix: check the labels.")
        return [x / total for x in w]

    # -- running -----------------------------------------------------------------------------
    def step(self, microbatches: Sequence[Batch], program: Program | None = None) -> StepResult:
        """One training step with all ranks in this process (the local executor)."""
        from dipc.runtime.local import run_local

        t0 = time.perf_counter()
        program = self.program_for(microbatches, program)
        weights = self.loss_weights(microbatches)
        stats = run_local(program, self.stages, microbatches, weights, self.treespecs,
                          optimizer_step=self._step_all_optimizers if self.optimizers else None)
        losses = {m: l for st in stats for m, l in st.losses.items()}
        return self.result(weights, [losses[m] for m in range(len(microbatches))], t0, program)

    def step_optimizer(self, rank: int) -> None:
        """Optimizer step and zero-grad for one rank's parameters (no-op without an optimizer)."""
        opt = self.optimizers.get(rank)
        if opt is not None:
            opt.step()
            opt.zero_grad(set_to_none=True)

    def _step_all_optimizers(self) -> None:
        for r in self.optimizers:
            self.step_optimizer(r)

    def dump(self, program: Program, path: str | Path) -> Path:
        """Write the program as text (``.txt``) and JSON (``.json``) next to each other."""
        from dipc.ir.jsonio import dumps
        from dipc.ir.text import dump_program

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.with_suffix(".txt").write_text(dump_program(program))
        path.with_suffix(".json").write_text(dumps(program))
        return path.with_suffix(".txt")


def with_fused_layers(model: nn.Module, layers: Sequence[str]) -> nn.Module:
    """A copy of the module tree (parameters and buffers shared, not copied) whose layers run the
    fused Triton kernels; the user's model object is left untouched."""
    from dipc.kernels.rewrite import fuse_module

    shared = {id(t): t for t in list(model.parameters()) + list(model.buffers())}
    fused = copy.deepcopy(model, memo=dict(shared))
    for path in layers:
        parent, _, name = path.rpartition(".")
        owner = fused.get_submodule(parent) if parent else fused
        setattr(owner, name, fuse_module(owner.get_submodule(name)))
    return fused


def compile(model: nn.Module, example_batch: Batch, *, num_stages: int = 2, chunks: int | None = None,
            schedule: str = "1f1b", layers: list[str] | None = None, leaf_modules: Iterable[str] = (),
            key_modalities: Mapping[str, str] | None = None, module_overrides: Mapping[str, str] | None = None,
            loss_weight: Callable[[Batch], float] | None = None,
            optimizer: OptimizerFactory | None = None, fused_kernels: bool | None = None,
            segments: Mapping[str, int] | str = "cost",
            length_stats: Callable[[Batch], Any] | None = None) -> CompiledPipeline:
    """Capture, tag and partition ``model`` for a pipeline of ``num_stages`` ranks.

    ``chunks``: stages per rank (virtual stages; default 2 for ``interleaved_1f1b``, else 1).
    ``schedule``: ``gpipe`` | ``1f1b`` | ``interleaved_1f1b`` | ``zb_h1`` | ``dual_queue`` (DIP phase 2).
    ``layers`` / ``leaf_modules``: override which modules are layers / opaque leaves.
    ``key_modalities``: batch key -> modality; ``module_overrides``: module path prefix -> modality module.
    ``loss_weight``: microbatch -> weight of its (mean) loss; default counts ``labels != -100``.
    ``optimizer``: params -> optimizer, created per rank over that rank's parameters.
    ``segments``: stages per modality module: ``"cost"`` (proportional to cost), ``"spread"`` (equal,
    so with ``chunks`` = number of modules every module spans all ranks), or ``{module: stages}``.
    ``length_stats``: microbatch -> ``{module path prefix: LengthStats}`` for SEMU, for batch layouts
    :func:`dipc.semu.step_model.batch_length_stats` does not know.
    ``fused_kernels``: run layers with dipc's Triton kernels (RMSNorm, LayerNorm, GELU, SwiGLU, RoPE).
    Default: on when the model lives on a GPU, off on CPU (where Triton only interprets). The
    user's parameters are shared, so gradients and optimizer updates land on ``model`` either way.
    """
    from dipc.passes.schedules import get_schedule

    get_schedule(schedule)  # unknown names fail here, before any tracing
    if chunks is None:
        chunks = 2 if schedule == "interleaved_1f1b" else 1
    for name, value in (("num_stages", num_stages), ("chunks", chunks)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise PartitionError(f"{name}={value!r}. Fix: pass a whole number >= 1.")
    if chunks > 1 and schedule in ("1f1b", "zb_h1"):
        raise ScheduleError(f"schedule {schedule!r} runs one stage per rank but chunks={chunks}. "
                            "Fix: use schedule='interleaved_1f1b' (or 'gpipe') for virtual stages, or chunks=1.")
    history: list[tuple[str, Any, float]] = []
    if fused_kernels is None:
        fused_kernels = any(p.is_cuda for p in model.parameters())
    if fused_kernels:
        t0 = time.perf_counter()
        layers = resolve_layers(model, layers, leaf_modules)
        model = with_fused_layers(model, layers)
        history.append(("fuse_kernels", model, (time.perf_counter() - t0) * 1e3))
    t0 = time.perf_counter()
    captured = capture(model, example_batch, layers=layers, leaf_modules=leaf_modules)
    history.append(("capture", captured.graph_module, (time.perf_counter() - t0) * 1e3))
    t0 = time.perf_counter()
    tags = tag_modalities(captured.graph_module, captured.layers, key_modalities=key_modalities,
                          module_overrides=module_overrides)
    history.append(("tag", captured.graph_module, (time.perf_counter() - t0) * 1e3))
    t0 = time.perf_counter()
    costs = layer_costs(captured)
    stage_layers, stage_mod = assign_layers(tags, costs, num_stages, chunks, segments)
    stages = build_stages(captured, stage_layers, stage_mod, num_stages)
    history.append(("partition", [s.module for s in stages], (time.perf_counter() - t0) * 1e3))
    return CompiledPipeline(model=model, captured=captured, tags=tags, stages=stages, num_ranks=num_stages,
                            chunks=chunks, schedule=schedule, loss_weight=loss_weight or default_loss_weight,
                            optimizer_factory=optimizer, history=history, length_stats=length_stats)
