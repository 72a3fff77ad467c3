"""How long ``dipc.compile(..., schedule="dip")`` takes to plan a batch of the example models.

Per model: ``--batches`` skewed batches of ``--microbatches`` microbatches; each batch is planned
once to warm its message shapes (shape inference is timed apart: it is paid once per new batch
layout), the plan cache is cleared, and the batch is planned again, timed. Scored on a fixed
preset (``--profile``, default h800) so the plans are deterministic and no calibration runs.
Prints median and p90 per model and writes the plans' simulated step times beside the timings,
so two versions of the planner can be checked to choose the same plans
(``python benchmarks/plan_latency.py --out /tmp/a.json`` on each, then compare ``steps_s``)."""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import dipc  # noqa: E402
from dipc.semu.compare import step_model  # noqa: E402
from examples.data import make_example  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "plan_latency.json"


def measure(name: str, batches: int, microbatches: int, profile: str) -> dict:
    torch.manual_seed(0)
    ex = make_example(name, seed=0)
    pipe = dipc.compile(ex.model, ex.data.microbatches(1, 2)[0], num_stages=2, schedule="dip",
                        loss_weight=ex.loss_weight, profile=profile)
    times, steps = [], []
    for _ in range(batches):
        mbs = ex.data.microbatches(microbatches, 2)
        pipe.plan(mbs)            # message shapes of this batch: inferred once, outside the timing
        pipe._programs.clear()
        t0 = time.perf_counter()
        program = pipe.plan(mbs)
        times.append(time.perf_counter() - t0)
        steps.append(step_model(pipe, mbs, profile, runtime=True).simulate(program).step_time)
    ms = [t * 1e3 for t in times]
    p90 = sorted(ms)[max(0, math.ceil(0.9 * len(ms)) - 1)]   # nearest rank
    return {"median_ms": statistics.median(ms), "p90_ms": p90, "plan_ms": ms,
            "steps_s": steps}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="vlm,audio_llm,t2v")
    ap.add_argument("--batches", type=int, default=12)
    ap.add_argument("--microbatches", type=int, default=4)
    ap.add_argument("--profile", default="h800")
    ap.add_argument("--out", type=Path, default=RESULTS)
    a = ap.parse_args()
    out = {"profile": a.profile, "batches": a.batches, "microbatches": a.microbatches, "models": {}}
    print(f"{'model':10s} {'plan ms median':>15s} {'p90':>8s}")
    for name in a.models.split(","):
        r = out["models"][name] = measure(name, a.batches, a.microbatches, a.profile)
        print(f"{name:10s} {r['median_ms']:15.1f} {r['p90_ms']:8.1f}")
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
