"""Phase 3's recomputation, executed and measured on CPU: selective checkpointing against whole layers.

For each example model (2 ranks, 1F1B, Adam, one fixed batch of skewed microbatches) the plain
program is measured first: peak live tensor bytes per rank (``measured_peak_memory``, every tensor
the step allocates on top of parameters and optimizer states) and step time. Then, per memory limit
(``static + f x activations`` of SEMU's plain peak, per rank), DIP's phase 3 fits the program
three times: with whole-layer recomputation only (the paper's strategies), with selective
checkpointing allowed (``<layer>~sel``: matmul and attention outputs kept, cheap ops re-run), and
with selective allowed by a model blind to its dispatch cost (``sac_op_overhead`` 0, as on a GPU
profile): on this CPU torch's selective checkpointing costs ~15 us per op, more than a small
layer's cheap ops, so the honest model rarely picks it, and the blind plan shows what it frees
and costs when it is picked. Predicted step times are always the honest model's.
Each fitted program runs on the local executor; reported per plan: the measured peak against the
limit, SEMU's predicted peak error, how many layers each strategy took, and the measured and
predicted step time relative to the plain program (median of ``--repeats`` steps, thread CPU time,
plans interleaved step by step so machine drift hits all alike). SEMU uses the CPU profile
calibrated by ``semu_accuracy.py`` (``benchmarks/results/semu_calibrated_profile.json``), with the
per-op costs of torch's selective and full checkpointing measured here when the profile lacks them.

    python benchmarks/recompute_cpu.py [--models vlm,audio_llm,t2v] [--fractions 0.8,0.6,0.45]

Prints a table and writes ``benchmarks/results/recompute_cpu.json``.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import dipc  # noqa: E402
from dipc.errors import InfeasibleMemoryError  # noqa: E402
from dipc.ir.recompute import recompute_plan, split_entry  # noqa: E402
from dipc.runtime.measure import measured_peak_memory, timed_local_step  # noqa: E402
from dipc.semu.compare import step_model  # noqa: E402
from dipc.semu.memory_opt import optimize_memory  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "recompute_cpu.json"
PROFILE = ROOT / "benchmarks" / "results" / "semu_calibrated_profile.json"
NUM_RANKS, MICROBATCHES, SAMPLES = 2, 4, 2


def _counts(program) -> tuple[int, int]:
    """(selective, full) layer entries of the program's recompute plan, over its keys."""
    entries = [e for layers in recompute_plan(program).values() for e in layers]
    sel = sum(split_entry(e)[1] for e in entries)
    return sel, len(entries) - sel


def _median_steps(pipe, mbs, programs: dict, warmup: int, repeats: int) -> dict[str, float]:
    """Median thread-CPU seconds per step of each program, run round-robin."""
    times: dict[str, list[float]] = {k: [] for k in programs}
    for i in range(warmup + repeats):
        for name, program in programs.items():
            t = timed_local_step(pipe, mbs, program, clock="cpu").step_seconds
            if i >= warmup:
                times[name].append(t)
    return {k: statistics.median(v) for k, v in times.items()}


def cpu_profile(path: str):
    """The profile SEMU uses here, with torch's selective- and full-checkpointing costs per op
    measured on this CPU thread where the profile has none (profiles calibrated before they existed)."""
    from dipc.semu.profile_machine import measure_ckpt_op_overhead, measure_sac_op_overhead
    from dipc.semu.profiles import load_profile

    cluster = load_profile(path)
    device = cluster.device
    if device.kind == "cpu" and not device.sac_op_overhead:
        device = dataclasses.replace(device, sac_op_overhead=measure_sac_op_overhead())
    if device.kind == "cpu" and not device.ckpt_op_overhead:
        device = dataclasses.replace(device, ckpt_op_overhead=measure_ckpt_op_overhead())
    return dataclasses.replace(cluster, device=device)


