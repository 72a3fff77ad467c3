"""Phase 3 through the API: ``pipe.plan(..., memory_limit=)`` returns a program whose recompute
choice fits SEMU's memory, costs SEMU time, and trains with exact gradients; DIP's per-batch plan
honours the limit; a limit nothing fits is a clear error."""
import pytest
import torch

import dipc

from dipc.errors import InfeasibleMemoryError
from dipc.ir import dump_program, parse_program
from dipc.ir.recompute import recompute_plan, with_recompute
from dipc.runtime.measure import measured_peak_memory
from dipc.semu.compare import plan_dip, step_model
from dipc.semu.profile_machine import default_profile
from examples.data import make_example
from tests.runtime.helpers import assert_grads_equal, build, independent_weights, reference_grads


@pytest.fixture(scope="module")
def zb():
    ex, pipe, mbs = build("vlm", torch.float64, 2, "zb_h1", 1)
    return ex, pipe, mbs[:4]


def test_semu_charges_reruns_and_shrinks_stashes(zb):
    ex, pipe, mbs = zb
    model = step_model(pipe, mbs)
    program = pipe.plan(mbs)
    everything = with_recompute(program, {s.id: s.layers for s in pipe.stages})
    plain, rec = model.simulate(program), model.simulate(everything)
    assert all(b < a for a, b in zip(plain.peak_memory, rec.peak_memory))
    assert rec.step_time > plain.step_time
    fwd = {(s.id, m): model.stage_time(s.id, m).fwd for s in pipe.stages for m in range(len(mbs))}
    busy_added = [b - a for a, b in zip(plain.busy, rec.busy)]
    # rank 1 (a stage with input grads) re-runs in BWD_I and BWD_W; rank 0 only in BWD_W
    per_rank = [sum(fwd[(s.id, m)] for s in pipe.stages if s.rank == r for m in range(len(mbs))) for r in (0, 1)]
    assert busy_added[0] == pytest.approx(per_rank[0], rel=1e-6)
    assert busy_added[1] == pytest.approx(2 * per_rank[1], rel=1e-6)


def test_plan_with_memory_limit_fits_and_trains_exactly(zb):
    ex, pipe, mbs = zb
    model = step_model(pipe, mbs)
    base = model.simulate(pipe.plan(mbs)).peak_memory
    frugal = model.simulate(with_recompute(pipe.plan(mbs), {s.id: s.layers for s in pipe.stages})).peak_memory
    limit = max(f + 0.5 * (b - f) for b, f in zip(base, frugal))
    program = pipe.plan(mbs, memory_limit=limit, profile="h800")   # the model's profile
    plan = recompute_plan(program)
    assert plan, "the limit is below the plain peak, so something must be recomputed"
    assert parse_program(dump_program(program)) == program
    fitted = model.simulate(program)
    assert max(fitted.peak_memory) <= limit
    assert fitted.step_time > model.simulate(pipe.plan(mbs)).step_time
    want = reference_grads(ex.model, mbs, independent_weights(ex, mbs))
    ex.model.zero_grad(set_to_none=True)
    pipe.step(mbs, program)
    got = {n: p.grad for n, p in ex.model.named_parameters() if p.grad is not None}
    assert_grads_equal(got, want, rtol=1e-9, atol=1e-12, where="vlm/zb_h1/memory_limit")


def test_dip_plan_honours_the_limit(zb):
    ex, pipe, mbs = zb
    model = step_model(pipe, mbs)
    base = model.simulate(pipe.plan(mbs, schedule="1f1b"))
    limit = 0.8 * max(base.peak_memory)
    label, program, result = plan_dip(pipe, mbs, model, baselines=("1f1b",), memory_limit=limit)
    assert max(result.peak_memory) <= limit
    assert model.simulate(program).step_time == pytest.approx(result.step_time)
    fitted_1f1b = pipe.plan(mbs, schedule="1f1b", memory_limit=limit, profile="h800")
    assert result.step_time <= model.simulate(fitted_1f1b).step_time + 1e-12


def test_limit_below_parameters_is_infeasible(zb):
    ex, pipe, mbs = zb
    with pytest.raises(InfeasibleMemoryError, match=r"rank \d: needs .* over its .* limit.*Fix: .*more pipeline "
                                                     r"ranks.*smaller microbatches.*raise memory_limit"):
        pipe.plan(mbs, memory_limit=2**20)
    with pytest.raises(InfeasibleMemoryError):
        plan_dip(pipe, mbs, step_model(pipe, mbs), baselines=("1f1b",), memory_limit=2**20)


def test_dip_plan_without_baselines_that_cannot_fit_says_so(zb):
    ex, pipe, mbs = zb
    with pytest.raises(InfeasibleMemoryError, match=r"Fix:"):
        plan_dip(pipe, mbs, step_model(pipe, mbs), memory_limit=2**20)


def test_default_profile_fits_what_this_cpu_measures():
    """No profile named: a CPU pipeline is fitted on this machine's profile, so the limit holds in
    the tensors the step really allocates. The H800 preset (the default before) does not charge
    the CPU's dense attention mask and predicts rank 0 far below its measured peak."""
    torch.manual_seed(0)
    ex = make_example("vlm", seed=0)
    mbs = ex.data.microbatches(4, 4)
    pipe = dipc.compile(ex.model, mbs[0], num_stages=2, schedule="1f1b", loss_weight=ex.loss_weight,
                        optimizer=lambda ps: torch.optim.Adam(ps, lr=1e-4))   # SEMU counts Adam's states
    plain = pipe.plan(mbs)
    pipe.step(mbs, plain)                   # creates the optimizer states the peaks include
    model = step_model(pipe, mbs, default_profile("cpu"))
    base = model.simulate(plain).peak_memory
    frugal = model.simulate(with_recompute(plain, {s.id: s.layers for s in pipe.stages})).peak_memory
    limits = [f + 0.5 * (b - f) for b, f in zip(base, frugal)]
    program = pipe.plan(mbs, memory_limit=limits)
    assert recompute_plan(program)
    measured = measured_peak_memory(pipe, mbs, program)
    assert all(m <= 1.05 * lim for m, lim in zip(measured, limits)), (measured, limits)
    h800 = step_model(pipe, mbs, "h800").simulate(plain).peak_memory
    assert h800[0] < 0.8 * measured_peak_memory(pipe, mbs, plain)[0]
