"""SEMU accuracy: predicted vs measured step time and peak memory of the example models, every
baseline schedule, the local executor and 2 gloo ranks on CPU.

Usage::

    python benchmarks/semu_accuracy.py            # 20 test batches per model (a few minutes)
    python benchmarks/semu_accuracy.py --quick    # 4 test batches, fewer repeats (about a minute)

What it does, in order:

1. measures this CPU (``measure_profile``, one thread per rank) and the gloo link between two local
   processes (ping-pong over message sizes, :func:`dipc.runtime.measure.measure_gloo_link`);
2. calibrates the profile (:mod:`dipc.semu.calibrate`) on per-instruction CPU times (1f1b, zb_h1 and
   interleaved 1F1B steps) of *calibration* batches, drawn from a data source with a different seed
   than the test batches; the calibration steps run interleaved with the test steps of step 3, so
   both see the same machine load, and the fit uses none of the test steps;
3. for every model x schedule x test batch: the median step time (after a warm-up step; the
   batch's schedules timed round-robin, and schedules that compile to the same program timed
   once, :func:`_round_robin`) of the
   local executor (ranks run one after another: SEMU predicts the sum of all ranks' busy time; by
   default in this thread's CPU time, which other processes on a shared machine do not inflate) and
   of 2 gloo processes (SEMU predicts the simulated step time with gloo's send/receive handshake,
   plus the distributed executor's own per-step work, posting the plan check and the loss
   all-reduce, timed on their own, on the local profile calibrated once more to the gloo executor's own calibration
   steps: P2P op times from their measured timelines, a compute factor for co-located ranks and
   the latency with which a rank blocked in a receive wakes, :mod:`dipc.semu.calibrate_dist`); the peak live tensor bytes per rank of one local step with Adam
   (``measured_peak_memory``) vs the emulator's peak per rank;
4. DIP vs 1F1B direction: on batches of 8 one-sample microbatches (sizes skewed across
   microbatches), 1F1B and DIP's plan scored on the calibrated model (``dip_cpu``) and as dipc
   plans by default on its GPU profile (``dip_gpu``: usually the zero-bubble split), measured on both executors: the share of batches where the measured DIP/1F1B step-time ratio lies on the side of 1
   SEMU predicts, and the correlation of predicted and measured ratios;
5. prints a table and writes ``benchmarks/results/semu_accuracy.json`` (every case, the summary,
   the fitted profile) and the calibrated profile ``benchmarks/results/semu_calibrated_profile.json``.

Summary numbers: median and p90 of |predicted / measured - 1| per executor, and Kendall's tau
between predicted and measured schedule rankings per (model, batch), averaged per model and
overall. Targets: median <= 5 %, p90 <= 10 %, tau >= 0.8; memory within 10 %.

What limits accuracy: see ``LIMITS`` below (also written to the JSON).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from dipc.semu.self_calibrate import GLOO_P2P, GLOO_SIM  # noqa: E402  (SEMU's model of gloo's P2P in dipc's runtime)

MODELS = ("vlm", "audio_llm", "t2v")
SCHEDULE_CHUNKS = {"gpipe": 1, "1f1b": 1, "interleaved_1f1b": 2, "zb_h1": 1, "dual_queue": 1}
NUM_RANKS = 2
MICROBATCHES, SAMPLES = 4, 2
CALIBRATION_SEED, TEST_SEED = 1001, 7
DIP = "dip"          # the DIP vs 1F1B direction check's key
DIP_KEYS = ("1f1b", "dip_cpu", "dip_gpu")
CALIBRATION_SCHEDULES = ((1, "1f1b"), (1, "zb_h1"), (2, "interleaved_1f1b"))   # (chunks, schedule)
# the direction check's batches: more, smaller microbatches than the accuracy cases, so sizes are
# skewed across microbatches and DIP has orders to choose from
DIRECTION_SEED, DIRECTION_MICROBATCHES, DIRECTION_SAMPLES = 11, 8, 1
DEVICE = torch.device("cpu")   # --device: where the example models and their batches live
LIMITS = [
    "shared 2-core machine (4 sessions; load 6-8 while measured): the two gloo ranks get well under a core each, "
    "so gloo steps take up to 2-3x the serial CPU time of both ranks; gloo errors are then dominated by contention, "
    "which SEMU does not model (compute and communication of the two processes interfere)",
    "local steps are timed in this thread's CPU time (the default --clock cpu), which still drifts with cache/SMT "
    "contention between calibration and test (hence calibration runs interleaved with the test steps)",
    "tiny models: most of a 1-20 ms instruction is dispatch and interpreter work; one fixed time per instruction "
    "kind (FWD/BWD/BWD_I/BWD_W fitted, LOAD/SEND/RECV measured, the dispatch loop's share) plus a per-ATen-op term "
    "describes it only roughly (per-instruction fit error ~10%)",
    "local executor: the first stage's forwards (the encoders, small next to the backbone) took 1.2-2.5x their "
    "time run back to back on one microbatch (thread CPU time; no page faults; glibc's mmap and trim thresholds "
    "changed nothing; a fitted cost per switch between the two ranks came out at ~0: cause not found); the model "
    "has no term for it, so the fit under-predicts the first stage by 13-29% in-sample and spreads the rest over "
    "the per-kind constants, which over-charges programs with more instructions (interleaved 1F1B; a fitted "
    "first-stage constant of 0.3-0.4 ms per FWD/BWD lowered a 6-batch probe's p90 from 13.5% to 11.4%, but it "
    "is a fudge term without a cause, not landed)",
    "CPU attention: masked SDPA over packed sequences runs torch's math path: dense QK^T, a materialised softmax and "
    "its stash (modelled: dense FLOPs, a fitted time per probability byte, the probabilities in the stash)",
    "dipc's BWD_W runs only the weight-gradient nodes (dipc.runtime.split_backward), except in stages with "
    "recomputed layers, where it re-walks the backward graph (not modelled), and in stages where a parameter is "
    "used at several depths (T2V's conditioning MLP), where it walks the whole backward once (probed on the "
    "example batch, Pipeline.whole_wgrad_stages, and modelled as a whole backward); the stage glue and the loss "
    "have no cost entries of their own (their time is in the fitted per-kind constants)",
    "the calibrated profile adds memory-traffic time to compute time (bytes_mode=sum), as one CPU thread runs "
    "them and as the fit models them; the GPU presets keep the roofline max",
    "the local executor runs gpipe, 1f1b and dual_queue as the same instructions: SEMU predicts them equal, and "
    "their measured order is noise, which caps Kendall's tau there (about 0.84 if everything else is right)",
    "gloo: P2P is gloo's handshake (a send waits for the receive's ready notice) at the ping-pong's latency and "
    "bandwidth; messages with several dtypes make one handshake per dtype (modelled as one); P2P op times, one "
    "compute factor for co-located ranks, one slowdown per overlapped fraction of an instruction (the other rank "
    "computing at the same moment, dipc.semu.contention) and one wake-up latency per receive that blocked are "
    "calibrated on the gloo executor's own calibration steps (dipc.semu.calibrate_dist), but how much two ranks "
    "slow each other depends on what each runs (one slowdown for every op here), the host's other tenants "
    "change it from run to run (a rerun on a quiet VM gave gloo 8.7% / 26.6% / tau 0.34 with one factor, against "
    "5.7% / 17.5% / 0.38 under load), a blocked thread's wake-up is mostly "
    "immediate and now and then 3-5 ms late on this VM (one expected value here), and any other load on the "
    "machine lands in the gloo wall times in full",
    "memory: a backward's workspace walks the stage's layers as autograd does, each holding its output gradient "
    "and its own traced backward peak (bwd_peak_bytes), plus the loss head's log-softmax; allocator caching is not "
    "counted on either side",
]


def _pipes(ex, example_mb, memory: bool = False) -> dict[int, object]:
    import dipc

    opt = (lambda ps: torch.optim.Adam(ps, lr=1e-4)) if memory else None
    return {chunks: dipc.compile(ex.model, example_mb, num_stages=NUM_RANKS, chunks=chunks,
                                 schedule="interleaved_1f1b" if chunks == 2 else "1f1b",
                                 loss_weight=ex.loss_weight, optimizer=opt)
            for chunks in sorted(set(SCHEDULE_CHUNKS.values()))}


def _batches(name: str, seed: int, n: int, microbatches: int = MICROBATCHES, samples: int = SAMPLES
             ) -> list[list[dict]]:
    from examples.data import make_example

    from torch.utils._pytree import tree_map

    data = make_example(name, seed=seed).data
    batches = [data.microbatches(microbatches, samples) for _ in range(n)]
    if DEVICE.type == "cpu":
        return batches
    return [tree_map(lambda t: t.to(DEVICE) if isinstance(t, torch.Tensor) else t, mbs) for mbs in batches]


def _direction_batches(name: str, n: int) -> list[list[dict]]:
    return _batches(name, DIRECTION_SEED, n, DIRECTION_MICROBATCHES, DIRECTION_SAMPLES)


def _kendall_tau(a: list[float], b: list[float]) -> float:
    """Kendall's tau-b of two score lists (1: same order)."""
    conc = disc = ta = tb = 0
    for i in range(len(a)):
        for j in range(i + 1, len(a)):
            da, db = a[i] - a[j], b[i] - b[j]
            if da == 0 and db == 0:
                continue
            if da == 0:
                ta += 1
            elif db == 0:
                tb += 1
            elif (da > 0) == (db > 0):
                conc += 1
            else:
                disc += 1
    denom = math.sqrt((conc + disc + ta) * (conc + disc + tb))
    return (conc - disc) / denom if denom else 0.0


