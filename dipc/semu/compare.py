"""DIP's per-batch planner for a compiled pipeline (:func:`plan_dip`, what ``schedule="dip"``
runs: candidate orders from the dual queue, the encoder look-ahead orders, phase 1's search and
the static schedules, scored by SEMU, phase 3 under a memory limit), and the side-by-side SEMU
scores of a batch's schedules that users (and ``dipc trace``) compare."""
from __future__ import annotations

import dataclasses
import math
import time
from typing import TYPE_CHECKING, Any, Mapping, Sequence

from dipc.errors import InfeasibleMemoryError, ScheduleError
from dipc.ir.validate import validate
from dipc.ir import Op, Program
from dipc.passes.dual_queue import TaskCosts, dual_queue_schedule
from dipc.semu.emulator import SimResult

if TYPE_CHECKING:
    from dipc.api import CompiledPipeline

DIP_LABEL = "DIP"


def step_model(pipe: "CompiledPipeline", microbatches: Sequence[Mapping[str, Any]], profile: Any = "h800",
               runtime: bool = False):
    """SEMU's model of this pipeline on ``profile`` (a preset name, a profile JSON path or a
    loaded ``ClusterProfile``) for these microbatches (cost model cached on pipe). ``runtime``:
    model dipc's interpreter rather than an ideal runtime
    (:meth:`~dipc.semu.step_model.StepModel.runtime_options`: which BWD_Ws walk the whole
    backward), as plans that dipc itself runs are scored."""
    from dipc.semu.costs import layer_cost_model
    from dipc.semu.profiles import load_profile
    from dipc.semu.step_model import StepModel, pipeline_length_stats, sub_length_stats

    if getattr(pipe, "_cost_model", None) is None:
        pipe._cost_model = layer_cost_model(pipe.captured)
    stats = [pipeline_length_stats(pipe, mb) for mb in microbatches]
    sub_stats = sub_length_stats(pipe, microbatches) if pipe.sub_microbatcher is not None else None
    # the stages whose split BWD_W walks whole on dipc's runtime, as on any device
    cluster = profile if hasattr(profile, "device") else load_profile(profile)
    options = StepModel.runtime_options(pipe) if runtime else {"whole_wgrad_stages": sorted(pipe.whole_wgrad_stages())}
    return StepModel.for_pipeline(pipe, pipe._cost_model, cluster, stats, sub_stats=sub_stats, **options)


def _activation_budgets(pipe: "CompiledPipeline", model, memory_limit: float | Sequence[float]) -> list[float]:
    """Per rank: the memory limit less the rank's parameters, gradients and optimizer states."""
    limits = [float(memory_limit)] * pipe.num_ranks if isinstance(memory_limit, (int, float)) else list(memory_limit)
    return [limits[r] - sum(model.static_bytes(s.id) for s in pipe.stages if s.rank == r)
            for r in range(pipe.num_ranks)]


def _frugal_stash(model, stage: int, mb: int, sub: int = -1) -> float:
    """The least a FWD can stash: every layer that saves memory recomputed (phase 2's assumption)."""
    fps = [model.layer_footprint(stage, mb, p, sub) for p in model.stage_layers[stage]]
    return sum(min(f.act_bytes, f.in_bytes) for f in fps)


def _microbatch_work(pipe: "CompiledPipeline", model, num_microbatches: int) -> list[float]:
    """SEMU's forward + backward seconds of each microbatch over all stages."""
    t = model.stage_time
    return [sum(t(s.id, m).fwd + t(s.id, m).bwd for s in pipe.stages) for m in range(num_microbatches)]


def _phase2_costs(pipe: "CompiledPipeline", model, memory_limit: float | Sequence[float] | None
                  ) -> tuple[TaskCosts, TaskCosts, list[float] | None]:
    """The dual queue's task costs from SEMU (whole backward; split into input and weight
    gradients) and the per-rank activation budgets (None without a limit): with a limit each
    forward stashes its least (every saving layer recomputed, phase 2's assumption)."""
    t = model.stage_time
    budgets = None if memory_limit is None else _activation_budgets(pipe, model, memory_limit)
    act = (lambda s, m, j=-1: 1.0) if budgets is None else (lambda s, m, j=-1: _frugal_stash(model, s, m, j))
    plain = TaskCosts(fwd=lambda s, m, j=-1: t(s, m, j).fwd, bwd=lambda s, m, j=-1: t(s, m, j).bwd, act=act)
    split = TaskCosts(fwd=plain.fwd, bwd=lambda s, m, j=-1: t(s, m, j).bwd_in,
                      wgrad=lambda s, m, j=-1: t(s, m, j).bwd_w, act=act)
    return plain, split, budgets


