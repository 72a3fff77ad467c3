"""Smoke test of benchmarks/runtime_gpu.py on the CPU: every row is measured, and the pipelined
step trains the same model as the plain loop (same loss after a step from the same weights)."""
import importlib.util
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]


def _load():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    spec = importlib.util.spec_from_file_location("runtime_gpu", ROOT / "benchmarks" / "runtime_gpu.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_runtime_gpu_benchmark_runs_on_cpu():
    rg = _load()
    cfg = dict(vocab=64, dim=32, layers=2, heads=2, kv_heads=1, inter=64, seq=8, mb_size=1, microbatches=2)
    rows = rg.run(cfg, torch.device("cpu"), warmup=0, steps=1)
    assert set(rows) == {"plain", *rg.SCHEDULES, *(f"{s}+fused" for s in rg.SCHEDULES)}
    for key, r in rows.items():
        assert r["median_s"] > 0, key
        if key != "plain":
            assert r["instructions"] > 0
        assert abs(r["first_loss"] - rows["plain"]["first_loss"]) < 1e-4, key