def _single_run_agreement(cases: list[dict], exe: str, num_batches: int) -> dict[str, float]:
    """How far SEMU is from one timed step, beside how far one timed step is from another of the
    same program: the measurement's own noise, which bounds what any model can score. Both sides
    on single repeats (``runs_s``): |t_r / t_s - 1| and Kendall's tau of two repeats' times over a
    batch's schedules, against |predicted / t_r - 1| and tau of predicted vs one repeat. Schedules
    that share one program (``same_program_as``) share its times, so they tie on both sides."""
    pred_err, meas_err, pred_tau, meas_tau = [], [], [], []
    for name in MODELS:
        for b in range(num_batches):
            group = [c for c in cases if c["model"] == name and c["batch"] == b]
            runs = [c[exe]["runs_s"] for c in group]
            n = min(len(r) for r in runs)
            for r in range(n):
                at_r = [x[r] for x in runs]
                pred_tau.append(_kendall_tau([c[exe]["predicted_s"] for c in group], at_r))
                for c, t in zip(group, at_r):
                    if "same_program_as" not in c:
                        pred_err.append(abs(c[exe]["predicted_s"] / t - 1))
                for q in range(r + 1, n):
                    meas_tau.append(_kendall_tau([x[q] for x in runs], at_r))
                    meas_err += [abs(x[q] / x[r] - 1) for c, x in zip(group, runs) if "same_program_as" not in c]
    return {"semu_vs_one_run_median_abs_err": statistics.median(pred_err),
            "semu_vs_one_run_p90_abs_err": _pct(pred_err, 0.9),
            "semu_vs_one_run_mean_kendall_tau": statistics.mean(pred_tau),
            "run_vs_run_median_abs_err": statistics.median(meas_err) if meas_err else float("nan"),
            "run_vs_run_p90_abs_err": _pct(meas_err, 0.9),
            "run_vs_run_mean_kendall_tau": statistics.mean(meas_tau) if meas_tau else float("nan")}


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    if not xs:
        return float("nan")
    k = (len(xs) - 1) * q
    lo, hi = math.floor(k), math.ceil(k)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def _pearson(a: list[float], b: list[float]) -> float:
    if len(a) < 2:
        return float("nan")
    ma, mb = statistics.fmean(a), statistics.fmean(b)
    da, db = [x - ma for x in a], [y - mb for y in b]
    den = math.sqrt(sum(x * x for x in da) * sum(y * y for y in db))
    return sum(x * y for x, y in zip(da, db)) / den if den else float("nan")