def dip_candidates(pipe: "CompiledPipeline", model, num_microbatches: int,
                   memory_limit: float | Sequence[float] | None = None,
                   subs: Sequence[tuple[str, Sequence[int]]] = ()) -> dict[str, list]:
    """Phase 2 of DIP's search fed with SEMU's per-(stage, microbatch[, sub]) times, under a few
    microbatch priority rules (in order; heaviest first; lightest first), each with and without the
    zero-bubble backward split (phase 1's search, :func:`searched_order`, adds its own ranking).

    With a ``memory_limit``, forwards are held back where even the most memory-efficient
    recomputation (the paper's phase-2 assumption) would not fit the rank's activation budget;
    a candidate the greedy cannot fit is left out (phase 3 then decides what to recompute).
    ``subs`` (``Program.subs``): encoder sub-microbatches are scheduled as their own tasks."""
    work = _microbatch_work(pipe, model, num_microbatches)
    heavy = {m: i for i, m in enumerate(sorted(range(num_microbatches), key=lambda m: -work[m]))}
    light = {m: i for i, m in enumerate(sorted(range(num_microbatches), key=lambda m: work[m]))}
    priorities = {"in order": None,
                  "heaviest first": lambda op, s, m: (heavy[m], s if op is Op.FWD else -s),
                  "lightest first": lambda op, s, m: (light[m], s if op is Op.FWD else -s)}
    plain, split, budgets = _phase2_costs(pipe, model, memory_limit)
    stages = list(pipe.stage_infos)
    out = {}
    for label, prio in priorities.items():
        for suffix, costs, is_split in (("", plain, False), (", split backward", split, True)):
            try:
                out[label + suffix] = dual_queue_schedule(stages, pipe.num_ranks, num_microbatches, costs,
                                                          priority=prio, memory_limit=budgets,
                                                          split_backward=is_split, subs=subs)
            except InfeasibleMemoryError:
                if budgets is None:
                    raise
    return out


def encoder_ahead_candidates(pipe: "CompiledPipeline", num_microbatches: int,
                             subs: Sequence[tuple[str, Sequence[int]]] = ()) -> dict[str, list]:
    """The encoder look-ahead orders (:mod:`dipc.passes.encoder_ahead`) this layout admits: the
    coarse encoder-first order and each :data:`~dipc.passes.encoder_ahead.ENCODER_AHEAD`
    look-ahead, around every static schedule the backbone can run. None where the layout has no
    encoder ahead of its backbone; an order whose ranks would wait on each other is left out."""
    from dipc.passes.encoder_ahead import ENCODER_AHEAD, backbone_schedules, encoder_ahead_orders

    stages = list(pipe.stage_infos)
    try:
        backbones = backbone_schedules(stages, pipe.num_ranks)
    except ScheduleError:
        return {}
    out = {}
    for backbone in backbones:
        for ahead, lag in ((None, 1), *ENCODER_AHEAD):
            label = "encoder-first" if ahead is None else f"encoder ahead {ahead} lag {lag}"
            try:
                out[f"{label}, {backbone} backbone"] = encoder_ahead_orders(
                    stages, pipe.num_ranks, num_microbatches, subs, ahead=ahead, lag=lag, backbone=backbone)
            except ScheduleError:
                continue
    return out


