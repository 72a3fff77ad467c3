"""SEMU speed: one simulation of a 16-stage x 64-microbatch program, and candidate re-scoring with
cost reuse (the latter is measured by ``semu_reuse.py``; this script reads its result).

Prints a table and writes ``benchmarks/results/semu_speed.json``. Usage::

    python benchmarks/semu_speed.py [--reps 50]

Targets (issue #4): simulation <= 2 ms median on one CPU core; re-scoring with reuse >= 10x
faster than without. Run on one core: ``taskset -c 0 python benchmarks/semu_speed.py``.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from dipc.ir import Op, StageInfo
from dipc.passes.codegen import build_program
from dipc.semu.emulator import simulate
from dipc.semu.profiles import load_preset

RESULTS = Path(__file__).parent / "results"


def chain(num_stages: int) -> list[StageInfo]:
    return [StageInfo(id=s, rank=s, producers=(s - 1,) if s else (), grad_producers=(s - 1,) if s else (),
                      loads=("x",) if s == 0 else (), has_loss=s == num_stages - 1) for s in range(num_stages)]


def time_simulation(schedule: str, reps: int) -> dict:
    stages = chain(16)
    program = build_program(stages, 16, 64, schedule)
    cluster = load_preset("h800")
    durations = {Op.FWD: 1e-3, Op.BWD: 2e-3, Op.BWD_I: 1e-3, Op.BWD_W: 1e-3}
    cost = lambda ins: durations.get(ins.op, 0.0)
    out = {}
    for label, kwargs in (("timeline off", {"record": False}), ("timeline on", {"record": True})):
        simulate(program, cluster, cost, **kwargs)          # warm-up
        samples = []
        for _ in range(reps):
            t0 = time.perf_counter()
            simulate(program, cluster, cost, **kwargs)
            samples.append((time.perf_counter() - t0) * 1e3)
        out[label] = {"median_ms": statistics.median(samples), "p90_ms": sorted(samples)[int(0.9 * reps)]}
    out["instructions"] = sum(len(s) for s in program.streams)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--out", default=str(RESULTS / "semu_speed.json"))
    a = ap.parse_args()
    torch.set_num_threads(1)
    sims = {s: time_simulation(s, a.reps) for s in ("1f1b", "zb_h1", "dual_queue")}
    reuse_file = RESULTS / "semu_reuse.json"
    reuse = json.loads(reuse_file.read_text()) if reuse_file.exists() else None
    print("SEMU speed (CPU, one thread; 16 stages x 64 microbatches)")
    print(f"{'schedule':<12}{'instructions':>14}{'timeline off':>16}{'timeline on':>16}")
    for s, r in sims.items():
        print(f"{s:<12}{r['instructions']:>14}{r['timeline off']['median_ms']:>13.2f} ms"
              f"{r['timeline on']['median_ms']:>13.2f} ms")
    if reuse:
        print(f"re-scoring {reuse['candidates']} candidates per batch ({reuse['model']}, from semu_reuse.json): "
              f"{reuse['speedup_rescore']:.1f}x faster with reuse (target >= 10x)")
    result = {"machine": platform.processor() or platform.machine(), "device": "cpu", "simulation": sims,
              "target_ms": 2.0, "reuse": reuse}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=2))
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
