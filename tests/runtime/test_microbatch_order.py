"""Programs that run the caller's microbatches in another order (``Program.microbatch_order``):
the IR carries the order through its text and JSON forms and the validator; every executor runs
slot m on the caller's microbatch ``order[m]``, with gradients equal to the single-process
reference and per-microbatch losses reported in the caller's order; DIP's planner reorders a
batch lightest first only where SEMU says that pays."""
import dataclasses
import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dipc.errors import BatchError, IRParseError, ScheduleError
from dipc.semu.step_model import StepModelError
from dipc.ir import dump_program, parse_program
from dipc.ir.jsonio import dumps, loads
from dipc.ir.validate import validate
from dipc.semu.compare import REORDER_MARGIN, lightest_first, plan_dip, step_model
from tests.api.test_dip_plan_properties import _batch, _example, _pipe
from tests.runtime.helpers import (assert_grads_equal, build, independent_weights, reference_grads,
                                   step_matches_reference)


def _reordered_program(pipe, mbs, order, schedule: str):
    """``schedule``'s program for the microbatches in ``order``, carrying that order."""
    program = pipe.plan([mbs[i] for i in order], schedule=schedule)
    return dataclasses.replace(program, microbatch_order=tuple(order))


def _per_microbatch_losses(model, mbs) -> list[float]:
    with torch.no_grad():
        return [float(model(**mb)) for mb in mbs]


def test_order_round_trips_through_text_and_json_and_is_validated():
    _, pipe, mbs = build("vlm", torch.float32, 2, "1f1b", 1)
    program = _reordered_program(pipe, mbs, [2, 0, 1] + list(range(3, len(mbs))), "1f1b")
    text = dump_program(program)
    assert "order microbatches=2,0,1," in text
    assert parse_program(text) == program
    assert loads(dumps(program)) == program
    validate(program)
    bad = dataclasses.replace(program, microbatch_order=(0, 0) + program.microbatch_order[2:])
    with pytest.raises(ScheduleError, match="not a permutation"):
        validate(bad)
    with pytest.raises(IRParseError, match="order microbatches="):
        parse_program(text.replace("order microbatches=", "order slots="))


def test_ordered_and_unordered_are_inverse():
    from dipc.ir import Program

    p = Program(schedule="x", num_ranks=1, num_microbatches=4, stages=(), streams=((),), microbatch_order=(2, 0, 3, 1))
    assert p.ordered("abcd") == ["c", "a", "d", "b"]
    assert p.unordered(p.ordered("abcd")) == list("abcd")
    assert Program(schedule="x", num_ranks=1, num_microbatches=2, stages=(), streams=((),)).ordered("ab") == ["a", "b"]


@settings(max_examples=6, deadline=None)
@given(name=st.sampled_from(["vlm", "audio_llm", "t2v"]), schedule=st.sampled_from(["1f1b", "zb_h1", "gpipe"]),
       seed=st.integers(0, 10_000))
def test_local_step_with_an_order_matches_reference(name, schedule, seed):
    ex, pipe, mbs = build(name, torch.float64, 2, schedule, 1)
    order = list(range(len(mbs)))
    random.Random(seed).shuffle(order)
    program = _reordered_program(pipe, mbs, order, schedule)
    weights = independent_weights(ex, mbs)
    result = step_matches_reference(ex, pipe, mbs, program, where=f"{name}/{schedule}/order {order}")
    # per-microbatch losses come back in the caller's order, not the program's
    assert result.microbatch_losses == pytest.approx(_per_microbatch_losses(ex.model, mbs), rel=1e-12)
    assert result.loss == pytest.approx(sum(w * l for w, l in zip(weights, result.microbatch_losses)), rel=1e-12)


def test_a_program_for_another_batch_is_refused():
    _, pipe, mbs = build("vlm", torch.float32, 2, "1f1b", 1)
    program = _reordered_program(pipe, mbs, list(reversed(range(len(mbs)))), "1f1b")
    with pytest.raises(BatchError, match="microbatches"):
        pipe.step(mbs[:-1], program)


def _gloo_rank(rank: int, world: int, text: str, order: list[int]) -> tuple:
    from dipc.runtime.distributed import run_step_distributed

    ex, pipe, mbs = build("t2v", torch.float64, world, "1f1b", 1)
    result = run_step_distributed(pipe, mbs, parse_program(text), timeout_s=90)
    owned = {id(p) for p in pipe.rank_parameters(rank)}
    return result.loss, result.microbatch_losses, {n: p.grad for n, p in ex.model.named_parameters()
                                                  if id(p) in owned and p.grad is not None}


@pytest.mark.dist
@pytest.mark.timeout(300)
def test_gloo_step_with_an_order_matches_reference():
    from dipc.runtime.launch import spawn

    ex, pipe, mbs = build("t2v", torch.float64, 2, "1f1b", 1)
    order = list(reversed(range(len(mbs))))
    program = _reordered_program(pipe, mbs, order, "1f1b")
    per_rank = spawn(_gloo_rank, 2, dump_program(program), order, timeout_s=240)
    weights = independent_weights(ex, mbs)
    want = reference_grads(ex.model, mbs, weights)
    losses = _per_microbatch_losses(ex.model, mbs)
    got = {}
    for loss, mb_losses, grads in per_rank:
        assert mb_losses == pytest.approx(losses, rel=1e-12)
        assert loss == pytest.approx(sum(w * l for w, l in zip(weights, losses)), rel=1e-12)
        got.update(grads)
    assert_grads_equal(got, want, rtol=1e-9, atol=1e-12, where="t2v/1f1b/gloo/reversed")


def test_dip_reorders_a_skewed_batch_only_when_it_pays():
    """A T2V batch whose heavy microbatch comes first: DIP plans it lightest first, SEMU's step
    at least REORDER_MARGIN shorter than the best plan in the given order, and the step runs with
    exact gradients; a batch already lightest first keeps its order."""
    ex = _example("t2v")
    mbs = _batch(ex, 1, [3, 1, 2, 1])
    pipe = _pipe(ex, "t2v", mbs[0], None)
    model = step_model(pipe, mbs)
    order = lightest_first(pipe, model, len(mbs))
    assert order is not None and order[-1] == 0
    label, program, result = plan_dip(pipe, mbs, model, baselines=("interleaved_1f1b",))
    _, in_order, kept = plan_dip(pipe, mbs, model, baselines=("interleaved_1f1b",), reorder=False)
    assert program.microbatch_order == tuple(order) and label.endswith("lightest first")
    assert not in_order.microbatch_order
    assert result.step_time <= (1 - REORDER_MARGIN) * kept.step_time
    # a new model of the batch as given scores the plan on the plan's own slots (StepModel.for_program)
    fresh = step_model(pipe, mbs)
    assert fresh.simulate(program).step_time == pytest.approx(result.step_time, rel=1e-12)
    assert fresh.for_program(program).microbatch_stats == step_model(pipe, program.ordered(mbs)).microbatch_stats
    with pytest.raises(StepModelError, match="in order"):
        fresh.reordered(list(reversed(range(len(mbs))))).simulate(program)
    step_matches_reference(ex, pipe, mbs, program, where=f"t2v/{label}")

    light = [mbs[i] for i in order]
    label, program, _ = plan_dip(pipe, light, step_model(pipe, light), baselines=("interleaved_1f1b",))
    assert not program.microbatch_order and not label.endswith("lightest first")