def searched_order(pipe: "CompiledPipeline", microbatches: Sequence[Mapping[str, Any]], model,
                   memory_limit: float | Sequence[float] | None = None, *, budget_s: float = 0.5,
                   max_evaluations: int | None = None, seed: int = 0):
    """DIP phase 1 (:func:`dipc.passes.segment_order.mcts_order`): MCTS over the priorities of the
    batch's segments — one item per (modality, microbatch), its sub-microbatches and stages tied —
    each ranking interleaved by the dual queue (zero-bubble split backward) and scored by SEMU's
    simulated step. Seeded with the in-order, heaviest-first, lightest-first and encoder-first
    rankings, so it returns nothing worse than those. With a ``memory_limit`` a ranking that
    overflows as it is scores its step with every layer recomputed (phase 2's assumption; phase
    3 later fits the winner exactly), inf if even that overflows. Stops after ``budget_s``
    seconds or ``max_evaluations`` rankings (deterministic for a given ``seed`` only then).
    Returns (compute orders, :class:`~dipc.passes.segment_order.SearchResult`)."""
    from dipc.errors import DipcError
    from dipc.ir.recompute import with_recompute
    from dipc.passes.segment_order import mcts_order, priority_from_order
    from dipc.semu.memory_opt import _limits

    M = len(microbatches)
    stages = list(pipe.stage_infos)
    subs = pipe.sub_counts(microbatches)
    _, split, budgets = _phase2_costs(pipe, model, memory_limit)
    limits = None if memory_limit is None else _limits(memory_limit, pipe.num_ranks)
    every_layer = {s.id: list(s.layers) for s in pipe.stages}
    mods = list(dict.fromkeys(s.modality for s in stages))
    item_of = lambda stage, mb: (stages[stage].modality, mb)   # noqa: E731

    def orders_for(ranking):
        return dual_queue_schedule(stages, pipe.num_ranks, M, split, priority=priority_from_order(ranking, item_of),
                                   memory_limit=budgets, split_backward=True, subs=subs)

    def fits(result) -> bool:
        return limits is None or all(p <= c for p, c in zip(result.peak_memory, limits))

    def score(ranking) -> float:
        try:
            program = pipe.lowered(microbatches, "dip", orders_for(ranking), validated=False)
        except DipcError:
            return math.inf
        result = model.simulate(program, record=False)
        if fits(result):
            return result.step_time
        result = model.simulate(with_recompute(program, every_layer), record=False)
        return result.step_time if fits(result) else math.inf

    work = _microbatch_work(pipe, model, M)
    heavy = sorted(range(M), key=lambda m: -work[m])
    seeds = [[(mod, m) for m in range(M) for mod in mods], [(mod, m) for m in heavy for mod in mods],
             [(mod, m) for m in reversed(heavy) for mod in mods], [(mod, m) for mod in mods for m in range(M)]]
    found = mcts_order(seeds[0], score, budget_s=budget_s, max_evaluations=max_evaluations, seeds=seeds,
                       seed=seed, rollouts=4)
    if not math.isfinite(found.score):
        raise InfeasibleMemoryError(f"no segment ranking the search scored fits a memory limit of {memory_limit} "
                                    "bytes per rank, even with every layer recomputed.")
    return orders_for(found.order), found


