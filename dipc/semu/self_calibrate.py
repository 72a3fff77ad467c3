"""Calibrate SEMU to one compiled pipeline on the machine it runs on, from a few of its own steps.

Why: a measured device profile (``dipc profile``, or the quick one
:func:`~dipc.semu.profile_machine.default_profile` takes on CPU) knows the machine's matmul
throughput and memory bandwidth, not what a pipeline step costs besides: eager dispatch of many
small ATen ops and dipc's interpreter, ~0.2 ms per forward and up to ~1.6 ms per weight-gradient
instruction of the tiny example models on this project's CPU VM
(``benchmarks/results/semu_calibrated_profile.json``). Scored without them, DIP's search takes
programs with more, smaller instructions (split backward, sub-microbatches) for free: on the
example VLM over gloo it picked plans measured 0.77x 1F1B's speed while SEMU predicted 1.6x
(``benchmarks/dip_cpu.py``, quick profile). :func:`calibrate_pipeline` times local steps of the
pipeline's static schedules and of a split-backward dual-queue order on sample batches (so every
instruction kind is seen), then fits the profile as :func:`dipc.semu.calibrate.fit_profile` does
for the accuracy benchmark.

What it leaves: links (the base profile's; calibrate them with
:func:`dipc.runtime.measure.measure_gloo_link` and :func:`~dipc.semu.calibrate.fit_link`), the
instructions of sub-microbatches (a split stage's instructions are timed per sub, the cost model
is per microbatch: they are left out of the fit), and memory (calibration fits times only).
The model's parameters, gradients and the RNG are as they were before: no optimizer step is
taken, gradients are restored, the RNG state forked.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import torch

from dipc.errors import DipcError
from dipc.ir import COMPUTE_OPS
from dipc.ir.posting import GLOO_RECV_LOOKAHEAD

if TYPE_CHECKING:
    from dipc.api import CompiledPipeline
    from dipc.semu.calibrate_dist import DistributedCalibration
    from dipc.semu.calibrate import CalibrationResult
    from dipc.semu.profiles import ClusterProfile

__all__ = ["GLOO_P2P", "GLOO_SIM", "calibrate_distributed", "calibrate_pipeline", "gloo_step_predictor"]

GLOO_P2P = "handshake"   # SEMU's P2P model for gloo: unbound-buffer sends wait for the receiver's ready notice
# simulate()'s keywords for dipc's runtime on gloo: the handshake, receives posted as the runtime posts them
GLOO_SIM: dict[str, Any] = {"p2p": GLOO_P2P, "recv_lookahead": GLOO_RECV_LOOKAHEAD}


@contextmanager
def _untrained(pipe: "CompiledPipeline") -> Iterator[torch.device]:
    """Steps taken inside leave the model as it was: each parameter's gradient is put back and the
    caller's RNG stream does not move (the steps themselves must not step an optimizer).
    Yields the parameters' device."""
    params = list(pipe.model.parameters())
    device = params[0].device if params else torch.device("cpu")
    grads = [p.grad for p in params]
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        try:
            yield device
        finally:
            for p, g in zip(params, grads):
                p.grad = g


def gloo_step_predictor(pipe: "CompiledPipeline", microbatches: Sequence[Mapping[str, Any]], program: Any,
                        cost_model: Any = None) -> Callable[["ClusterProfile"], float]:
    """profile -> SEMU's step time of ``program`` on ``microbatches`` under gloo's handshake, as
    dipc's runtime runs it (without the executor's fixed per-step work): what
    :func:`dipc.semu.calibrate_dist.fit_distributed` fits. ``cost_model``: default the pipeline's."""
    from dipc.semu.step_model import StepModel, pipeline_length_stats

    stats = [pipeline_length_stats(pipe, mb) for mb in microbatches]
    cm = cost_model if cost_model is not None else pipe._cost_model

    def predict(profile: "ClusterProfile") -> float:
        model = StepModel.for_pipeline(pipe, cm, profile, stats, **StepModel.runtime_options(pipe))
        return model.simulate(program, memory=False, **GLOO_SIM).step_time
    return predict


