"""``dipc.compile``: model + example batch -> a compiled pipeline that plans and runs batches."""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping, Sequence

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
from dipc.passes.submicrobatch import SubMicrobatcher, SubMicrobatches, build_sub_microbatcher
from dipc.passes.tag import LayerTag, tag_modalities
from dipc.runtime.timeline import MeasuredTimeline

if TYPE_CHECKING:
    from dipc.semu.memory_opt import MemoryPlan
    from dipc.semu.profiles import ClusterProfile

Batch = Mapping[str, Any]
OptimizerFactory = Callable[[list[nn.Parameter]], torch.optim.Optimizer]


def default_loss_weight(batch: Batch) -> float:
    """Number of label tokens that count (``labels != -100``); 1 for batches without labels.
    Weighting microbatch losses by this makes pipelined training equal full-batch training."""
    labels = batch.get("labels")
    if isinstance(labels, torch.Tensor):
        return float((labels != -100).sum())
    return 1.0


_PROGRAM_CACHE_SIZE = 16   # distinct batch shapes whose programs a pipeline keeps
# schedules planned per batch by a search scored with SEMU (not a generator in dipc.passes.schedules)
DIP = "dip"


@dataclass
class StepResult:
    loss: float                      # full-batch loss (weighted mean of microbatch losses)
    microbatch_losses: list[float]
    seconds: float
    program: Program
    timeline: MeasuredTimeline | None = None   # per-instruction wall clock, when the step recorded it


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
    sub_microbatcher: SubMicrobatcher | None = None   # modality sub-microbatches (DIP §4), if any
    # microbatch -> per-module-prefix LengthStats for SEMU (dipc.semu.step_model.pipeline_length_stats);
    # None: derived from the batch keys dipc knows
    length_stats: Callable[[Batch], Any] | None = None
    # plan()'s defaults: bytes per rank (one number or one per rank) for phase 3, and the SEMU
    # profile plans are scored on (None: dipc.semu.profile_machine.default_profile of the device)
    memory_limit: float | Sequence[float] | None = None
    profile: "str | ClusterProfile | None" = None
    # schedule "dip": seconds of phase 1's MCTS per batch (0: the candidate rules only), and the
    # plan's wall-clock budget under a memory limit (phase-3 fits stop past it; None: unbounded)
    search_s: float = 0.0
    plan_budget_s: float | None = 1.0

    def __post_init__(self) -> None:
        self.shapes = ShapeInference(self.stages)
        # per split modality: shapes of its segment's messages for one sub (only its keys needed)
        self.sub_shapes = {mod: ShapeInference([s for s in self.stages if s.modality == mod], edge_stages=self.stages)
                           for mod in (self.sub_microbatcher.config if self.sub_microbatcher else {})}
        # which parameters train decides which stage edges carry gradients and what optimizers hold
        self._parameters = list(self.model.parameters())
        self.trainable = tuple(p.requires_grad for p in self._parameters)
        # validated programs by what determines them (message specs, subs, schedule): a batch
        # whose shapes recur (fixed-shape training, bucketed lengths) skips codegen and validation
        self._programs: dict[tuple, Program] = {}
        self.treespecs = {name: tree_flatten(v)[1] for name, v in self.captured.example_values.items()}
        self.optimizers: dict[int, torch.optim.Optimizer] = {}
        self._whole_wgrad: frozenset[int] | None = None
        self._static: list[str] | None = None   # static_schedules(), worked out once
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

    def whole_wgrad_stages(self) -> frozenset[int]:
        """Stages whose zero-bubble BWD_W runs the whole backward (a parameter shared across depths;
        :mod:`dipc.runtime.split_probe`), probed once on the example batch; SEMU's
        :meth:`~dipc.semu.step_model.StepModel.runtime_options` costs them so."""
        if self._whole_wgrad is None:
            from dipc.runtime.split_probe import whole_wgrad_stages

            self._whole_wgrad = whole_wgrad_stages(self.captured, self.stages)
        return self._whole_wgrad

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
             compute_orders: Sequence[Sequence[Any]] | None = None, *,
             memory_limit: float | Sequence[float] | None = None,
             profile: "str | ClusterProfile | None" = None) -> Program:
        """The program for these microbatches (shapes of every message known, validated).

        ``compute_orders`` (one list of ``ComputeAction`` per rank, e.g. from
        :func:`dipc.passes.dual_queue.dual_queue_schedule` fed with SEMU's durations) replaces the
        named schedule's generator; ``schedule`` then only names the program.

        ``memory_limit`` (bytes per rank, one number or one per rank; default: the one given to
        :func:`compile`) applies DIP's phase 3 (:func:`dipc.semu.memory_opt.optimize_memory`): the
        cheapest per-(stage, microbatch) activation recomputation that keeps SEMU's peak (on
        ``profile``) within the limit, written to the program's ``recompute`` attribute, which
        :meth:`step` executes. ``profile``: a preset name, a profile JSON or a loaded profile;
        default: :func:`compile`'s, else the device this pipeline runs on
        (:func:`dipc.semu.profile_machine.default_profile`: on CPU this machine, measured). Raises
        ``InfeasibleMemoryError`` (how much over, per rank) when even full recomputation does not fit.

        Schedule ``"dip"``: DIP's per-batch search (:func:`dipc.semu.compare.plan_dip`): the
        dual-queue orders, the encoder look-ahead orders and every static schedule this layout
        runs, each scored by SEMU on ``profile`` for these microbatches (fitted to
        ``memory_limit`` where it needs recomputation), the fastest kept. On CPU with no profile
        named (here, in :func:`compile` or ``$DIPC_PROFILE``) the first plan calibrates SEMU on its
        batch (:meth:`calibrate`, a few seconds once). Deterministic for a
        given profile (under a memory limit only with ``plan_budget_s=None`` in :func:`compile`:
        the budget stops the search by the clock); a profile measured per process (the CPU default) can differ between
        processes, so under torch.distributed plan on one rank and broadcast the program
        (:func:`dipc.runtime.async_plan.broadcast_program`, what ``dipc run`` does), or name a profile.
        """
        self.check_batch(microbatches)
        self.check_trainable()
        t0 = time.perf_counter()
        name = schedule or self.schedule
        if memory_limit is None:
            memory_limit = self.memory_limit
        if name == DIP and compute_orders is None:
            # its plan depends on what it is scored and fitted on too
            key = (DIP, self._shape_key(microbatches), _hashable(memory_limit),
                   profile if profile is None or isinstance(profile, str) else id(profile))
            program = self._programs.get(key)
            if program is None:
                program = self._plan_dip(microbatches, memory_limit, profile)
                self._remember(key, program)
        else:
            program = self.lowered(microbatches, name if compute_orders is None else schedule or "custom", compute_orders)
            if memory_limit is not None:
                program = self.fit_memory(program, microbatches, memory_limit, profile).program
        maybe_dump(self, program, microbatches)
        entry = ("plan", program, (time.perf_counter() - t0) * 1e3)
        if self.history and self.history[-1][0] == "plan":   # keep the latest plan, not one per step
            self.history[-1] = entry
        else:
            self.history.append(entry)
        return program

    def lowered(self, microbatches: Sequence[Batch], schedule: str,
                compute_orders: Sequence[Sequence[Any]] | None = None, *, validated: bool = True) -> Program:
        """The program of a static ``schedule`` (cached per batch shapes) or of ``compute_orders``
        (named ``schedule``) for these microbatches, as it is: no memory fit, no dump. A search
        that scores many candidates passes ``validated=False`` and validates the one it keeps
        (the emulator raises ``ScheduleError`` on a wait cycle, so a bad candidate cannot win)."""
        from dipc.ir.validate import validate
        from dipc.passes.codegen import build_program, lower

        shape_key, subs, specs = self._specs(microbatches)
        key = (schedule, shape_key) if compute_orders is None else None
        program = self._programs.get(key) if key is not None else None
        if program is not None:
            return program
        if compute_orders is None:
            program = build_program(list(self.stage_infos), self.num_ranks, len(microbatches), schedule,
                                    specs=specs, subs=subs)
        else:
            program = lower(list(self.stage_infos), self.num_ranks, len(microbatches), compute_orders,
                            schedule=schedule, specs=specs, subs=subs)
        if validated or key is not None:
            validate(program)
        self._remember(key, program)
        return program

    def _specs(self, microbatches: Sequence[Batch]) -> tuple[tuple, Any, Callable[..., Any]]:
        """(what the messages' shapes depend on, ``Program.subs``, the specs function codegen asks)."""
        edge_specs = [self.shapes.edge_specs(mb) for mb in microbatches]
        subs = self.sub_counts(microbatches)
        sub_specs = {(mod, m, j): self.sub_shapes[mod].edge_specs(part)
                     for (mod, m, j), part in self.sub_batches(microbatches).items()}

        def specs(kind: str, mb: int, producer: int, consumer: int, sub: int):
            if sub >= 0:
                act, grad = sub_specs[(self.stages[producer].modality, mb, sub)][(producer, consumer)]
            else:
                act, grad = edge_specs[mb][(producer, consumer)]
            return act if kind == "act" else grad

        shape_key = (subs, tuple(tuple(sorted(e.items())) for e in edge_specs),
                     tuple(sorted((k, tuple(sorted(v.items()))) for k, v in sub_specs.items())))
        return shape_key, subs, specs

    def _shape_key(self, microbatches: Sequence[Batch]) -> tuple:
        return self._specs(microbatches)[0]

    def _remember(self, key: tuple | None, program: Program) -> None:
        if key is not None:
            if len(self._programs) >= _PROGRAM_CACHE_SIZE:
                self._programs.pop(next(iter(self._programs)))   # oldest first
            self._programs[key] = program

    def _plan_dip(self, microbatches: Sequence[Batch], memory_limit: float | Sequence[float] | None,
                  profile: "str | ClusterProfile | None") -> Program:
        """DIP's per-batch plan (see :meth:`plan`), against every static schedule this layout runs.
        On CPU with no profile named anywhere, the pipeline first calibrates SEMU on this batch
        (:meth:`calibrate`): a measured CPU profile without dipc's per-instruction costs scores
        plans of many small instructions as free (see :mod:`dipc.semu.self_calibrate`)."""
        from dipc.semu.compare import plan_dip, step_model

        if profile is None and self.needs_calibration():
            self.calibrate([microbatches])
        model = step_model(self, microbatches, self._profile(profile), runtime=True)
        _, program, _ = plan_dip(self, microbatches, model, baselines=self.static_schedules(),
                                 memory_limit=memory_limit, search_s=self.search_s,
                                 time_budget=self.plan_budget_s)
        return program

    def needs_calibration(self) -> bool:
        """Whether a DIP plan calibrates SEMU first: on CPU, when no profile is named (in
        :func:`compile` or ``$DIPC_PROFILE``). Call :meth:`calibrate` before forking
        planner workers (:class:`~dipc.runtime.async_plan.AsyncPlanner`) so they inherit the
        profile instead of each calibrating while the trainer competes for the cores."""
        import os

        on_cpu = not self._parameters or self._parameters[0].device.type == "cpu"
        return self.profile is None and on_cpu and not os.environ.get("DIPC_PROFILE")

    def calibrate(self, batches: Sequence[Sequence[Batch]], runs: int = 2) -> "ClusterProfile":
        """Fit SEMU's profile to this pipeline's own local steps on ``batches`` (lists of
        microbatches) on this device (:func:`dipc.semu.self_calibrate.calibrate_pipeline`; no
        optimizer step, gradients and RNG restored) and plan with it from now on. Returns it."""
        from dipc.semu.self_calibrate import calibrate_pipeline

        self.profile = calibrate_pipeline(self, batches, base=self.profile, runs=runs).profile
        self._forget_dip_plans()
        return self.profile

    def _forget_dip_plans(self) -> None:
        """Drop cached DIP plans (scored on a profile that just changed); static programs stay."""
        self._programs = {k: v for k, v in self._programs.items() if k[0] != DIP}

    def calibrate_distributed(self, batches: Sequence[Sequence[Batch]], runs: int = 2,
                              src: int = 0) -> "ClusterProfile | None":
        """Under torch.distributed, on every rank of the pipeline: fit pipeline rank ``src``'s
        profile (locally calibrated first, :meth:`calibrate`) to steps of the multi-process
        executor on ``batches`` (:func:`dipc.semu.self_calibrate.calibrate_distributed`), and plan
        with it there from now on. Returns it on ``src``, None elsewhere."""
        from dipc.semu.self_calibrate import calibrate_distributed

        fit = calibrate_distributed(self, batches, runs=runs, src=src)
        if fit is None:
            return None
        self.profile = fit.profile
        self._forget_dip_plans()
        return self.profile

    def _profile(self, profile: "str | ClusterProfile | None") -> "str | ClusterProfile":
        from dipc.semu.profile_machine import default_profile

        profile = profile if profile is not None else self.profile
        if profile is None:
            profile = default_profile(self._parameters[0].device.type if self._parameters else "cpu")
        return profile

    def static_schedules(self) -> list[str]:
        """The static schedules (:data:`dipc.passes.schedules.SCHEDULES`, the cost-blind dual queue
        left out) whose generator accepts this pipeline's layout."""
        from dipc.passes.schedules import SCHEDULES

        if self._static is None:
            stages = list(self.stage_infos)
            self._static = []
            for name, generate in SCHEDULES.items():
                if name == "dual_queue":
                    continue
                try:
                    generate(stages, self.num_ranks, self.num_ranks)
                except ScheduleError:
                    continue
                self._static.append(name)
        return self._static

    def fallback_schedule(self) -> str:
        """The static schedule to run when a plan is late or failed: the pipeline's own, or for
        ``dip`` the first of 1F1B, interleaved 1F1B, ZB-H1, GPipe that this layout runs."""
        if self.schedule != DIP:
            return self.schedule
        runs = self.static_schedules()
        return next((name for name in ("1f1b", "interleaved_1f1b", "zb_h1") if name in runs), "gpipe")

    def sub_counts(self, microbatches: Sequence[Batch]) -> tuple[tuple[str, tuple[int, ...]], ...]:
        """``Program.subs`` for these microbatches (empty without sub-microbatches)."""
        return self.sub_microbatcher.counts(microbatches) if self.sub_microbatcher else ()

    def sub_batches(self, microbatches: Sequence[Batch]) -> dict[tuple[str, int, int], dict[str, Any]]:
        """``(modality, mb, sub) -> that sub's batch keys``, what a LOAD with a sub reads."""
        return self.sub_microbatcher.sub_batches(microbatches) if self.sub_microbatcher else {}
    def fit_memory(self, program: Program, microbatches: Sequence[Batch], memory_limit: float | Sequence[float],
                   profile: "str | ClusterProfile | None" = None) -> "MemoryPlan":
        """DIP phase 3 on ``program``: the recomputation plan, its simulated peaks and added time
        (``profile`` as in :meth:`plan`)."""
        from dipc.semu.compare import step_model
        from dipc.semu.memory_opt import optimize_memory

        return optimize_memory(program, step_model(self, microbatches, self._profile(profile)), memory_limit)

    def check_trainable(self) -> None:
        if tuple(p.requires_grad for p in self._parameters) != self.trainable:
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
        if not program.order_is_valid:   # num_microbatches == len(microbatches), checked above
            raise BatchError(f"the program's microbatch order {list(program.microbatch_order)} is not a "
                             f"permutation of the {len(microbatches)} microbatches given. Fix: plan these "
                             "microbatches (pipe.plan(mbs)).")
        if program.subs != self.sub_counts(program.ordered(microbatches)):
            raise BatchError(f"the program splits modalities into sub-microbatches {program.subs}, but these "
                             f"microbatches split into {self.sub_counts(program.ordered(microbatches))}. "
                             f"Fix: plan these microbatches (pipe.plan(mbs)).")

    def result(self, weights: Sequence[float], microbatch_losses: Sequence[float], t0: float,
               program: Program) -> StepResult:
        """The step's full-batch loss; microbatches with weight 0 (no loss tokens) do not count.
        ``weights`` and ``microbatch_losses`` per program slot; ``microbatch_losses`` of the result
        in the caller's order (``Program.microbatch_order``)."""
        loss = sum(w * l for w, l in zip(weights, microbatch_losses) if w != 0)
        return StepResult(loss=loss, microbatch_losses=program.unordered(microbatch_losses),
                          seconds=time.perf_counter() - t0, program=program)

    def loss_weights(self, microbatches: Sequence[Batch]) -> list[float]:
        w = [float(self.loss_weight(mb)) for mb in microbatches]
        total = sum(w)
        if total <= 0:
            raise BatchError("every microbatch has loss weight 0 (no label tokens?). Fix: check the labels.")
        return [x / total for x in w]

    # -- running -----------------------------------------------------------------------------
    def step(self, microbatches: Sequence[Batch], program: Program | None = None, *,
             record_timeline: bool = False) -> StepResult:
        """One training step with all ranks in this process (the local executor).

        ``record_timeline``: time every instruction; ``result.timeline`` is then a
        :class:`~dipc.runtime.timeline.MeasuredTimeline` (and, under ``DIPC_DUMP_DIR``, the step's
        dump directory gains ``measured.json`` / ``measured.png``)."""
        from dipc.dump import maybe_dump_measured
        from dipc.runtime.local import local_timeline, run_local

        t0 = time.perf_counter()
        program = self.program_for(microbatches, program)
        microbatches = program.ordered(microbatches)   # slot m runs the caller's microbatch_order[m]
        weights = self.loss_weights(microbatches)
        origin = time.perf_counter()
        stats = run_local(program, self.stages, microbatches, weights, self.treespecs,
                          optimizer_step=self._step_all_optimizers if self.optimizers else None,
                          sub_batches=self.sub_batches(microbatches), record_timeline=record_timeline)
        losses = {m: l for st in stats for m, l in st.losses.items()}
        result = self.result(weights, [losses[m] for m in range(len(microbatches))], t0, program)
        if record_timeline:
            result.timeline = local_timeline(program, stats, origin)
            maybe_dump_measured(self, program, microbatches, result.timeline)
        return result

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