def plan_dip(pipe: "CompiledPipeline", microbatches: Sequence[Mapping[str, Any]], model,
             baselines: Sequence[str] = (),
             memory_limit: float | Sequence[float] | None = None,
             time_budget: float | None = None, *, search_s: float = 0.0,
             search_evaluations: int | None = None, reorder: bool = True) -> tuple[str, Program, SimResult]:
    """DIP's plan for this batch: every candidate order (and the static ``baselines``) scored by
    SEMU, the fastest kept (validated), so DIP never loses to the baselines it saw. Each candidate
    is first bounded from its compute orders alone (free messages, no lowering) and lowered and
    simulated only while that bound can still beat the best found
    (:func:`dipc.semu.candidate_select.pick_fastest`, as the paper-scale benchmark's planner does).

    Candidates: the dual queue under the microbatch priority rules (:func:`dip_candidates`), the
    encoder look-ahead orders (:func:`encoder_ahead_candidates`), the ``baselines`` and, with
    ``search_s > 0`` or ``search_evaluations``, phase 1's MCTS ranking (:func:`searched_order`,
    labelled ``mcts``).

    With ``memory_limit`` (bytes per rank), candidates that overflow go through phase 3
    (:func:`dipc.semu.memory_opt.optimize_memory`), so their score includes the recomputation they
    need to fit — but only as many as can still win: each is first simulated as it is, a lower
    bound of its fitted time (:func:`dipc.semu.candidate_select.pick_fastest`). Candidates that
    cannot fit are dropped, and if none fits the error of the one that came closest is raised.
    ``time_budget`` (wall seconds for the whole plan): past it no further candidate is fitted
    (the best fitted so far wins; the first fit always completes), and what the search leaves of
    it bounds the winner's per-microbatch refit (:func:`dipc.semu.memory_opt.refine_per_microbatch`).
    A plan with a budget can depend on the machine's speed; ``None`` keeps it reproducible.

    ``reorder``: where the batch's microbatches are not already lightest first (SEMU's forward +
    backward work), the batch is planned a second time in that order with the candidates that run
    microbatches in slot order (static schedules, encoder look-ahead orders; the dual queue's rules
    and the MCTS rank microbatches themselves), by branch and bound against the first plan (a
    candidate whose compute-order bound cannot beat it by :data:`REORDER_MARGIN` is never lowered),
    and that plan wins when its step is at least that much shorter; it then carries the order
    (``Program.microbatch_order``, applied by every executor) and its label says "lightest first".
    Why: those candidates run microbatches in slot order, and a heavy microbatch among light ones
    stalls the backbone's steady state and lengthens the fill (the paper-scale benchmark's T2V
    batches: steps 2-12% shorter lightest first; it is phase 1's lightest-first seed ranking). The
    margin keeps the caller's order unless reordering clearly pays. With ``time_budget``, the first
    plan gets half of it and the second what is left."""
    from dipc.semu.candidate_select import gc_paused

    with gc_paused():       # a plan allocates many short-lived objects: see gc_paused
        t_start = time.perf_counter()
        order = lightest_first(pipe, model, len(microbatches)) if reorder else None
        half = time_budget if time_budget is None or order is None else time_budget / 2
        drawn = _plan_dip(pipe, microbatches, model, baselines, memory_limit, half, search_s, search_evaluations)
        assert drawn is not None   # no incumbent: a plan or an error
        left = None if time_budget is None else time_budget - (time.perf_counter() - t_start)
        if order is None or (left is not None and left <= 0):
            return drawn
        beat = (1 - REORDER_MARGIN) * drawn[2].step_time
        try:
            light = _plan_dip(pipe, [microbatches[i] for i in order], model.reordered(order), baselines,
                              memory_limit, left, 0.0, None, incumbent=beat, ranked=False)
        except (InfeasibleMemoryError, ScheduleError):
            return drawn      # the order as given planned; this one does not
        if light is None or light[2].step_time > beat:
            return drawn
        label, program, result = light
        return f"{label}, lightest first", dataclasses.replace(program, microbatch_order=tuple(order)), result


# a plan of the batch lightest microbatch first replaces the plan in the caller's order only when
# its simulated step is at least this much shorter (see plan_dip)
REORDER_MARGIN = 0.02


def lightest_first(pipe: "CompiledPipeline", model, num_microbatches: int) -> list[int] | None:
    """The batch's microbatches lightest first (SEMU's forward + backward seconds over every
    stage; a stable sort), or None when they already are."""
    work = _microbatch_work(pipe, model, num_microbatches)
    order = sorted(range(num_microbatches), key=work.__getitem__)
    return None if order == list(range(num_microbatches)) else order