def run_model(name: str, fractions: list[float], warmup: int, repeats: int, profile) -> dict:
    from examples.data import make_example

    torch.manual_seed(0)
    ex = make_example(name, seed=0)
    mbs = ex.data.microbatches(MICROBATCHES, SAMPLES)
    pipe = dipc.compile(ex.model, mbs[0], num_stages=NUM_RANKS, schedule="1f1b", loss_weight=ex.loss_weight,
                        optimizer=lambda ps: torch.optim.Adam(ps, lr=1e-4))   # SEMU counts Adam's states
    plain = pipe.plan(mbs)
    pipe.step(mbs, plain)                       # creates the optimizer states the peaks include
    model = step_model(pipe, mbs, profile)
    # the same model blind to selective checkpointing's dispatch cost: what phase 3 picks when it
    # believes selective is nearly free (as on a GPU), to measure what it really costs and frees here
    blind = step_model(pipe, mbs, dataclasses.replace(
        profile, device=dataclasses.replace(profile.device, sac_op_overhead=0.0)))
    pred_plain = model.simulate(plain, record=False)
    static = [sum(model.static_bytes(s.id) for s in pipe.stages if s.rank == r) for r in range(NUM_RANKS)]
    measured_plain = measured_peak_memory(pipe, mbs, plain)
    programs = {"plain": plain}
    rows = []
    for f in fractions:
        limit = [st + f * (pk - st) for st, pk in zip(static, pred_plain.peak_memory)]
        for strategy, selective, fit_model in (("whole layers", False, model), ("selective", True, model),
                                                ("selective, blind", True, blind)):
            row = {"fraction": f, "strategy": strategy, "limit_bytes": limit}
            try:
                fitted = optimize_memory(plain, fit_model, limit, selective=selective)
            except InfeasibleMemoryError as e:
                row["error"] = str(e).splitlines()[0]
                rows.append(row)
                continue
            key = f"{f}/{strategy}"
            programs[key] = fitted.program
            peak = measured_peak_memory(pipe, mbs, fitted.program)
            sel, full = _counts(fitted.program)
            row.update({"key": key, "selective_layers": sel, "full_layers": full,
                        "measured_peak_bytes": peak, "predicted_peak_bytes": list(fitted.peak_memory),
                        "measured_over_limit": max(p / lim for p, lim in zip(peak, limit)),
                        "peak_abs_err": max(abs(pr / m - 1) for pr, m in zip(fitted.peak_memory, peak)),
                        "predicted_step_s": model.simulate(fitted.program, record=False).step_time})
            rows.append(row)
    steps = _median_steps(pipe, mbs, programs, warmup, repeats)
    for row in rows:
        if "key" in row:
            row["measured_step_rel"] = steps[row["key"]] / steps["plain"]
            row["predicted_step_rel"] = row["predicted_step_s"] / pred_plain.step_time
    return {"model": name, "plain": {"measured_peak_bytes": measured_plain,
                                     "predicted_peak_bytes": list(pred_plain.peak_memory),
                                     "static_bytes": static, "measured_step_s": steps["plain"],
                                     "predicted_step_s": pred_plain.step_time}, "rows": rows}


def _print(result: dict) -> None:
    p = result["plain"]
    print(f"{result['model']}: plain peak measured {max(p['measured_peak_bytes']) / 2**20:.1f} MiB "
          f"(SEMU {max(p['predicted_peak_bytes']) / 2**20:.1f}), step {p['measured_step_s'] * 1e3:.1f} ms")
    print(f"  {'f':>5} {'strategy':17} {'sel':>4} {'full':>4} {'peak/limit':>10} {'SEMU peak err':>13} "
          f"{'step rel meas':>13} {'step rel SEMU':>13}")
    for r in result["rows"]:
        if "error" in r:
            print(f"  {r['fraction']:5.2f} {r['strategy']:17} infeasible: {r['error'][:80]}")
            continue
        print(f"  {r['fraction']:5.2f} {r['strategy']:17} {r['selective_layers']:4d} {r['full_layers']:4d} "
              f"{r['measured_over_limit']:10.3f} {r['peak_abs_err']:13.1%} {r['measured_step_rel']:13.3f} "
              f"{r['predicted_step_rel']:13.3f}")


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="vlm,audio_llm,t2v")
    ap.add_argument("--fractions", default="0.8,0.6,0.45",
                    help="memory limits as static + f x (SEMU's plain peak - static), per rank")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--profile", default=str(PROFILE) if PROFILE.is_file() else "h800")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    results = {"benchmark": "recompute_cpu", "profile": args.profile, "num_ranks": NUM_RANKS,
               "microbatches": MICROBATCHES, "samples_per_microbatch": SAMPLES, "schedule": "1f1b",
               "clock": "thread CPU time, median of repeats", "models": []}
    profile = cpu_profile(args.profile)
    results["sac_op_overhead_s"] = profile.device.sac_op_overhead
    results["ckpt_op_overhead_s"] = profile.device.ckpt_op_overhead
    print(f"selective checkpointing's dispatch: {profile.device.sac_op_overhead * 1e6:.1f} us per op; "
          f"full checkpointing's overhead: {profile.device.ckpt_op_overhead * 1e6:.1f} us per op")
    for name in args.models.split(","):
        res = run_model(name, [float(x) for x in args.fractions.split(",")], args.warmup, args.repeats, profile)
        results["models"].append(res)
        _print(res)
    results["seconds"] = time.perf_counter() - t0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    print(f"{results['seconds']:.0f} s; wrote {args.out}")
    return results


if __name__ == "__main__":
    main()
