"""Score a compiled pipeline's schedules for one batch with SEMU, DIP's cost-driven
interleaving included, so users (and `dipc trace`) see predicted step time and bubbles side by side."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping, Sequence

from dipc.ir import Op, Program
from dipc.passes.dual_queue import TaskCosts, dual_queue_schedule
from dipc.semu.emulator import SimResult

if TYPE_CHECKING:
    from dipc.api import CompiledPipeline

DIP_LABEL = "DIP"


def step_model(pipe: "CompiledPipeline", microbatches: Sequence[Mapping[str, Any]], profile: str = "h800"):
    """SEMU's model of this pipeline on ``profile`` for these microbatches (cost model cached on pipe)."""
    from dipc.semu.costs import layer_cost_model
    from dipc.semu.profiles import load_profile
    from dipc.semu.step_model import StepModel, pipeline_length_stats

    if getattr(pipe, "_cost_model", None) is None:
        pipe._cost_model = layer_cost_model(pipe.captured)
    stats = [pipeline_length_stats(pipe, mb) for mb in microbatches]
    return StepModel.for_pipeline(pipe, pipe._cost_model, load_profile(profile), stats)


def dip_candidates(pipe: "CompiledPipeline", model, num_microbatches: int) -> dict[str, list]:
    """Phase 2 of DIP's search fed with SEMU's per-(stage, microbatch) times, under a few
    microbatch priority rules (in order; heaviest first; lightest first), each with and without the
    zero-bubble backward split. Phase 1 (MCTS over segment priorities) will generate these."""
    t = model.stage_time
    work = [sum(t(s.id, m).fwd + t(s.id, m).bwd for s in pipe.stages) for m in range(num_microbatches)]
    heavy = {m: i for i, m in enumerate(sorted(range(num_microbatches), key=lambda m: -work[m]))}
    light = {m: i for i, m in enumerate(sorted(range(num_microbatches), key=lambda m: work[m]))}
    priorities = {"in order": None,
                  "heaviest first": lambda op, s, m: (heavy[m], s if op is Op.FWD else -s),
                  "lightest first": lambda op, s, m: (light[m], s if op is Op.FWD else -s)}
    plain = TaskCosts(fwd=lambda s, m: t(s, m).fwd, bwd=lambda s, m: t(s, m).bwd)
    split = TaskCosts(fwd=plain.fwd, bwd=lambda s, m: t(s, m).bwd_in, wgrad=lambda s, m: t(s, m).bwd_w)
    stages = list(pipe.stage_infos)
    out = {}
    for label, prio in priorities.items():
        out[label] = dual_queue_schedule(stages, pipe.num_ranks, num_microbatches, plain, priority=prio)
        out[label + ", split backward"] = dual_queue_schedule(stages, pipe.num_ranks, num_microbatches, split,
                                                              priority=prio, split_backward=True)
    return out


def plan_dip(pipe: "CompiledPipeline", microbatches: Sequence[Mapping[str, Any]], model,
             baselines: Sequence[str] = ()) -> tuple[str, Program, SimResult]:
    """DIP's plan for this batch: every candidate order (and the static ``baselines``) lowered,
    validated and scored by SEMU; the fastest wins, so DIP never loses to the baselines it saw."""
    best = None
    candidates = {f"dual-queue ({k})": v for k, v in dip_candidates(pipe, model, len(microbatches)).items()}
    for name in baselines:
        candidates[name] = None
    for label, orders in candidates.items():
        program = (pipe.plan(microbatches, schedule=label) if orders is None else
                   pipe.plan(microbatches, schedule="dual_queue", compute_orders=orders))
        result = model.simulate(program)
        if best is None or result.step_time < best[2].step_time:
            best = (label, program, result)
    return best


def compare_schedules(pipe: "CompiledPipeline", microbatches: Sequence[Mapping[str, Any]],
                      schedules: Sequence[str] = ("1f1b",), profile: str = "h800") -> dict[str, SimResult]:
    """Simulated step of each named schedule plus DIP's SEMU-scored plan (labelled with the
    candidate that won)."""
    model = step_model(pipe, microbatches, profile)
    out = {name: model.simulate(pipe.plan(microbatches, schedule=name)) for name in schedules}
    label, _, result = plan_dip(pipe, microbatches, model, baselines=schedules)
    out[f"{DIP_LABEL}: {label}"] = result
    return out
