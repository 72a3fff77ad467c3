"""Smoke test of benchmarks/schedule_quality.py: its core on 3 VLM-S batches (one per regime)."""
import importlib.util
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _load():
    spec = importlib.util.spec_from_file_location("schedule_quality", ROOT / "benchmarks" / "schedule_quality.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod   # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(mod)
    return mod


def test_schedule_quality_three_batches():
    sq = _load()
    t0 = time.perf_counter()
    result = sq.run(3)
    assert time.perf_counter() - t0 < 30
    assert result["honesty"]["simulated_not_measured"] is True
    assert {b["regime"] for b in result["batches"]} == set(sq.REGIMES)
    for b in result["batches"]:
        for name, rec in b["schedules"].items():
            assert rec["validated"], (b["index"], name, rec.get("error"))
            assert rec["step_s"] > 0 and 0 <= rec["bubble"] < 1
    summary = result["summary"]
    assert summary["1f1b"]["rel_throughput_vs_1f1b"]["mean"] == 1.0
    assert summary["dual_queue"]["rel_throughput_vs_1f1b"]["mean"] >= 1.0
    capacity = result["setup"]["memory_capacity_gb"]
    for name in ("dual_queue", "dual_queue+split", "dual_queue V=2", "dual_queue+split V=2"):
        assert summary[name]["peak_memory_gb_max"] <= capacity + 1e-6