def _dip_plans(pipe, mbs, profile=None) -> dict:
    """DIP's plans for this batch (its dual-queue candidates only: with 1F1B among them, DIP could
    pick 1F1B and the check would be void): ``dip_gpu`` as dipc plans by default (candidates
    scored on its GPU profile, an ideal runtime; as ``tests/api`` plan), and, given the calibrated
    ``profile``, ``dip_cpu`` scored on this machine's model of dipc's runtime. Label -> program."""
    from dipc.semu.compare import plan_dip, step_model
    from dipc.semu.step_model import StepModel, pipeline_length_stats

    # reorder=False: the lightest-first search would add static and look-ahead candidates, and this
    # check compares the dual queue's own orders with 1F1B
    out = {"dip_gpu": plan_dip(pipe, mbs, step_model(pipe, mbs), reorder=False)[:2]}
    if profile is not None:
        sm = StepModel.for_pipeline(pipe, pipe._cost_model, profile, [pipeline_length_stats(pipe, mb) for mb in mbs],
                                    **StepModel.runtime_options(pipe))
        out["dip_cpu"] = plan_dip(pipe, mbs, sm, reorder=False)[:2]
    return out


def _gloo_predictor(pipe, cost_model, mbs, program):
    """profile -> SEMU's step time of ``program`` under gloo (:func:`dipc.semu.self_calibrate.gloo_step_predictor`)."""
    from dipc.semu.self_calibrate import gloo_step_predictor

    return gloo_step_predictor(pipe, mbs, program, cost_model)


def _calibration_samples(pipe, mbs, schedule: str, clock: str, runs: int = 3) -> list:
    """``runs`` timed local steps of ``schedule`` on ``mbs`` (after one untimed warm-up), each a
    :class:`~dipc.semu.calibrate.CalibrationSample`: every run is a sample, so least squares fits
    the mean instruction time, whose sum is what a step's time is (a sum of per-instruction
    medians runs low)."""
    from dipc.runtime.measure import timed_local_step
    from dipc.semu.calibrate import CalibrationSample
    from dipc.semu.step_model import pipeline_length_stats

    program = pipe.plan(mbs, schedule=schedule)
    timed_local_step(pipe, mbs, program, clock=clock)
    stats = [pipeline_length_stats(pipe, mb) for mb in mbs]
    out = []
    for _ in range(runs):
        run = timed_local_step(pipe, mbs, program, clock=clock)
        out.append(CalibrationSample(stats=stats, timings=run.compute_times(), other_timings=run.other_times(),
                                     untimed_seconds=run.untimed_seconds, num_instructions=len(run.records)))
    return out


def _calibration_set(pipe, cost_model, samples):
    """The :class:`~dipc.semu.calibrate.CalibrationSet` of ``samples`` timed on ``pipe``, with the
    local executor's runtime options (stages without input grads, stages whose BWD_W walks whole)."""
    from dipc.semu.calibrate import CalibrationSet

    stages = sorted(pipe.stages, key=lambda s: s.id)
    return CalibrationSet(stage_layers=[s.layers for s in stages], cost_model=cost_model, samples=samples,
                          no_input_grads=[s.id for s in stages if not s.grad_producers],
                          whole_wgrad_stages=sorted(pipe.whole_wgrad_stages()))


# ------------------------------------------------------------------------------------------------
# gloo: every rank builds the same pipelines and batches, then times every case


