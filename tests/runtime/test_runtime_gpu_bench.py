"""Smoke test of benchmarks/runtime_gpu.py on the CPU: every row is measured, and the pipelined
step trains the same model as the plain loop (same loss after a step from the same weights)."""
import torch

from tests.benchmark_loader import load_benchmark


def test_runtime_gpu_benchmark_runs_on_cpu():
    rg = load_benchmark("runtime_gpu")
    cfg = dict(vocab=64, dim=32, layers=2, heads=2, kv_heads=1, inter=64, seq=8, mb_size=1, microbatches=2)
    rows = rg.run(cfg, torch.device("cpu"), warmup=0, steps=1)
    assert set(rows) == {"plain", *rg.SCHEDULES, *(f"{s}+fused" for s in rg.SCHEDULES)}
    for key, r in rows.items():
        assert r["median_s"] > 0, key
        if key != "plain":
            assert r["instructions"] > 0
        assert abs(r["first_loss"] - rows["plain"]["first_loss"]) < 1e-4, key
