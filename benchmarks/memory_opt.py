"""DIP phase 3 at paper scale, on SEMU: VLM-S (ViT 5B + Llama3 8B), TP4 PP4, H800 profile, skewed
packed batches (the data and layout of ``benchmarks/schedule_quality.py``). For each schedule and
per-rank memory limit: the simulated step time with phase 3's recomputation relative to the same
program without it, the peak per rank, how many layers each stage recomputes, and phase 3's own
latency (ILP per rank + emulator check). A limit nothing fits reports the error's excess.

Simulated, not measured: SEMU's analytical H800 model, uncalibrated.

    python benchmarks/memory_opt.py --batches 5 --limits 80 60 40 30
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dipc.errors import InfeasibleMemoryError  # noqa: E402
from dipc.passes.codegen import lower  # noqa: E402
from dipc.passes.schedules import SCHEDULES  # noqa: E402
from dipc.semu.memory_opt import optimize_memory  # noqa: E402
from dipc.semu.profiles import load_preset  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "memory_opt.json"
TP, P = 4, 4


def _schedule_quality():
    spec = importlib.util.spec_from_file_location("schedule_quality", ROOT / "benchmarks" / "schedule_quality.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod   # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(mod)
    return mod


def run(num_batches: int, num_microbatches: int, limits_gb: list[float], schedules: list[str],
        seed: int = 0) -> dict:
    sq = _schedule_quality()
    cluster = load_preset(sq.PROFILE)
    cm = sq.cost_model()
    rng = np.random.default_rng(seed)
    rep = [sq.microbatch_stats(mb, sq.IMAGE_TOKENS) for mb in sq.pack_batch(rng, "mixed", num_microbatches)]
    layout = sq.choose_layout(cm, cluster, TP, rep, P, 1)
    rows: dict[tuple[str, float], list[dict]] = {}
    for b in range(num_batches):
        stats = [sq.microbatch_stats(mb, sq.IMAGE_TOKENS) for mb in sq.pack_batch(rng, "mixed", num_microbatches)]
        costs = sq.batch_costs(cm, cluster, TP, layout, stats)
        for name in schedules:
            orders = SCHEDULES[name](layout.stages, P, num_microbatches)
            program = lower(layout.stages, P, num_microbatches, orders, schedule=name, specs=sq._specs(costs))
            plain = costs.step.simulate(program, record=False)
            for gb in limits_gb:
                t0 = time.perf_counter()
                try:
                    fitted = optimize_memory(program, costs.step, gb * 1e9)
                except InfeasibleMemoryError as e:
                    rows.setdefault((name, gb), []).append({"batch": b, "fits": False, "excess_gb": e.excess / 1e9})
                    continue
                rows.setdefault((name, gb), []).append({
                    "batch": b, "fits": True, "ms": (time.perf_counter() - t0) * 1e3,
                    "slowdown": fitted.result.step_time / plain.step_time,
                    "plain_peak_gb": max(plain.peak_memory) / 1e9, "peak_gb": max(fitted.peak_memory) / 1e9,
                    "layers": {s: len(v) for s, v in fitted.recompute.items()}})
    summary = []
    for (name, gb), recs in rows.items():
        ok = [r for r in recs if r["fits"]]
        summary.append({
            "schedule": name, "limit_gb": gb, "fits": f"{len(ok)}/{len(recs)}",
            "slowdown_mean": statistics.fmean(r["slowdown"] for r in ok) if ok else None,
            "plain_peak_gb_max": max((r["plain_peak_gb"] for r in ok), default=None),
            "peak_gb_max": max((r["peak_gb"] for r in ok), default=None),
            "layers_recomputed_mean": statistics.fmean(sum(r["layers"].values()) for r in ok) if ok else None,
            "phase3_ms_median": statistics.median(r["ms"] for r in ok) if ok else None,
            "excess_gb_max": max((r["excess_gb"] for r in recs if not r["fits"]), default=None)})
    return {"model": sq.MODEL, "profile": sq.PROFILE, "tp": TP, "pp": P, "microbatches": num_microbatches,
            "batches": num_batches, "layout": layout.describe(), "simulated_not_measured": True,
            "summary": summary, "rows": {f"{n}@{g}": r for (n, g), r in rows.items()}}


def print_table(result: dict) -> None:
    print(f"{result['model']} TP{result['tp']} PP{result['pp']} {result['profile']}, "
          f"{result['microbatches']} microbatches, {result['batches']} batches (SEMU, simulated)")
    print("| schedule | limit GB | fits | plain peak GB | peak GB | layers recomputed | step vs plain | "
          "phase 3 ms | over by GB |")
    print("|---|---|---|---|---|---|---|---|---|")

    def f(x, fmt):
        return "-" if x is None else format(x, fmt)

    for s in result["summary"]:
        print(f"| {s['schedule']} | {s['limit_gb']:g} | {s['fits']} | {f(s['plain_peak_gb_max'], '.1f')} | "
              f"{f(s['peak_gb_max'], '.1f')} | {f(s['layers_recomputed_mean'], '.1f')} | "
              f"{f(s['slowdown_mean'], '.3f')} | {f(s['phase3_ms_median'], '.0f')} | {f(s['excess_gb_max'], '.1f')} |")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batches", type=int, default=5)
    parser.add_argument("--microbatches", type=int, default=16)
    parser.add_argument("--limits", type=float, nargs="+", default=[80.0, 60.0, 40.0, 30.0, 15.0],
                        help="per-rank memory limits in GB (1e9 bytes)")
    parser.add_argument("--schedules", nargs="+", default=["gpipe", "1f1b", "zb_h1"])
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    result = run(args.batches, args.microbatches, args.limits, args.schedules)
    print_table(result)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
