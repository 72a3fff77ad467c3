"""DIP's per-batch plans (``dipc.compile(..., schedule="dip")``) against the static schedules,
measured on this machine: the example models trained pipelined over gloo on skewed batches.

What a user gets: every batch planned by the library's DIP search on the profile ``plan()``
uses by default on CPU (this machine measured quick, then calibrated on the pipeline's own local
steps of the first batch: :mod:`dipc.semu.self_calibrate`), the program broadcast from rank 0,
run by the distributed executor. ``DIPC_PROFILE=...`` names another profile instead. Each batch runs under every schedule in turn (same processes, same
batch, ``--repeats`` times each, interleaved so machine noise hits all alike); the step time
of a (batch, schedule) is the median of its repeats, measured as the slower rank's wall time
between a barrier and the step's return; each round runs the schedules in a rotated order.
Beside the measurement, SEMU's prediction of the same
programs on the same profile, so the table says whether DIP moves the step the way SEMU said.

``plan ms``: rank 0's planning time per batch (median). The static pipelines' figure is mostly
plan-time shape inference meeting new batch layouts (concrete propagation until a symbolic
template is traced); the DIP pipeline's calibration planned enough to trace its templates early.

Schedules: ``1f1b`` (one stage per rank), ``interleaved_1f1b`` and ``dip`` (two stages per
rank: the layout DIP plans on, so ``dip`` can pick interleaved 1F1B itself, or anything better
SEMU finds); parameters are not updated (no optimizer), so every schedule sees the same model.

Usage::

    python benchmarks/dip_cpu.py [--models vlm,audio_llm,t2v] [--batches 8] [--repeats 3]

Prints a table and writes ``benchmarks/results/dip_cpu.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

SCHEDULES = (("1f1b", 1), ("interleaved_1f1b", 2), ("dip", 2))   # (schedule, stages per rank)


def _rank(rank: int, world: int, model: str, batches: int, repeats: int, microbatches: int, per_mb: int,
          seed: int) -> dict:
    import torch.distributed as dist

    import dipc
    from dipc.runtime.async_plan import broadcast_program
    from dipc.runtime.distributed import run_step_distributed
    from dipc.semu.compare import step_model
    from dipc.semu.profile_machine import default_profile
    from examples.data import make_example

    ex = make_example(model, seed=seed)
    example = ex.data.microbatches(1, per_mb)[0]
    pipes = {name: dipc.compile(ex.model, example, num_stages=world, chunks=chunks, schedule=name,
                                loss_weight=ex.loss_weight) for name, chunks in SCHEDULES}
    data = [ex.data.microbatches(microbatches, per_mb) for _ in range(batches)]
    rows = []
    for b, mbs in enumerate(data):
        programs, plan_ms = {}, {}
        for name, pipe in pipes.items():
            t0 = time.perf_counter()
            mine = pipe.plan(mbs) if rank == 0 else None
            plan_ms[name] = (time.perf_counter() - t0) * 1e3
            programs[name] = broadcast_program(mine, src=0)
        times: dict[str, list[float]] = {name: [] for name in pipes}
        names = list(pipes)
        for rep in range(repeats + 1):   # the first round warms up (allocator, shape templates)
            # each round in a rotated order: a schedule that always ran after the same one gained
            # up to ~8% (identical programs measured 1.08x apart in a fixed order)
            for name in names[rep % len(names):] + names[:rep % len(names)]:
                pipe = pipes[name]
                ex.model.zero_grad(set_to_none=True)
                dist.barrier()
                t0 = time.perf_counter()
                run_step_distributed(pipe, mbs, programs[name], timeout_s=120)
                took = torch.tensor([time.perf_counter() - t0])
                dist.all_reduce(took, op=dist.ReduceOp.MAX)
                if rep:
                    times[name].append(float(took))
        if rank == 0:   # SEMU on the profile DIP planned with (calibrated on the first batch, or $DIPC_PROFILE)
            profile = pipes["dip"].profile or default_profile("cpu")
            predicted = {name: step_model(pipes[name], mbs, profile, runtime=True).simulate(programs[name]).step_time
                         for name in pipes}
            rows.append({"batch": b, "tokens": sum(int(mb["labels"].numel()) for mb in mbs if "labels" in mb),
                         "measured_s": {n: statistics.median(t) for n, t in times.items()},
                         "measured_runs_s": times, "predicted_s": predicted, "plan_ms": plan_ms,
                         "dip_program": programs["dip"].schedule,
                         "dip_recompute": bool(getattr(programs["dip"], "recompute", None)),
                         "dip_microbatch_order": list(programs["dip"].microbatch_order)})
    return {"rows": rows}


def _summary(rows: list[dict]) -> dict:
    out = {}
    for base in ("1f1b", "interleaved_1f1b"):
        meas = [r["measured_s"][base] / r["measured_s"]["dip"] for r in rows]      # > 1: DIP faster
        pred = [r["predicted_s"][base] / r["predicted_s"]["dip"] for r in rows]
        signed = [(p, m) for p, m in zip(pred, meas) if abs(p - 1) > 0.02]
        out[f"dip_vs_{base}"] = {
            "measured_speedup_median": statistics.median(meas), "measured_speedup_min": min(meas),
            "measured_speedup_max": max(meas), "predicted_speedup_median": statistics.median(pred),
            "predicted_speedup_min": min(pred), "predicted_speedup_max": max(pred),
            # of the batches where SEMU predicts a difference above 2%: how often the measurement moved the same way
            "direction_agrees": sum((p > 1) == (m > 1) for p, m in signed), "direction_signed": len(signed)}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="vlm,audio_llm,t2v")
    ap.add_argument("--batches", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--microbatches", type=int, default=4)
    ap.add_argument("--samples-per-microbatch", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "dip_cpu.json"))
    args = ap.parse_args()
    from dipc.runtime.launch import spawn

    t0 = time.perf_counter()
    load0 = os.getloadavg()[0]
    result = {"benchmark": "dip_cpu", "method": __doc__, "machine": {
        "cpu_count": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version()},
        "config": vars(args), "models": {}}
    print(f"DIP per-batch plans vs static schedules, 2 gloo ranks on this CPU, {args.batches} skewed batches x "
          f"{args.microbatches} microbatches per model, median of {args.repeats} runs each")
    print(f"{'model':<10}{'schedule':<18}{'measured ms':>12}{'SEMU ms':>10}{'plan ms':>9}   speed-up of DIP (measured / SEMU)")
    for model in args.models.split(","):
        rows = spawn(_rank, 2, model, args.batches, args.repeats, args.microbatches, args.samples_per_microbatch,
                     args.seed, timeout_s=3600)[0]["rows"]
        summary = _summary(rows)
        summary["dip_own_order_batches"] = sum(r["dip_program"] == "dip" for r in rows)
        summary["dip_lightest_first_batches"] = sum(bool(r.get("dip_microbatch_order")) for r in rows)
        result["models"][model] = {"rows": rows, "summary": summary}
        for name, _ in SCHEDULES:
            m = statistics.mean(r["measured_s"][name] for r in rows) * 1e3
            p = statistics.mean(r["predicted_s"][name] for r in rows) * 1e3
            plan = statistics.median(r["plan_ms"][name] for r in rows)
            own = sum(r["dip_program"] == "dip" for r in rows)
            light = summary["dip_lightest_first_batches"]
            extra = (f"   its own order on {own}/{len(rows)} batches, else a static schedule; lightest first on "
                     f"{light}") if name == "dip" else ""
            if name != "dip":
                s = summary[f"dip_vs_{name}"]
                extra = (f"   {s['measured_speedup_median']:.3f}x / {s['predicted_speedup_median']:.3f}x median, "
                         f"direction agrees {s['direction_agrees']}/{s['direction_signed']}")
            print(f"{model:<10}{name:<18}{m:>12.1f}{p:>10.1f}{plan:>9.1f}{extra}")
    result["seconds"] = time.perf_counter() - t0
    result["load_avg_1min_start_end"] = [load0, os.getloadavg()[0]]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out} ({result['seconds']:.0f} s)")


if __name__ == "__main__":
    main()
