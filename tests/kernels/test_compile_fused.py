"""dipc.compile(..., fused_kernels=True) runs the layers with the Triton kernels (interpreted on
CPU) and trains the user's own parameters: pipelined fused gradients match the unfused model."""
import copy

import pytest
import torch

import dipc
from dipc.kernels import _common
from examples.data import make_example

pytestmark = pytest.mark.triton


def test_fused_pipeline_matches_unfused_reference():
    ex = make_example("vlm")
    mbs = ex.data.microbatches(2, 1)
    ref = copy.deepcopy(ex.model)
    counts = [ex.loss_weight(mb) for mb in mbs]
    for c, mb in zip(counts, mbs):
        (ref(**mb) * (c / sum(counts))).backward()
    before = dict(_common.PATH_COUNTS)
    pipe = dipc.compile(ex.model, mbs[0], num_stages=2, loss_weight=ex.loss_weight, fused_kernels=True)
    pipe.step(mbs)
    triton_runs = {k: v - before.get(k, 0) for k, v in _common.PATH_COUNTS.items()}
    assert any(v > 0 for k, v in triton_runs.items() if "triton" in str(k)), triton_runs
    assert pipe.model is not ex.model and not any(p.grad is None for p in ref.parameters() if p.requires_grad)
    for (n, p), q in zip(ex.model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-5, msg=n)


def test_fused_capture_leaves_dynamo_usable():
    """The fused ops' first call imports torch._dynamo; inside dipc's capture that happens while
    torch.fx has math.* patched, which used to poison Dynamo's rules (torch.compile then
    graph-broke on math.log). Run in a fresh process, where torch._dynamo is not yet imported."""
    import os
    import subprocess
    import sys

    code = (
        "import math, sys, torch, dipc\n"
        "from examples.data import make_example\n"
        "assert 'torch._dynamo' not in sys.modules\n"
        "ex = make_example('vlm')\n"
        "dipc.compile(ex.model, ex.data.microbatches(1, 2)[0], num_stages=2, fused_kernels=True)\n"
        "from torch._dynamo import trace_rules\n"
        "assert math.log in trace_rules.get_torch_obj_rule_map(), 'Dynamo cached a patched math.log'\n"
    )
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300,
                         cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    assert run.returncode == 0, run.stderr[-2000:]
