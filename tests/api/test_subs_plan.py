"""Planning with modality sub-microbatches through dipc.compile: random batches and sub sizes give
valid programs that round-trip through text, and DIP's SEMU-scored plan with subs trains exactly."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import dipc
from dipc.ir import dump_program, parse_program, validate
from dipc.semu.compare import plan_dip, step_model
from examples.data import make_example
from tests.runtime.helpers import assert_grads_equal, independent_weights, reference_grads

_PIPES: dict = {}


def _pipe(items_per_sub: int):
    """One compiled VLM pipeline per sub size (compiling is the slow part; planning is per batch)."""
    if items_per_sub not in _PIPES:
        ex = make_example("vlm", seed=0)
        mb = ex.data.microbatches(1, 3)[0]
        _PIPES[items_per_sub] = (ex, dipc.compile(ex.model, mb, num_stages=2, loss_weight=ex.loss_weight,
                                                  sub_microbatches={"vision": items_per_sub}))
    return _PIPES[items_per_sub]


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(items_per_sub=st.sampled_from([1, 2, 3]), seed=st.integers(0, 10_000),
       num_microbatches=st.integers(1, 4), samples=st.integers(1, 3))
def test_random_batches_plan_valid_roundtripping_programs(items_per_sub, seed, num_microbatches, samples):
    ex, pipe = _pipe(items_per_sub)
    data = type(ex.data)(ex.model.config, seed=seed)   # a fresh stream of random batches
    mbs = data.microbatches(num_microbatches, samples)
    images = [len(torch.unique(mb["image_ids"])) for mb in mbs]
    want = tuple(max(1, -(-n // items_per_sub)) for n in images)
    for schedule in ("gpipe", "1f1b", "dual_queue"):
        program = pipe.plan(mbs, schedule=schedule)
        assert program.subs == (("vision", want),)
        validate(program)
        assert parse_program(dump_program(program)) == program


def test_dip_plan_with_subs_trains_exactly():
    ex = make_example("vlm")
    ex.model.double()
    mbs = ex.data.microbatches(4, 2) + [ex.data.edge_case(ex.data.EDGE_CASES[0])]
    mbs = [{k: v.double() if v.is_floating_point() else v for k, v in mb.items()} for mb in mbs]
    pipe = dipc.compile(ex.model, mbs[0], num_stages=2, schedule="1f1b", loss_weight=ex.loss_weight,
                        sub_microbatches={"vision": 1})
    model = step_model(pipe, mbs)
    label, program, result = plan_dip(pipe, mbs, model, baselines=("1f1b", "gpipe"))
    assert program.subs == pipe.sub_counts(mbs)
    for base in ("1f1b", "gpipe"):
        assert result.step_time <= model.simulate(pipe.plan(mbs, schedule=base)).step_time + 1e-12
    want = reference_grads(ex.model, mbs, independent_weights(ex, mbs))
    pipe.step(mbs, program)
    got = {n: p.grad for n, p in ex.model.named_parameters() if n in want}
    assert_grads_equal(got, want, rtol=1e-9, atol=1e-12, where=label)