def _programs(pipe: "CompiledPipeline", microbatches: Sequence[Mapping[str, Any]]) -> list:
    """The programs timed on one batch: every static schedule of the layout and the dual queue
    with the zero-bubble split (the only one with BWD_I / BWD_W where the layout has no ZB-H1),
    all without recomputation (the fit charges each instruction its own work)."""
    from dipc.passes.dual_queue import dual_queue_schedule

    split = dual_queue_schedule(list(pipe.stage_infos), pipe.num_ranks, len(microbatches), split_backward=True,
                                subs=pipe.sub_counts(microbatches))
    return [*(pipe.lowered(microbatches, name) for name in pipe.static_schedules()),
            pipe.lowered(microbatches, "dip", split)]


def calibrate_pipeline(pipe: "CompiledPipeline", batches: Sequence[Sequence[Mapping[str, Any]]],
                       base: "ClusterProfile | str | None" = None, runs: int = 2,
                       clock: str = "cpu") -> "CalibrationResult":
    """SEMU's profile fitted to ``pipe``'s local steps on ``batches`` (each a list of
    microbatches): ``runs`` timed steps (after one warm-up) of every program :func:`_programs`
    lists. ``base``: the profile to start from (default: the device's,
    :func:`~dipc.semu.profile_machine.default_profile`). ``clock="cpu"`` times this thread's CPU
    time (steady on a shared machine; see :func:`dipc.runtime.measure.timed_local_step`)."""
    from dipc.runtime.measure import timed_local_step
    from dipc.semu.calibrate import CalibrationSample, CalibrationSet, fit_profile
    from dipc.semu.costs import layer_cost_model
    from dipc.semu.profile_machine import default_profile
    from dipc.semu.profiles import load_profile
    from dipc.semu.step_model import pipeline_length_stats

    if not batches or runs < 1:
        raise DipcError(f"calibration needs at least one batch and one run (got {len(batches)} batches, runs={runs}). "
                        "Fix: pass a sample batch of microbatches and runs >= 1.")
    params = list(pipe.model.parameters())
    samples = []
    # measuring the base profile and running steps draw random numbers: the caller's stream must not move
    with _untrained(pipe) as device:
        if base is None:
            base = default_profile(device.type)
        elif isinstance(base, str):
            base = load_profile(base)
        if getattr(pipe, "_cost_model", None) is None:
            pipe._cost_model = layer_cost_model(pipe.captured)
        for mbs in batches:
            stats = [pipeline_length_stats(pipe, mb) for mb in mbs]
            for program in _programs(pipe, mbs):
                for k in range(runs + 1):
                    pipe.model.zero_grad(set_to_none=True)
                    run = timed_local_step(pipe, mbs, program, clock=clock, step_optimizer=False)
                    if k == 0:
                        continue   # warm-up: allocator, first-call paths
                    samples.append(CalibrationSample(
                        stats=stats,
                        timings=[(i.op.value, i.stage, i.mb, t) for _, i, t in run.records
                                 if i.op in COMPUTE_OPS and i.sub < 0],
                        other_timings=run.other_times(), untimed_seconds=run.untimed_seconds,
                        num_instructions=len(run.records)))
    stages = sorted(pipe.stages, key=lambda s: s.id)
    calibration = CalibrationSet(stage_layers=[s.layers for s in stages], cost_model=pipe._cost_model,
                                 samples=samples, no_input_grads=[s.id for s in stages if not s.grad_producers],
                                 whole_wgrad_stages=sorted(pipe.whole_wgrad_stages()))
    dtype = str(params[0].dtype).removeprefix("torch.") if params else "float32"
    return fit_profile(base, [calibration], name=f"{base.name}-calibrated", dtype=dtype)