def _executor_fixed_seconds(repeats: int = 20) -> list[float]:
    """What a distributed step does besides its instructions, timed on its own: posting the plan
    check (text dump, checksum, an all-gather whose wait overlaps the first compute) and the loss
    all-reduce (the rank without a loss posts it at the start, so the step pays one all-reduce
    round, not two). Measured on a 1F1B program of a calibration batch (the dump's length, not its
    batch, sets the cost)."""
    import torch.distributed as dist

    from dipc.runtime.data_parallel import topology
    from dipc.runtime.distributed import ProgramCheck
    from examples.data import make_example

    ex = make_example(MODELS[0], seed=0)
    mbs = _batches(MODELS[0], CALIBRATION_SEED, 1)[0]
    pipe = _pipes(ex, mbs[0])[1]
    program = pipe.plan(mbs, schedule="1f1b")
    topo = topology(pipe.num_ranks)
    times = []
    for _ in range(repeats + 2):
        dist.barrier()
        t0 = time.perf_counter()
        check = ProgramCheck(program, topo, torch.device("cpu"))
        losses = torch.zeros(len(mbs), dtype=torch.float64)
        dist.all_reduce(losses)
        check.wait()
        times.append(time.perf_counter() - t0)
    return times[2:]


def _round_robin(plans: dict, step, warmup: int, repeats: int) -> tuple[dict[str, list[float]], dict[str, str]]:
    """Times of every plan (``name -> (pipe, microbatches, program)``), measured round-robin: each
    repeat runs every distinct program once, so a slow spell of a shared machine hits all of them
    alike instead of one schedule's repeats. Schedules that compile to the same program (same text
    dump on the same pipeline, e.g. the dual queue reproducing 1F1B) are measured once and share
    those times: timing one program twice would only add measurement noise between equals.
    Returns the times per name and, for a shared one, the name it shares with."""
    from dipc.ir.text import dump_program

    first: dict[tuple[int, str], str] = {}
    same: dict[str, str] = {}
    for name, (pipe, mbs, program) in plans.items():
        key = (id(pipe), id(mbs), dump_program(program))
        if key in first:
            same[name] = first[key]
        else:
            first[key] = name
    distinct = list(first.values())
    for name in distinct:
        for _ in range(warmup):
            step(*plans[name])
    times: dict[str, list[float]] = {name: [] for name in distinct}
    for _ in range(repeats):
        for name in distinct:
            times[name].append(step(*plans[name]))
    return {name: times[same.get(name, name)] for name in plans}, same


def _dist_cases(rank: int, world: int, num_batches: int, num_calib: int, warmup: int, repeats: int,
                profile_path: str | None = None) -> dict:
    import torch.distributed as dist

    from dipc.runtime.distributed import run_step_distributed
    from dipc.runtime.measure import timed_distributed_step
    from dipc.semu.profiles import load_profile
    from examples.data import make_example

    profile = load_profile(profile_path) if profile_path else None
    out: dict[str, list] = {"executor_fixed_s": _executor_fixed_seconds(), "cal_spans": []}
    for name in MODELS:
        ex = make_example(name, seed=0)
        batches = _batches(name, TEST_SEED, num_batches)
        pipes = _pipes(ex, batches[0][0])
        # calibration steps (the local fit's batches and schedules): one with a measured timeline
        # for the P2P op times, then timed ones for the compute factor (calibrate_dist)
        for k, cmbs in enumerate(_batches(name, CALIBRATION_SEED, num_calib)):
            for chunks, schedule in CALIBRATION_SCHEDULES:
                pipe = pipes[chunks]
                program = pipe.plan(cmbs, schedule=schedule)
                for _ in range(warmup):
                    timed_distributed_step(pipe, cmbs, program)
                timeline = run_step_distributed(pipe, cmbs, program, record_timeline=True).timeline
                out["cal_spans"] += [(op.value, e - s) for _, _, op, _, _, s, e in timeline.spans]
                times = []
                for _ in range(repeats):
                    t = torch.tensor([timed_distributed_step(pipe, cmbs, program)], dtype=torch.float64)
                    dist.all_reduce(t, op=dist.ReduceOp.MAX)
                    times.append(float(t))
                out[f"cal|{name}|{schedule}|{k}"] = times
        direction = _direction_batches(name, num_batches)
        for b, mbs in enumerate(batches):
            plans = {s: (pipes[c], mbs, pipes[c].plan(mbs, schedule=s)) for s, c in SCHEDULE_CHUNKS.items()}
            if profile is not None:   # every rank plans the same DIP programs (deterministic)
                dmbs = direction[b]
                plans[f"{DIP}-1f1b"] = (pipes[1], dmbs, pipes[1].plan(dmbs, schedule="1f1b"))
                for key, (_, program) in _dip_plans(pipes[1], dmbs, profile).items():
                    plans[f"{DIP}-{key}"] = (pipes[1], dmbs, program)
            def step(pipe, mbs, program) -> float:
                t = torch.tensor([timed_distributed_step(pipe, mbs, program)], dtype=torch.float64)
                dist.all_reduce(t, op=dist.ReduceOp.MAX)   # the step ends when the slowest rank does
                return float(t)

            times, _ = _round_robin(plans, step, warmup, repeats)
            for schedule, ts in times.items():
                out[f"{name}|{schedule}|{b}"] = ts
    return out


