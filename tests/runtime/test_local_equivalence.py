"""Pipelined gradients equal the single-process reference, for every example model x schedule x
2 and 4 stages, on batches with varied modality mixes (incl. no images, one huge image)."""
import pytest
import torch

from dipc.ir import parse_program, dump_program
from examples.data import EXAMPLE_NAMES
from tests.runtime.helpers import SCHEDULES, assert_grads_equal, build, independent_weights, reference_grads


@pytest.mark.parametrize("stages", [2, 4])
@pytest.mark.parametrize("schedule,chunks", SCHEDULES)
@pytest.mark.parametrize("name", EXAMPLE_NAMES)
def test_float64_gradients_equal_reference(name, schedule, chunks, stages):
    ex, pipe, mbs = build(name, torch.float64, stages, schedule, chunks)
    weights = independent_weights(ex, mbs)
    assert pipe.loss_weights(mbs) == pytest.approx(weights, rel=1e-15)
    want = reference_grads(ex.model, mbs, weights)
    program = pipe.plan(mbs)
    assert parse_program(dump_program(program)) == program
    result = pipe.step(mbs, program)
    got = {n: p.grad for n, p in ex.model.named_parameters() if p.grad is not None}
    assert_grads_equal(got, want, rtol=1e-9, atol=1e-12, where=f"{name}/{schedule}/{stages}")
    with torch.no_grad():
        ref_loss = sum(w * float(ex.model(**mb)) for w, mb in zip(weights, mbs))
    assert result.loss == pytest.approx(ref_loss, rel=1e-12)


# float32: pipelined and reference runs do the same ops per stage, but reduction order differs
# where a stage boundary cuts a sum (grads accumulate per microbatch instead of in one graph),
# so allow float32 round-off: rtol 1e-4, atol 1e-6.
@pytest.mark.parametrize("name", EXAMPLE_NAMES)
def test_float32_gradients_within_tolerance(name):
    ex, pipe, mbs = build(name, torch.float32, 2, "1f1b", 1)
    want = reference_grads(ex.model, mbs, independent_weights(ex, mbs))
    pipe.step(mbs)
    got = {n: p.grad for n, p in ex.model.named_parameters() if p.grad is not None}
    assert_grads_equal(got, want, rtol=1e-4, atol=1e-6, where=f"{name}/f32")


def test_vision_and_backbone_get_their_own_segments():
    ex, pipe, _ = build("vlm", torch.float32, 4, "1f1b", 1)
    mods = [s.modality for s in pipe.stages]
    assert mods[0] == "vision" and mods[-1] == "backbone"
    assert mods == sorted(mods, key=lambda m: m != "vision"), "segments must be contiguous"
    for s in pipe.stages:
        owners = {p.split(".")[0] for p in s.layers}
        assert not ({"vision", "projector"} & owners and {"language_model", "lm_head"} & owners)


def test_optimizer_step_trains():
    import dipc

    ex, pipe, mbs = build("vlm", torch.float32, 2, "1f1b", 1)
    grads = reference_grads(ex.model, mbs, pipe.loss_weights(mbs))
    # attention key biases get a zero gradient (softmax is shift-invariant), up to float32 round-off
    should_move = {n for n, g in grads.items() if g.abs().max() > 1e-6}
    pipe = dipc.compile(ex.model, mbs[0], num_stages=2, loss_weight=ex.loss_weight,
                        optimizer=lambda ps: torch.optim.SGD(ps, lr=0.5))
    before = {n: p.detach().clone() for n, p in ex.model.named_parameters()}
    losses = [pipe.step(mbs).loss for _ in range(3)]
    assert losses[-1] < losses[0]
    moved = {n for n, p in ex.model.named_parameters() if not torch.equal(before[n], p)}
    assert should_move <= moved and len(should_move) > 0.9 * len(before)
    assert all(p.grad is None for p in ex.model.parameters()), "optimizer step zeroes grads"
