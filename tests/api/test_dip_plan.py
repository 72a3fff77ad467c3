"""DIP's per-batch plan (phase 2 candidates scored by SEMU) on the example models: it is valid,
trains with exact gradients, and is never slower on SEMU than the baselines it was compared with."""

import pytest
import torch

import dipc
from dipc.errors import PartitionError
from dipc.semu.compare import plan_dip, step_model
from examples.data import make_example
from tests.runtime.helpers import assert_grads_equal, independent_weights, reference_grads


@pytest.mark.parametrize("name", ["vlm", "t2v"])
def test_dip_plan_beats_or_ties_baselines_and_trains_exactly(name):
    ex = make_example(name)
    ex.model.double()
    mbs = ex.data.microbatches(4, 2) + [ex.data.edge_case(ex.data.EDGE_CASES[0])]
    mbs = [{k: v.double() if v.is_floating_point() else v for k, v in mb.items()} for mb in mbs]
    pipe = dipc.compile(ex.model, mbs[0], num_stages=2, chunks=2, schedule="interleaved_1f1b",
                        loss_weight=ex.loss_weight, segments="spread")
    assert [s.modality for s in pipe.stages][:2] != ["backbone", "backbone"]
    model = step_model(pipe, mbs)
    label, program, result = plan_dip(pipe, mbs, model, baselines=("interleaved_1f1b", "gpipe"))
    for base in ("interleaved_1f1b", "gpipe"):
        assert result.step_time <= model.simulate(pipe.plan(mbs, schedule=base)).step_time + 1e-12
    want = reference_grads(ex.model, mbs, independent_weights(ex, mbs))
    pipe.step(mbs, program)
    got = {n: p.grad for n, p in ex.model.named_parameters() if n in want}
    assert_grads_equal(got, want, rtol=1e-9, atol=1e-12, where=label)


def test_segments_spread_and_explicit():
    ex = make_example("vlm")
    mb = ex.data.microbatches(1, 2)[0]
    pipe = dipc.compile(ex.model, mb, num_stages=2, chunks=2, schedule="gpipe", segments={"vision": 1, "backbone": 3})
    assert [s.modality for s in pipe.stages] == ["vision", "backbone", "backbone", "backbone"]
    with pytest.raises(PartitionError, match=r"segments=.*Fix:"):
        dipc.compile(ex.model, mb, num_stages=2, chunks=2, schedule="gpipe", segments={"vision": 1})