# ------------------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="4 test batches, 2 calibration batches, 2 repeats")
    ap.add_argument("--batches", type=int, default=None, help="test batches per model (default 20; quick 4)")
    ap.add_argument("--repeats", type=int, default=None, help="timed steps per case after warm-up (default 3)")
    ap.add_argument("--no-dist", action="store_true", help="skip the gloo runs")
    ap.add_argument("--regularization", default=None,
                    help="the calibration's ridge: cv, none or a strength (default: fit_profile's default)")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                    help="cuda: the models, batches and the measured profile on the GPU; local executor only "
                         "(one GPU: no gloo ranks), steps timed on the 'cuda' clock (wall time after a device "
                         "synchronisation), peak memory tracked per rank as on the CPU")
    ap.add_argument("--clock", choices=("wall", "cpu"), default="cpu",
                    help="local executor step clock: this thread's CPU time (default; robust to other processes "
                         "on a shared machine, and what calibration uses) or wall time")
    ap.add_argument("--out", default=None, help="default benchmarks/results/semu_accuracy[_gpu].json")
    a = ap.parse_args()
    global DEVICE
    DEVICE = torch.device(a.device)
    if DEVICE.type == "cuda":
        a.no_dist, a.clock = True, "cuda"
    cal_clock = "cpu" if DEVICE.type == "cpu" else a.clock
    a.out = a.out or str(ROOT / "benchmarks" / "results" / f"semu_accuracy{'' if DEVICE.type == 'cpu' else '_gpu'}.json")
    num_batches = a.batches or (4 if a.quick else 20)
    repeats = a.repeats or (2 if a.quick else 3)
    num_calib = 2 if a.quick else 4
    warmup = 1

    from dipc.runtime.measure import measure_gloo_link, measured_peak_memory, timed_local_step
    from dipc.semu.calibrate import fit_link, fit_profile
    from dipc.semu.calibrate_dist import DistributedSample, fit_distributed, p2p_overheads
    from dipc.semu.costs import layer_cost_model
    from dipc.semu.profile_machine import measure_profile
    from dipc.semu.profiles import save_profile
    from dipc.semu.step_model import StepModel, pipeline_length_stats
    from examples.data import make_example

    torch.set_num_threads(1)     # one thread per rank, as the gloo launcher gives each rank
    t_start = time.perf_counter()
    measured = measure_profile(quick=a.quick, device=a.device)
    link_points = measure_gloo_link(repeats=10 if a.quick else 30)
    link = fit_link(link_points)
    print(f"measured profile ({measured.device.name}): peak {measured.device.peak_flops['float32'] / 1e9:.1f} GFLOP/s fp32, "
          f"{measured.device.memory_bandwidth / 1e9:.1f} GB/s; gloo link {link.latency * 1e6:.0f} us + "
          f"{link.bandwidth / 1e9:.2f} GB/s")

    # -- local executor + calibration, interleaved ---------------------------------------------
    # Calibration steps (batches of another data seed) run between the test steps, so both see the
    # same load on a shared machine; the fit uses only the calibration steps, and predictions for
    # the test steps are made after it.
    models, cases = {}, []
    cal_timings: dict[tuple[str, int], list] = {}
    for name in MODELS:
        ex = make_example(name, seed=0)
        ex.model.to(DEVICE)
        test = _batches(name, TEST_SEED, num_batches)
        calib = _batches(name, CALIBRATION_SEED, num_calib)
        pipes = _pipes(ex, test[0][0])
        cms = {c: layer_cost_model(p.captured) for c, p in pipes.items()}
        models[name] = (ex, test, pipes, cms)
        cal_every = max(1, num_batches // num_calib)
        for b, mbs in enumerate(test):
            plans = {s: (pipes[c], mbs, pipes[c].plan(mbs, schedule=s)) for s, c in SCHEDULE_CHUNKS.items()}
            runs, same = _round_robin(plans, lambda p, m, prog: timed_local_step(p, m, prog, clock=a.clock).step_seconds,
                                      warmup, repeats)
            for schedule in SCHEDULE_CHUNKS:
                cases.append({"model": name, "schedule": schedule, "batch": b,
                              "local": {"measured_s": statistics.median(runs[schedule]),
                                        "measured_min_s": min(runs[schedule]), "runs_s": runs[schedule]},
                              "gloo": {}, **({"same_program_as": same[schedule]} if schedule in same else {})})
            if b % cal_every == 0 and b // cal_every < num_calib:
                cmbs = calib[b // cal_every]
                for chunks, schedule in CALIBRATION_SCHEDULES:
                    cal_timings.setdefault((name, chunks), []).extend(
                        _calibration_samples(pipes[chunks], cmbs, schedule, cal_clock))
        print(f"local executor: {name} done ({time.perf_counter() - t_start:.0f} s)")

    sets = [_calibration_set(models[name][2][chunks], models[name][3][chunks], samples)
            for (name, chunks), samples in cal_timings.items()]
    reg = a.regularization
    cal = fit_profile(measured, sets, link=link, name="this-cpu-calibrated",
                      **({} if reg is None else {"regularization": reg if reg in ("cv", "none") else float(reg)}))
    profile = cal.profile
    print(f"calibrated: compute x{cal.scale:.2f}, attention x{cal.attention_scale:.2f}, memory traffic "
          f"x{cal.memory_scale:.2f}, "
          f"{cal.op_overhead * 1e6:.3f} us/op, per instruction "
          + ", ".join(f"{k} {v * 1e6:.0f} us" for k, v in cal.op_overheads.items()) +
          f", masked attention {'dense' if cal.dense_masked_attention else 'sparse'} "
          f"({cal.probs_fwd_byte_time * 1e9:.2f} / {cal.probs_bwd_byte_time * 1e9:.2f} ns per probability byte), "
          f"dispatch {cal.dispatch_overhead * 1e6:.0f} us per instruction (in the above); "
          f"fit median |err| per instruction {cal.median_rel_error:.1%} over {cal.num_points} instructions; "
          f"ridge strength {cal.regularization_strength:.3g} ({cal.regularization}"
          + (f", held-out RMS error {cal.cv_error:.3f}" if cal.cv_error is not None else "") + ")")
    for c in cases:
        ex, test, pipes, cms = models[c["model"]]
        chunks = SCHEDULE_CHUNKS[c["schedule"]]
        pipe, mbs = pipes[chunks], test[c["batch"]]
        sm = StepModel.for_pipeline(pipe, cms[chunks], profile, [pipeline_length_stats(pipe, mb) for mb in mbs],
                                    **StepModel.runtime_options(pipe))
        program = pipe.plan(mbs, schedule=c["schedule"])
        sim = sm.simulate(program)
        c["local"]["predicted_s"] = sum(sim.busy)
        c["gloo"]["predicted_s"] = sm.simulate(program, memory=False, **GLOO_SIM).step_time
        c["predicted_peak_bytes"] = list(sim.peak_memory or ())

    # -- DIP vs 1F1B direction (own batches: 8 microbatches of 1 sample, sizes skewed) -------------
    # does the measured DIP/1F1B step-time ratio move the way the calibrated SEMU says?
    direction, direction_programs = [], {}
    for name, (ex, test, pipes, cms) in models.items():
        pipe = pipes[1]
        for b, mbs in enumerate(_direction_batches(name, num_batches)):
            pipe._cost_model = cms[1]
            dips = _dip_plans(pipe, mbs, profile)
            sm = StepModel.for_pipeline(pipe, cms[1], profile, [pipeline_length_stats(pipe, mb) for mb in mbs],
                                        **StepModel.runtime_options(pipe))
            row = {"model": name, "batch": b, "dip_plans": {k: label for k, (label, _) in dips.items()}}
            for key, program in [("1f1b", pipe.plan(mbs, schedule="1f1b"))] + [(k, p) for k, (_, p) in dips.items()]:
                direction_programs[(name, b, key)] = program
                sim = sm.simulate(program, memory=False)
                for _ in range(warmup):
                    timed_local_step(pipe, mbs, program, clock=a.clock)
                runs = [timed_local_step(pipe, mbs, program, clock=a.clock).step_seconds for _ in range(repeats)]
                row[key] = {"local": {"predicted_s": sum(sim.busy), "measured_s": statistics.median(runs)},
                            "gloo": {"predicted_s": sm.simulate(program, memory=False, **GLOO_SIM).step_time}}
            direction.append(row)
    print(f"DIP direction check: local done ({time.perf_counter() - t_start:.0f} s)")

    # -- peak memory (local executor, Adam, one step per model x schedule x first batches) -------
    mem_batches = 1 if a.quick else 3
    memory = []
    for name, (ex, test, pipes, cms) in models.items():
        mpipes = _pipes(ex, test[0][0], memory=True)
        for b, mbs in enumerate(test[:mem_batches]):
            stats = [pipeline_length_stats(mpipes[1], mb) for mb in mbs]
            for schedule, chunks in SCHEDULE_CHUNKS.items():
                pipe = mpipes[chunks]
                program = pipe.plan(mbs, schedule=schedule)
                pipe.step(mbs, program)                   # creates the optimizer states
                got = measured_peak_memory(pipe, mbs, program)
                sm = StepModel.for_pipeline(pipe, cms[chunks], profile, stats, **StepModel.runtime_options(pipe))
                want = sm.simulate(program).peak_memory
                memory.append({"model": name, "schedule": schedule, "batch": b, "measured_bytes": got,
                               "predicted_bytes": list(want),
                               "rel_err": [p / m - 1 for p, m in zip(want, got)]})

    # -- gloo -----------------------------------------------------------------------------------
    if not a.no_dist:
        from dipc.runtime.launch import spawn

        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            profile_path = str(Path(tmp) / "profile.json")
            save_profile(profile, profile_path)
            per_rank = spawn(_dist_cases, NUM_RANKS, num_batches, num_calib, warmup, repeats, profile_path,
                             timeout_s=3000)
        for c in cases:
            times = per_rank[0][f"{c['model']}|{c['schedule']}|{c['batch']}"]
            c["gloo"]["measured_s"] = statistics.median(times)
            c["gloo"]["measured_min_s"] = min(times)
            c["gloo"]["runs_s"] = times
        for d in direction:
            for key in DIP_KEYS:
                d[key]["gloo"]["measured_s"] = statistics.median(per_rank[0][f"{d['model']}|{DIP}-{key}|{d['batch']}"])
        # the distributed executor's own per-step work (plan check, loss all-reduce), timed apart
        # from any step, is added to every gloo prediction
        executor_fixed = statistics.median(max(a, b) for a, b in zip(per_rank[0]["executor_fixed_s"],
                                                                    per_rank[1]["executor_fixed_s"]))
        # calibrate the profile to the gloo executor on its calibration steps, then predict the tests
        samples = []
        for name, (ex, test, pipes, cms) in models.items():
            for k, cmbs in enumerate(_batches(name, CALIBRATION_SEED, num_calib)):
                for chunks, schedule in CALIBRATION_SCHEDULES:
                    pipe = pipes[chunks]
                    samples.append(DistributedSample(
                        predict=_gloo_predictor(pipe, cms[chunks], cmbs, pipe.plan(cmbs, schedule=schedule)),
                        measured_s=statistics.median(per_rank[0][f"cal|{name}|{schedule}|{k}"])))
        gloo_cal = fit_distributed(profile, samples, step_overhead=executor_fixed,
                                   p2p=p2p_overheads(per_rank[0]["cal_spans"], dispatch=cal.dispatch_overhead))
        print(f"gloo calibration: compute x{gloo_cal.compute_factor:.3f} (co-located ranks), "
              f"x(1 + {gloo_cal.colocated_slowdown:.2f} x overlap) beside the other rank's compute, blocked receives "
              f"wake {gloo_cal.wake_latency * 1e6:.0f} us late, P2P per op "
              + ", ".join(f"{k} {v * 1e6:.0f} us" for k, v in gloo_cal.p2p_overheads.items())
              + f", {executor_fixed * 1e3:.2f} ms per step; calibration steps median |err| "
              f"{gloo_cal.median_rel_error_before:.1%} -> {gloo_cal.median_rel_error:.1%}")
        for c in cases:
            ex, test, pipes, cms = models[c["model"]]
            pipe, mbs = pipes[SCHEDULE_CHUNKS[c["schedule"]]], test[c["batch"]]
            c["gloo"]["predicted_s"] = _gloo_predictor(pipe, cms[SCHEDULE_CHUNKS[c["schedule"]]], mbs, pipe.plan(
                mbs, schedule=c["schedule"]))(gloo_cal.profile) + executor_fixed
        direction_mbs = {name: _direction_batches(name, num_batches) for name in models}
        for d in direction:
            ex, test, pipes, cms = models[d["model"]]
            mbs = direction_mbs[d["model"]][d["batch"]]
            for key in DIP_KEYS:
                d[key]["gloo"]["predicted_s"] = _gloo_predictor(pipes[1], cms[1], mbs, direction_programs[(
                    d["model"], d["batch"], key)])(gloo_cal.profile) + executor_fixed
        print(f"gloo: done ({time.perf_counter() - t_start:.0f} s)")

    # -- summary --------------------------------------------------------------------------------
    executors = ["local"] + ([] if a.no_dist else ["gloo"])
    summary: dict[str, dict] = {}
    for exe in executors:
        errs = []
        for c in cases:
            e = c[exe]
            e["rel_err"] = e["predicted_s"] / e["measured_s"] - 1
            errs.append(abs(e["rel_err"]))
        taus: dict[str, list[float]] = {}
        for name in MODELS:
            for b in range(num_batches):
                group = [c for c in cases if c["model"] == name and c["batch"] == b]
                taus.setdefault(name, []).append(_kendall_tau([c[exe]["predicted_s"] for c in group],
                                                              [c[exe]["measured_s"] for c in group]))
        per_model = {}
        for name in MODELS:
            me = [abs(c[exe]["rel_err"]) for c in cases if c["model"] == name]
            per_model[name] = {"median_abs_err": statistics.median(me), "p90_abs_err": _pct(me, 0.9),
                               "mean_kendall_tau": statistics.mean(taus[name])}
        per_schedule = {s: statistics.median(abs(c[exe]["rel_err"]) for c in cases if c["schedule"] == s)
                        for s in SCHEDULE_CHUNKS}
        summary[exe] = {"median_abs_err": statistics.median(errs), "p90_abs_err": _pct(errs, 0.9),
                        "mean_kendall_tau": statistics.mean(t for v in taus.values() for t in v),
                        "per_model": per_model, "per_schedule_median_abs_err": per_schedule,
                        "single_runs": _single_run_agreement(cases, exe, num_batches)}
    summary["dip_vs_1f1b"] = {}
    for exe, key in ((e, k) for e in executors for k in DIP_KEYS[1:]):
        pred, meas = [], []
        for d in direction:
            dip, b1 = d[key][exe], d["1f1b"][exe]
            d[f"{key}_{exe}_ratio"] = {"predicted": dip["predicted_s"] / b1["predicted_s"],
                                       "measured": dip["measured_s"] / b1["measured_s"]}
            pred.append(d[f"{key}_{exe}_ratio"]["predicted"])
            meas.append(d[f"{key}_{exe}_ratio"]["measured"])
        signed = [(p, m) for p, m in zip(pred, meas) if abs(p - 1) > 1e-9]
        summary["dip_vs_1f1b"][f"{key} {exe}"] = {
            "sign_agreement": (sum((p - 1) * (m - 1) > 0 for p, m in signed) / len(signed)) if signed else None,
            "num_signed": len(signed), "num_batches": len(pred), "pearson_ratio": _pearson(pred, meas),
            "median_predicted_ratio": statistics.median(pred), "median_measured_ratio": statistics.median(meas)}
    mem_errs = [abs(e) for m in memory for e in m["rel_err"]]
    summary["memory"] = {"median_abs_err": statistics.median(mem_errs), "p90_abs_err": _pct(mem_errs, 0.9),
                         "max_abs_err": max(mem_errs),
                         "per_model_median_abs_err": {n: statistics.median(abs(e) for m in memory if m["model"] == n
                                                                          for e in m["rel_err"]) for n in MODELS}}

    # -- print ----------------------------------------------------------------------------------
    print()
    hdr = f"{'model':10s} {'schedule':17s} " + " ".join(f"{exe + ' err':>11s}" for exe in executors) + \
          "  (median over batches of predicted/measured - 1; measured ms)"
    print(hdr)
    for name in MODELS:
        for s in SCHEDULE_CHUNKS:
            group = [c for c in cases if c["model"] == name and c["schedule"] == s]
            cols = []
            for exe in executors:
                err = statistics.median(c[exe]["rel_err"] for c in group)
                ms = statistics.median(c[exe]["measured_s"] for c in group) * 1e3
                cols.append(f"{err:+6.1%} {ms:4.0f}")
            print(f"{name:10s} {s:17s} " + " ".join(f"{x:>11s}" for x in cols))
    print()
    for exe in executors:
        sm = summary[exe]
        print(f"{exe:6s}: median |err| {sm['median_abs_err']:.1%}  p90 {sm['p90_abs_err']:.1%}  "
              f"Kendall tau {sm['mean_kendall_tau']:.2f}   (targets 5% / 10% / 0.8)")
        for name, v in sm["per_model"].items():
            print(f"        {name:10s} median {v['median_abs_err']:.1%}  p90 {v['p90_abs_err']:.1%}  "
                  f"tau {v['mean_kendall_tau']:.2f}")
        one = sm["single_runs"]
        print(f"        single timed steps: SEMU vs one run median {one['semu_vs_one_run_median_abs_err']:.1%}  p90 "
              f"{one['semu_vs_one_run_p90_abs_err']:.1%}  tau {one['semu_vs_one_run_mean_kendall_tau']:.2f}; "
              f"one run vs another of the same programs (the measurement's own noise) median "
              f"{one['run_vs_run_median_abs_err']:.1%}  p90 {one['run_vs_run_p90_abs_err']:.1%}  "
              f"tau {one['run_vs_run_mean_kendall_tau']:.2f}")
    for exe, v in summary["dip_vs_1f1b"].items():
        agree = "-" if v["sign_agreement"] is None else f"{v['sign_agreement']:.0%}"
        print(f"{exe:13s}/1F1B: sign agrees on {agree} of {v['num_signed']} batches (of "
              f"{v['num_batches']}; the rest predicted equal), Pearson r of predicted vs measured ratios "
              f"{v['pearson_ratio']:.2f}; median ratio predicted {v['median_predicted_ratio']:.3f}, measured "
              f"{v['median_measured_ratio']:.3f}")
    mm = summary["memory"]
    print(f"memory: median |err| {mm['median_abs_err']:.1%}  p90 {mm['p90_abs_err']:.1%}  max "
          f"{mm['max_abs_err']:.1%} (target 10%); per model " +
          ", ".join(f"{k} {v:.1%}" for k, v in mm["per_model_median_abs_err"].items()))

    from dipc.semu.profiles import profile_to_json

    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    suffix = "" if DEVICE.type == "cpu" else "_gpu"
    save_profile(profile, out.with_name(f"semu_calibrated_profile{suffix}.json"))
    result = {
        "benchmark": "semu_accuracy", "quick": a.quick, "num_ranks": NUM_RANKS,
        "microbatches": MICROBATCHES, "samples_per_microbatch": SAMPLES, "test_batches_per_model": num_batches,
        "calibration_batches_per_model": num_calib, "repeats": repeats, "warmup": warmup, "local_clock": a.clock,
        "device": measured.device.name, "on_gpu": DEVICE.type == "cuda",
        "machine": {"cpus": os.cpu_count(), "torch": torch.__version__, "threads_per_rank": 1,
                    "note": "shared, noisy machine unless rerun on a quiet one"},
        "gloo_executor_fixed_s": None if a.no_dist else executor_fixed, "gloo_p2p_model": GLOO_P2P,
        "gloo_recv_lookahead": GLOO_SIM["recv_lookahead"],
        "gloo_calibration": None if a.no_dist else {
            "compute_factor": gloo_cal.compute_factor, "wake_latency_s": gloo_cal.wake_latency,
            "colocated_slowdown": gloo_cal.colocated_slowdown,
            "p2p_overheads_s": gloo_cal.p2p_overheads,
            "calibration_median_abs_err_before": gloo_cal.median_rel_error_before,
            "calibration_median_abs_err": gloo_cal.median_rel_error, "num_steps": len(samples)},
        "calibration": {"scale": cal.scale, "attention_scale": cal.attention_scale,
                        "memory_scale": cal.memory_scale, "op_overhead_s": cal.op_overhead,
                        "instruction_overhead_s": cal.instruction_overhead, "op_overheads_s": cal.op_overheads,
                        "probs_fwd_byte_time_s": cal.probs_fwd_byte_time,
                        "probs_bwd_byte_time_s": cal.probs_bwd_byte_time,
                        "dispatch_overhead_s": cal.dispatch_overhead,
                        "dense_masked_attention": cal.dense_masked_attention, "num_points": cal.num_points,
                        "fit_median_rel_err": cal.median_rel_error, "residuals": cal.residuals,
                        "regularization": cal.regularization, "regularization_strength": cal.regularization_strength,
                        "cv_error": cal.cv_error, "cv_folds": cal.cv_folds,
                        "link_points": link_points, "link": {"latency": link.latency, "bandwidth": link.bandwidth}},
        "profile": profile_to_json(profile),
        "targets": {"median_abs_err": 0.05, "p90_abs_err": 0.10, "kendall_tau": 0.8, "memory_abs_err": 0.10},
        "summary": summary, "limits": LIMITS, "cases": cases, "memory": memory, "dip_vs_1f1b": direction,
        "seconds": time.perf_counter() - t_start,
    }
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out} ({result['seconds']:.0f} s)")


if __name__ == "__main__":
    main()
