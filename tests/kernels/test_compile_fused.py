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
