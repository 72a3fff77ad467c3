"""Smoke test of benchmarks/plan_latency.py: it times real DIP plans and records their steps."""
from tests.benchmark_loader import load_benchmark


def test_plan_latency_times_dip_plans_of_an_example_model():
    bench = load_benchmark("plan_latency")
    r = bench.measure("vlm", batches=2, microbatches=3, profile="h800")
    assert len(r["plan_ms"]) == len(r["steps_s"]) == 2
    assert all(t > 0 for t in r["plan_ms"]) and all(s > 0 for s in r["steps_s"])
    assert min(r["plan_ms"]) <= r["median_ms"] <= r["p90_ms"] == max(r["plan_ms"])