def _hashable(value: Any) -> Any:
    return tuple(value) if isinstance(value, Sequence) and not isinstance(value, str) else value


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
            sub_microbatches: Mapping[str, int | SubMicrobatches] | None = None,
            length_stats: Callable[[Batch], Any] | None = None, remat_glue: bool = True,
            memory_limit: float | Sequence[float] | None = None,
            profile: "str | ClusterProfile | None" = None, search_s: float = 0.0,
            plan_budget_s: float | None = 1.0) -> CompiledPipeline:
    """Capture, tag and partition ``model`` for a pipeline of ``num_stages`` ranks.

    ``chunks``: stages per rank (virtual stages; default 2 for ``interleaved_1f1b``, else 1).
    ``schedule``: ``gpipe`` | ``1f1b`` | ``interleaved_1f1b`` | ``zb_h1`` | ``dual_queue`` (DIP phase 2,
    cost-blind) | ``dip`` (DIP's per-batch search scored by SEMU: see :meth:`CompiledPipeline.plan`).
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
    ``sub_microbatches``: modality -> items per sub-microbatch (B_i) or
    :class:`~dipc.passes.submicrobatch.SubMicrobatches` (with a splitter): that modality's stages
    run once per sub-microbatch (DIP §4), e.g. ``{"vision": 2}`` = two images per vision sub.
    The split is checked on ``example_batch`` to be exact (joined sub outputs == whole run).
    ``remat_glue``: recompute cheap, gradient-free glue values (RoPE tables from positions...) on
    the stages that read them rather than sending them across ranks (:mod:`dipc.passes.remat`).
    ``memory_limit`` / ``profile``: the defaults of :meth:`CompiledPipeline.plan` (bytes per rank
    that phase 3 fits every plan to; the SEMU profile plans are scored and fitted on).
    ``search_s``: with ``schedule="dip"``, seconds per batch of phase 1's MCTS over segment
    priorities (:func:`dipc.semu.compare.searched_order`), one more candidate; 0: none.
    ``plan_budget_s``: with ``schedule="dip"`` and a memory limit, wall seconds per plan: past
    them no further candidate is fitted (the best fitted so far wins) and the winner's
    per-microbatch refit stops (:func:`dipc.semu.compare.plan_dip`'s ``time_budget``); None:
    unbounded, the same plan on any machine. Plans are made ahead on CPU while the previous step
    trains, so keep it below a step's time.
    """
    from dipc.passes.schedules import SCHEDULES

    if schedule != DIP and schedule not in SCHEDULES:   # unknown names fail here, before any tracing
        raise ScheduleError(f"unknown schedule {schedule!r}. Fix: use one of {', '.join(sorted([*SCHEDULES, DIP]))}.")
    if chunks is None:
        chunks = 2 if schedule in ("interleaved_1f1b", DIP) else 1
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
    stages = build_stages(captured, stage_layers, stage_mod, num_stages, remat=remat_glue)
    history.append(("partition", [s.module for s in stages], (time.perf_counter() - t0) * 1e3))
    sub_microbatcher = None
    if sub_microbatches:
        t0 = time.perf_counter()
        sub_microbatcher = build_sub_microbatcher(stages, sub_microbatches, example_batch)
        history.append(("sub_microbatches", sub_microbatcher, (time.perf_counter() - t0) * 1e3))
    return CompiledPipeline(sub_microbatcher=sub_microbatcher, model=model, captured=captured, tags=tags,
                            stages=stages, num_ranks=num_stages,
                            chunks=chunks, schedule=schedule, loss_weight=loss_weight or default_loss_weight,
                            optimizer_factory=optimizer, history=history, length_stats=length_stats,
                            memory_limit=memory_limit, profile=profile, search_s=search_s,
                            plan_budget_s=plan_budget_s)
