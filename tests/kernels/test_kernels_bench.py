"""Smoke test of benchmarks/kernels.py without a GPU (Triton interpreter, tiny shapes): it runs,
times every implementation, and each dipc kernel passes its check against the fp32 reference."""
import json

import pytest

from tests.benchmark_loader import load_benchmark

pytestmark = pytest.mark.triton


def test_kernels_benchmark_runs_and_checks(tmp_path, device):
    if device.type != "cpu":
        pytest.skip("the CPU smoke run; on a GPU run the benchmark itself")
    mod = load_benchmark("kernels")
    out = tmp_path / "k.json"
    assert mod.main(["--reps", "1", "--no-compile", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["on_gpu"] is False and "INTERPRETER" in result["device"]
    ops = {r["op"] for r in result["results"]}
    assert ops == {"rms_norm", "layer_norm", "swiglu", "gelu_tanh", "rope", "linear_cross_entropy"}
    for r in result["results"]:
        assert r["check"]["ok"], r
        assert r["eager"]["ms"] > 0 and r["dipc"]["ms"] > 0