def _plan_dip(pipe: "CompiledPipeline", microbatches: Sequence[Mapping[str, Any]], model, baselines: Sequence[str],
              memory_limit: float | Sequence[float] | None, time_budget: float | None, search_s: float,
              search_evaluations: int | None, incumbent: float | None = None,
              ranked: bool = True) -> tuple[str, Program, SimResult] | None:
    """:func:`plan_dip` in the batch's order; with ``incumbent`` (a step time to beat), None when
    no candidate can beat it. ``ranked=False`` leaves out the candidates that rank microbatches
    themselves (the dual queue's priority rules, phase 1's MCTS): only the static schedules and
    encoder look-ahead orders run microbatches in slot order."""
    t_start = time.perf_counter()
    from dipc.semu.candidate_select import pick_fastest
    from dipc.semu.memory_opt import Phase3Tables, _limits, optimize_memory, refine_per_microbatch

    subs = pipe.sub_counts(microbatches)
    candidates: dict[str, Any] = {}
    if ranked:
        candidates.update({f"dual-queue ({k})": v
                           for k, v in dip_candidates(pipe, model, len(microbatches), memory_limit, subs).items()})
    candidates.update(encoder_ahead_candidates(pipe, len(microbatches), subs))
    if ranked and (search_s > 0 or search_evaluations is not None):
        try:
            candidates["mcts"] = searched_order(pipe, microbatches, model, memory_limit, budget_s=search_s or math.inf,
                                                max_evaluations=search_evaluations)[0]
        except InfeasibleMemoryError:
            pass   # the other candidates (or phase 3's error) speak for the memory limit
    for name in baselines:
        candidates[name] = None
    if not candidates and not ranked:
        return None        # nothing here runs microbatches in slot order
    if not candidates:
        raise InfeasibleMemoryError(
            f"no phase-2 order fits a memory limit of {memory_limit} bytes per rank, even with every layer "
            "recomputed, and no baseline schedule was given. Fix: pass baselines=('1f1b',) to get the "
            "per-rank excess, use more pipeline ranks or smaller microbatches, or raise memory_limit.")
    stages = list(pipe.stage_infos)
    bounded = [_bounded_candidate(pipe, stages, microbatches, model, label, orders, subs)
               for label, orders in candidates.items()]

    if memory_limit is None:
        def unfit(program: Program, costs):
            raise AssertionError("unreachable: without a memory limit every candidate fits")
        try:
            choice = pick_fastest(bounded, lambda program, costs: costs.simulate(program), math.inf, unfit,
                                  pipe.num_ranks, incumbent=incumbent)
        except InfeasibleMemoryError as e:   # here: nothing lowered and simulated
            raise ScheduleError(f"none of DIP's {len(candidates)} candidates lowered to a program the emulator "
                                f"could run ({e}). Fix: report this batch; meanwhile plan it with a static "
                                "schedule.") from None
        if choice is None:
            return None
        validate(choice.program)
        return choice.label, choice.program, choice.result
    tables = Phase3Tables(model, len(microbatches))

    def fit(program: Program, costs):
        fitted = optimize_memory(program, costs, memory_limit, tables=tables, per_microbatch=False)
        return fitted.program, fitted.result

    choice = pick_fastest(bounded, lambda program, costs: costs.simulate(program),
                          _limits(memory_limit, pipe.num_ranks), fit, pipe.num_ranks,
                          deadline=None if time_budget is None else t_start + time_budget, incumbent=incumbent)
    if choice is None:
        return None
    program, result = refine_per_microbatch(choice.program, choice.result, model, memory_limit, tables=tables,
                                            time_budget=None if time_budget is None else
                                            time_budget - (time.perf_counter() - t_start))
    validate(program)
    return choice.label, program, result


def _bounded_candidate(pipe: "CompiledPipeline", stages: Sequence[Any], microbatches: Sequence[Mapping[str, Any]],
                       model, label: str, orders: Any, subs: Sequence[tuple[str, Sequence[int]]]) -> tuple:
    """(label, build, bound) of one candidate for :func:`~dipc.semu.candidate_select.pick_fastest`:
    ``orders`` None is the static schedule ``label`` (its cached program), else compute orders
    lowered unvalidated (the winner alone is validated; the emulator raises on a wait cycle, so
    a bad candidate cannot win). The bound is the orders' makespan with free messages
    (:func:`dipc.semu.order_bound.order_lower_bound`), a lower bound of the simulated step:
    candidates it shows cannot win are never lowered or simulated (the example models' plans on
    h800: 12 candidates, 1-3 simulated)."""
    from dipc.passes.codegen import schedule_orders
    from dipc.semu.order_bound import order_lower_bound

    def build():
        program = (pipe.lowered(microbatches, label) if orders is None else
                   pipe.lowered(microbatches, "dip", orders, validated=False))
        return program, model

    def bound() -> float:
        made = orders if orders is not None else schedule_orders(stages, pipe.num_ranks, len(microbatches), label,
                                                                 subs)
        return order_lower_bound(stages, made, model.compute_seconds, subs)
    return label, build, bound


def compare_schedules(pipe: "CompiledPipeline", microbatches: Sequence[Mapping[str, Any]],
                      schedules: Sequence[str] = ("1f1b",), profile: str = "h800") -> dict[str, SimResult]:
    """Simulated step of each named schedule plus DIP's SEMU-scored plan (labelled with the
    candidate that won)."""
    model = step_model(pipe, microbatches, profile)
    out = {name: model.simulate(pipe.plan(microbatches, schedule=name)) for name in schedules}
    label, _, result = plan_dip(pipe, microbatches, model, baselines=schedules)
    out[f"{DIP_LABEL}: {label}"] = result
    return out
