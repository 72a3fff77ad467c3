"""Per-microbatch recomputation in the runtime: only the microbatches the plan names re-run their
layers (counted by forward pre-hooks), gradients stay exact under plain and zero-bubble split
backwards, locally and over gloo, and stages with one choice for every microbatch are never switched."""
import pytest
import torch

from dipc.ir.recompute import layers_of, with_recompute
from dipc.runtime.recompute import RecomputableLayer, RecomputeMode, microbatch_switches
from tests.runtime.helpers import (assert_grads_equal, build, distributed_recompute_grads, independent_weights,
                                   reference_grads)

V0, L0, L1 = "vision.blocks.0", "language_model.layers.0", "language_model.layers.1"
# stage 0 (vision) recomputes only microbatch 1; stage 1 (backbone) layer 1 for all, layer 0 for mbs 0 and 2
PLAN = {(0, 1): [V0], 1: [L1], (1, 0): [L0], (1, 2): [L0]}


def _count_forwards(ex, paths):
    calls: dict[str, int] = {}
    hooks = [ex.model.get_submodule(p).register_forward_pre_hook(
        lambda m, a, p=p: calls.__setitem__(p, calls.get(p, 0) + 1)) for p in paths]
    return calls, hooks


def _calls(ex, pipe, mbs, program):
    calls, hooks = _count_forwards(ex, (V0, L0, L1))
    pipe.step(mbs, program)
    for h in hooks:
        h.remove()
    return calls


@pytest.mark.parametrize("schedule", ["1f1b", "zb_h1"])
def test_only_named_microbatches_recompute_and_gradients_are_exact(schedule):
    ex, pipe, mbs = build("vlm", torch.float64, 2, schedule, 1)
    mbs = mbs[:4]
    plain = pipe.plan(mbs)
    base = _calls(ex, pipe, mbs, plain)
    ex.model.zero_grad(set_to_none=True)
    want = reference_grads(ex.model, mbs, independent_weights(ex, mbs))
    program = with_recompute(plain, PLAN)
    got_calls = _calls(ex, pipe, mbs, program)
    got = {n: p.grad for n, p in ex.model.named_parameters() if p.grad is not None}
    assert_grads_equal(got, want, rtol=1e-9, atol=1e-12, where=f"vlm/{schedule}/per-microbatch recompute")
    # re-runs per backward graph task: stage 0 (no input grads) once; stage 1 once, twice under zb_h1
    again = 2 if schedule == "zb_h1" else 1
    assert got_calls[V0] - base[V0] == 1
    assert got_calls[L1] - base[L1] == again * len(mbs)
    assert got_calls[L0] - base[L0] == again * 2


def test_switches_cover_only_stages_whose_choice_varies():
    ex, pipe, mbs = build("vlm", torch.float64, 2, "1f1b", 1)
    mbs = mbs[:4]
    program = with_recompute(pipe.plan(mbs), {0: [V0], (1, 2): [L0]})
    switches = microbatch_switches(program, pipe.stages)
    assert set(switches) == {1}, "stage 0 recomputes every microbatch: it is never switched"
    modes = [{w.layer: mode for w, mode in per_mb} for per_mb in switches[1]]
    layer = ex.model.get_submodule(L0)
    assert [f[layer] for f in modes] == [RecomputeMode.FULL if m == 2 else RecomputeMode.OFF for m in range(len(mbs))]
    for m in range(len(mbs)):
        assert {ex.model.get_submodule(p) for p in layers_of({(1, 2): (L0,)}, 1, m)} == \
            {w.layer for w, mode in switches[1][m] if mode is not RecomputeMode.OFF}
    calls = _calls(ex, pipe, mbs, program)
    assert calls[L0] == len(mbs) + 1 and calls[V0] >= 2
    wrappers = [m for s in pipe.stages for m in s.module.modules() if isinstance(m, RecomputableLayer)]
    assert len(wrappers) == 2
    # a whole-stage program afterwards leaves every wrapper on, whatever the last FWD set
    calls = _calls(ex, pipe, mbs, with_recompute(pipe.plan(mbs), {1: [L0]}))
    assert calls[L0] == 2 * len(mbs)


@pytest.mark.dist
@pytest.mark.timeout(240)
def test_distributed_per_microbatch_recompute_is_exact():
    from dipc.runtime.launch import spawn

    per_rank = spawn(distributed_recompute_grads, 2, PLAN, 4, timeout_s=200)
    ex, pipe, mbs = build("vlm", torch.float64, 2, "zb_h1", 1)
    want = reference_grads(ex.model, mbs[:4], independent_weights(ex, mbs[:4]))
    got = {n: g for r in range(2) for n, g in per_rank[r][1].items()}
    assert_grads_equal(got, want, rtol=1e-9, atol=1e-12, where="vlm/zb_h1/distributed per-microbatch recompute")
