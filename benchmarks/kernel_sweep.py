"""Launch-parameter sweep of dipc's fused kernels on a GPU: forward+backward time of each kernel
under each value of the knobs in ``dipc.kernels._common.LAUNCH``, one knob at a time from the
defaults, on ``benchmarks/kernels.py``'s training-realistic shapes. It picks nothing itself: the
defaults in ``LAUNCH`` are set from its output.

    python benchmarks/kernel_sweep.py [--reps 20] [--out benchmarks/results/kernel_sweep.json]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import kernels as bench  # noqa: E402
from dipc.kernels import _common  # noqa: E402

# knob -> values tried, and the ops each knob touches
SWEEP = {
    "row_warps_max": ([4, 8, 16, 32], ["rms_norm", "layer_norm"]),
    "persistent_per_sm": ([1, 2, 4, 8, 16], ["rms_norm", "layer_norm"]),
    "ew_block": ([512, 1024, 2048, 4096, 8192], ["swiglu", "gelu_tanh"]),
    "ew_warps": ([2, 4, 8, 16], ["swiglu", "gelu_tanh"]),
    "rope_rows": ([512, 1024, 2048, 4096, 8192], ["rope"]),
    "rope_warps": ([2, 4, 8, 16], ["rope"]),
    "ce_block": ([4096, 8192, 16384, 32768], ["linear_cross_entropy"]),
    "ce_warps": ([8, 16, 32], ["linear_cross_entropy"]),
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "kernel_sweep.json"))
    a = ap.parse_args()
    if not torch.cuda.is_available() or _common.INTERPRET:
        print("kernel_sweep: needs a GPU (launch parameters do nothing under the Triton interpreter)")
        return 1
    device, dtype = torch.device("cuda"), torch.bfloat16
    cases = {c["op"]: c for c in bench._cases(bench.GPU_SHAPES, device, dtype)}
    defaults = dict(_common.LAUNCH)
    rows = []
    print(f"# dipc kernel launch sweep on {torch.cuda.get_device_name()}, defaults {defaults}")
    for knob, (values, ops) in SWEEP.items():
        for value in values:
            _common.LAUNCH.update(defaults)
            _common.LAUNCH[knob] = value
            for op in ops:
                ms = bench._measure_together({op: cases[op]["dipc"]}, cases[op]["inputs"], device, a.reps)[op]["ms"]
                rows.append({"knob": knob, "value": value, "op": op, "ms": ms, "default": value == defaults[knob]})
                print(f"{knob}={value:<6} {op:<22} {ms:8.3f} ms{'  (default)' if value == defaults[knob] else ''}",
                      flush=True)
    _common.LAUNCH.update(defaults)
    best = {}
    for r in rows:
        key = (r["knob"], r["op"])
        if key not in best or r["ms"] < best[key]["ms"]:
            best[key] = r
    print("| knob | op | default ms | best value | best ms |")
    print("|---|---|---|---|---|")
    for (knob, op), r in best.items():
        d = next(x["ms"] for x in rows if x["knob"] == knob and x["op"] == op and x["default"])
        print(f"| {knob} | {op} | {d:.3f} | {r['value']} | {r['ms']:.3f} |")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                                       "defaults": defaults, "reps": a.reps, "rows": rows}, indent=2) + "\n")
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
