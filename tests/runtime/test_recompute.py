"""Activation recomputation that the runtime executes: exact gradients under plain and split
backwards, the forward really re-runs (once per backward graph task), the stash really shrinks,
and a plan naming a layer the stage lacks is refused before anything runs."""
import pytest
import torch

from dipc.errors import ScheduleError
from dipc.ir.recompute import with_recompute
from dipc.runtime.recompute import RecomputableLayer, apply_recompute
from tests.runtime.helpers import (assert_grads_equal, build, distributed_recompute_grads, independent_weights,
                                   reference_grads)


def _all_layers(pipe):
    return {s.id: s.layers for s in pipe.stages}


def _count_forwards(ex, pipe):
    """Calls of every layer's forward (pre-hooks: the re-run stops early, so forward hooks may not fire)."""
    calls: dict[str, int] = {}
    hooks = [ex.model.get_submodule(p).register_forward_pre_hook(
        lambda m, a, p=p: calls.__setitem__(p, calls.get(p, 0) + 1)) for s in pipe.stages for p in s.layers]
    return calls, hooks


@pytest.mark.parametrize("schedule", ["1f1b", "zb_h1", "dual_queue"])
def test_recomputed_layers_give_reference_gradients(schedule):
    ex, pipe, mbs = build("vlm", torch.float64, 2, schedule, 1)
    want = reference_grads(ex.model, mbs, independent_weights(ex, mbs))
    program = with_recompute(pipe.plan(mbs), _all_layers(pipe))
    calls, hooks = _count_forwards(ex, pipe)
    pipe.step(mbs, program)
    for h in hooks:
        h.remove()
    got = {n: p.grad for n, p in ex.model.named_parameters() if p.grad is not None}
    assert_grads_equal(got, want, rtol=1e-9, atol=1e-12, where=f"vlm/{schedule}/recompute")
    M = len(mbs)
    # stage 0 (vision) has no input gradients: one backward graph task per microbatch either way
    assert calls["vision.blocks.0"] == 2 * M
    # the backbone stage: BWD re-runs once; the zero-bubble split re-runs in BWD_I and again in BWD_W
    assert calls["language_model.layers.0"] == (3 * M if schedule == "zb_h1" else 2 * M)


def test_a_program_without_recompute_switches_it_off_again():
    ex, pipe, mbs = build("vlm", torch.float64, 2, "1f1b", 1)
    mbs = mbs[:2]
    plain = pipe.plan(mbs)
    pipe.step(mbs, with_recompute(plain, {1: ["language_model.layers.1"]}))
    wrapped = [m for s in pipe.stages for m in s.module.modules() if isinstance(m, RecomputableLayer)]
    assert len(wrapped) == 1 and wrapped[0].enabled and wrapped[0].layer is ex.model.get_submodule(
        "language_model.layers.1")
    calls, hooks = _count_forwards(ex, pipe)
    pipe.step(mbs, plain)
    assert calls["language_model.layers.1"] == len(mbs)
    # nothing recomputes, so every layer is called directly again (no wrapper on the hot path)
    wrappers = [m for s in pipe.stages for m in s.module.modules() if isinstance(m, RecomputableLayer)]
    assert wrappers == []
    for h in hooks:
        h.remove()


def test_user_model_is_not_wrapped():
    ex, pipe, _ = build("vlm", torch.float32, 2, "1f1b", 1)
    assert not any(isinstance(m, RecomputableLayer) for m in ex.model.modules())
    assert [n for n, _ in ex.model.named_parameters()] == [n for n, _ in type(ex.model)(ex.config).named_parameters()]


def _saved_bytes(pipe, mbs, program) -> int:
    """Bytes kept for backward during one step: unique storages packed by autograd (parameters
    excluded) plus the inputs checkpointed layers hold for their re-run (checkpointing packs its
    own saves through its own hooks, which take precedence inside the layer)."""
    params = {p.untyped_storage().data_ptr() for p in pipe.model.parameters()}
    kept: dict[int, torch.UntypedStorage] = {}   # holding each storage stops its address being reused

    def note(t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            kept[storage.data_ptr()] = storage

    def pack(t):
        note(t)
        return t

    def pre(module, args):
        if module.enabled and torch.is_grad_enabled():
            for a in args:
                if isinstance(a, torch.Tensor):
                    note(a)

    apply_recompute(program, pipe.stages)   # wrap the layers the program recomputes, so they get hooks
    hooks = [m.register_forward_pre_hook(pre) for s in pipe.stages for m in s.module.modules()
             if isinstance(m, RecomputableLayer)]
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        pipe.step(mbs, program)
    for h in hooks:
        h.remove()
    return sum(st.nbytes() for st in kept.values())


def test_recomputation_shrinks_what_the_step_keeps_for_backward():
    from dipc.semu.compare import step_model
    from dipc.semu.recompute_costs import stash_bytes

    ex, pipe, mbs = build("vlm", torch.float32, 2, "1f1b", 1)
    mbs = mbs[:3]
    program = pipe.plan(mbs)
    blocks = {s.id: [p for p in s.layers if p.startswith(("vision.blocks", "language_model.layers"))]
              for s in pipe.stages}
    plain = _saved_bytes(pipe, mbs, program)
    recomputed = _saved_bytes(pipe, mbs, with_recompute(program, blocks))
    assert recomputed < 0.25 * plain, (plain, recomputed)   # measured: 14.8 MB -> 2.1 MB
    # SEMU's stash (what phase 3 plans with) predicts the measured bytes
    model = step_model(pipe, mbs)
    predicted = sum(stash_bytes(model, s.id, m, frozenset()) for s in pipe.stages for m in range(len(mbs)))
    assert predicted == pytest.approx(plain, rel=0.1), (predicted, plain)


def test_unknown_layer_in_plan_is_refused():
    ex, pipe, mbs = build("vlm", torch.float32, 2, "1f1b", 1)
    program = with_recompute(pipe.plan(mbs), {0: ["language_model.layers.0"]})
    with pytest.raises(ScheduleError, match=r"recomputes \['language_model.layers.0'\] in stage 0.*Fix:"):
        pipe.step(mbs, program)


@pytest.mark.dist
@pytest.mark.timeout(240)
def test_distributed_executor_recomputes_with_exact_gradients():
    from dipc.runtime.launch import spawn

    per_rank = spawn(distributed_recompute_grads, 2, timeout_s=200)
    ex, pipe, mbs = build("vlm", torch.float64, 2, "zb_h1", 1)
    want = reference_grads(ex.model, mbs, independent_weights(ex, mbs))
    got = {n: g for r in range(2) for n, g in per_rank[r][1].items()}
    assert_grads_equal(got, want, rtol=1e-9, atol=1e-12, where="vlm/zb_h1/distributed recompute")
