"""SEMU cost reuse: spatial (one trace + one function per distinct layer) and temporal (evaluated
costs cached by (layer signature, length bucket)) on a paper-scale model built on the meta device.

Prints a table and writes ``benchmarks/results/semu_reuse.json``. Usage::

    python benchmarks/semu_reuse.py [--model vlm_m] [--candidates 1000] [--batches 4]

Scenario: re-scoring ``--candidates`` schedule candidates for each of ``--batches`` new batches;
every candidate cuts the batch's images into sub-microbatches differently (drawn from a small set
of partitions, as a search revisits the same splits) and needs every layer's cost for each.
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from pathlib import Path

from dipc.passes.capture import capture
from dipc.semu.costs import LengthStats, layer_cost_model
from dipc.semu.models import paper_example_batch, build_paper_model


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="vlm_m")
    ap.add_argument("--candidates", type=int, default=1000)
    ap.add_argument("--batches", type=int, default=4)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "semu_reuse.json"))
    a = ap.parse_args()

    captured = capture(build_paper_model(a.model), paper_example_batch(a.model))
    t0 = time.perf_counter()
    reuse = layer_cost_model(captured)
    build_reuse = time.perf_counter() - t0
    t0 = time.perf_counter()
    plain = layer_cost_model(captured, reuse=False, annotate=False)
    build_plain = time.perf_counter() - t0

    rng = random.Random(0)
    layers = captured.layers
    vision = [p for p in layers if p.startswith("vision") or p == "projector"]
    text = [p for p in layers if p not in set(vision)]
    times = {"no reuse": [], "spatial+temporal": []}
    totals = {"no reuse": 0.0, "spatial+temporal": 0.0}
    for b in range(a.batches):
        num_images = rng.randint(8, 48)
        splits = [sorted(rng.sample(range(1, num_images), k=rng.randint(1, 3))) for _ in range(32)]
        cands = [rng.choice(splits) for _ in range(a.candidates)]
        for label in times:
            t0 = time.perf_counter()
            total = 0.0
            for cuts in cands:
                bounds = [0, *cuts, num_images]
                for lo, hi in zip(bounds, bounds[1:]):
                    vis = LengthStats.of([169] * (hi - lo))
                    txt = LengthStats.padded(1, min(8192, 169 * (hi - lo) + 512))
                    if label == "no reuse":     # every layer evaluated on its own, every time
                        total += sum(plain.cost_uncached(p, vis).fwd_flops for p in vision)
                        total += sum(plain.cost_uncached(p, txt).fwd_flops for p in text)
                    else:                       # one evaluation per distinct layer, cached per stats
                        total += reuse.cost_sum(vision, vis).fwd_flops + reuse.cost_sum(text, txt).fwd_flops
            times[label].append(time.perf_counter() - t0)
            totals[label] += total
    assert abs(totals["no reuse"] - totals["spatial+temporal"]) <= 1e-9 * totals["no reuse"], totals
    med = {k: statistics.median(v) for k, v in times.items()}
    result = {
        "model": a.model, "num_layers": len(layers), "candidates": a.candidates, "batches": a.batches,
        "build_s": {"no reuse": build_plain, "spatial": build_reuse},
        "traces": {"no reuse": plain.num_traced, "spatial": reuse.num_traced},
        "rescore_median_s": med,
        "speedup_build": build_plain / build_reuse,
        "speedup_rescore": med["no reuse"] / med["spatial+temporal"],
        "cache": {"hits": reuse.hits, "misses": reuse.misses},
    }
    print(f"{'':28s} {'no reuse':>12s} {'reuse':>12s} {'speed-up':>9s}")
    print(f"{'traces':28s} {plain.num_traced:12d} {reuse.num_traced:12d} "
          f"{plain.num_traced / reuse.num_traced:8.1f}x")
    print(f"{'build (s)':28s} {build_plain:12.2f} {build_reuse:12.2f} {result['speedup_build']:8.1f}x")
    print(f"{'re-score 1 batch (s)':28s} {med['no reuse']:12.3f} {med['spatial+temporal']:12.3f} "
          f"{result['speedup_rescore']:8.1f}x")
    print(f"cache hits {reuse.hits}, misses {reuse.misses}; {len(layers)} layers, {a.candidates} candidates x "
          f"{a.batches} batches")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