def calibrate_distributed(pipe: "CompiledPipeline", batches: Sequence[Sequence[Mapping[str, Any]]], runs: int = 2,
                          src: int = 0, timeout_s: float = 60.0) -> "DistributedCalibration | None":
    """Fit pipeline rank ``src``'s profile (``pipe.profile``, already fitted to local steps by
    :meth:`~dipc.api.CompiledPipeline.calibrate`) to steps of the multi-process executor
    (:func:`dipc.semu.calibrate_dist.fit_distributed`: a compute factor for co-located ranks, the
    co-located slowdown, the wake-up latency of blocked receives, P2P op times from a measured
    timeline). A collective: every rank of the pipeline calls it with the same ``batches``.

    Why: local steps run the ranks one after another on one thread; over gloo the ranks share
    the host's cores and wait on each other. SEMU calibrated on local steps alone under-predicted
    the example text LM's gloo steps by ~35% (``benchmarks/runtime_vs_torch_pipelining.py``'s
    model); fitted here, its calibration steps' median error fell from 36% to 5%, and later
    batches came out ~12% over.

    Per batch and static schedule of the layout: one warm-up step, one with a measured timeline,
    ``runs`` timed ones (the max over ranks, median over runs). No optimizer step is taken,
    gradients are restored and the RNG stream forked. Returns the fit on pipeline rank ``src``,
    None on the others (:meth:`~dipc.api.CompiledPipeline.calibrate_distributed` plans with it)."""
    import statistics
    import time

    import torch.distributed as dist

    from dipc.runtime.data_parallel import topology
    from dipc.runtime.distributed import collective, run_step_distributed
    from dipc.semu.calibrate_dist import DistributedSample, fit_distributed, p2p_overheads
    from dipc.semu.profiles import ClusterProfile

    topo = topology(pipe.num_ranks)
    if topo.pp_rank == src and not isinstance(pipe.profile, ClusterProfile):
        raise DipcError(f"rank {topo.rank}: distributed calibration fits on top of a locally calibrated profile, "
                        f"but the pipeline's profile is {pipe.profile!r}. Fix: call pipe.calibrate(batches) on "
                        f"pipeline rank {src} first.")
    spans: list[tuple[str, float]] = []
    measured: list[tuple[Sequence[Mapping[str, Any]], Any, float]] = []
    with _untrained(pipe) as device:
        for mbs in batches:
            for name in pipe.static_schedules():
                program = pipe.lowered(mbs, name)
                run_step_distributed(pipe, mbs, program, timeout_s, step_optimizer=False)   # warm-up
                timeline = run_step_distributed(pipe, mbs, program, timeout_s, record_timeline=True,
                                                step_optimizer=False).timeline
                spans += [(op.value, e - s) for _, _, op, _, _, s, e in timeline.spans]
                times = []
                for _ in range(runs):
                    collective("calibration barrier", topo.rank, lambda: dist.barrier(group=topo.pp_group))
                    t0 = time.perf_counter()
                    run_step_distributed(pipe, mbs, program, timeout_s, step_optimizer=False)
                    t = torch.tensor([time.perf_counter() - t0], dtype=torch.float64, device=device)
                    collective("calibration step time", topo.rank,
                               lambda: dist.all_reduce(t, op=dist.ReduceOp.MAX, group=topo.pp_group))
                    times.append(t.item())
                measured.append((mbs, program, statistics.median(times)))
    if topo.pp_rank != src:
        return None
    samples = [DistributedSample(predict=gloo_step_predictor(pipe, mbs, program), measured_s=t)
               for mbs, program, t in measured]
    fit = fit_distributed(pipe.profile, samples, p2p=p2p_overheads(spans))
    # the profile says which P2P model it was fitted under, so plans scored on it use that model
    return dataclasses.replace(fit, profile=dataclasses.replace(fit.profile, **GLOO_SIM))
