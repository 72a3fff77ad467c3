"""Selective recomputation (``<layer>~sel``) in the runtime: exact gradients next to full and no
recomputation under 1F1B and the zero-bubble split, locally and over gloo; the stash of one layer
lies strictly between full and none (exactly the kept ops' outputs); the backward re-runs the
cheap ops and no matmul; and a selective layer the split backward would re-run twice is refused
before the step, naming the unit and the fix."""
from collections import Counter

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from dipc.errors import ScheduleError
from dipc.ir.recompute import SELECTIVE_SAVED_OPS, selective, with_recompute
from dipc.runtime.measure import LiveMemory
from dipc.runtime.recompute import RecomputableLayer, RecomputeMode, apply_recompute
from dipc.runtime.split_backward import backward_input, backward_weight
from examples.models.layers import LlamaBlock, RotaryEmbedding
from tests.runtime.helpers import (assert_grads_equal, build, distributed_recompute_grads, independent_weights,
                                   reference_grads)

V0, V1, V2 = "vision.blocks.0", "vision.blocks.1", "vision.blocks.2"
L0, L1, L2 = "language_model.layers.0", "language_model.layers.1", "language_model.layers.2"


def _count_forwards(ex, paths):
    """Calls of each layer's forward (pre-hooks: a re-run may stop early, so forward hooks may not fire)."""
    calls: dict[str, int] = {}
    hooks = [ex.model.get_submodule(p).register_forward_pre_hook(
        lambda m, a, p=p: calls.__setitem__(p, calls.get(p, 0) + 1)) for p in paths]
    return calls, hooks


def _step_against_reference(schedule, plan, num_microbatches=None):
    """One float64 step of the example VLM recomputing ``plan``: its gradients against the
    single-process reference, and every named layer's forward calls."""
    ex, pipe, mbs = build("vlm", torch.float64, 2, schedule, 1)
    mbs = mbs[:num_microbatches]
    want = reference_grads(ex.model, mbs, independent_weights(ex, mbs))
    program = with_recompute(pipe.plan(mbs), plan)   # planning runs the stages once (shapes): before the hooks
    calls, hooks = _count_forwards(ex, (V0, V1, V2, L0, L1, L2))
    pipe.step(mbs, program)
    for h in hooks:
        h.remove()
    got = {n: p.grad for n, p in ex.model.named_parameters() if p.grad is not None}
    assert_grads_equal(got, want, rtol=1e-9, atol=1e-12, where=f"vlm/{schedule}/selective recompute {plan}")
    modes = {w.layer: w.mode for s in pipe.stages for w in s.module.modules() if isinstance(w, RecomputableLayer)}
    return calls, len(mbs), {p: modes.get(ex.model.get_submodule(p)) for p in (V0, V1, V2, L0, L1, L2)}


def test_selective_full_and_none_mixed_give_reference_gradients_under_1f1b():
    plan = {0: [selective(V0), V1], 1: [selective(L0), L1], (1, 2): [selective(L2)]}   # V2 and L2 elsewhere: none
    calls, M, modes = _step_against_reference("1f1b", plan)
    S, F = RecomputeMode.SELECTIVE, RecomputeMode.FULL
    # L2 switches per microbatch: the last FWD (mb 4) left it off; V2 is never wrapped
    assert modes == {V0: S, V1: F, V2: None, L0: S, L1: F, L2: RecomputeMode.OFF}
    # a selective layer's forward runs again in the backward, like a full one; the others run once
    assert calls[V0] == calls[V1] == calls[L0] == calls[L1] == 2 * M
    assert calls[V2] == M and calls[L2] == M + 1


def test_selective_layers_under_the_zero_bubble_split_give_reference_gradients():
    # stage 0 (vision) takes no input gradients: its whole backward is BWD_W, one graph task, so it
    # may recompute selectively; stage 1 recomputes fully. V2 switches mode per microbatch.
    plan = {0: [selective(V0)], (0, 1): [V1], (0, 0): [selective(V2)], (0, 2): [V2], 1: [L1], (1, 0): [L0]}
    calls, M, _ = _step_against_reference("zb_h1", plan, 4)
    assert calls[V0] == 2 * M and calls[V1] == M + 1 and calls[V2] == M + 2
    assert calls[L1] == 3 * M and calls[L0] == M + 2   # BWD_I and BWD_W each re-run a full layer


def test_split_backward_refuses_a_selective_layer_of_a_stage_with_input_grads_before_the_step():
    ex, pipe, mbs = build("vlm", torch.float64, 2, "zb_h1", 1)
    mbs = mbs[:3]
    program = with_recompute(pipe.plan(mbs), {0: [selective(V0)], (1, 1): [L0, selective(L1)]})
    calls, hooks = _count_forwards(ex, (V0, L0, L1))
    with pytest.raises(ScheduleError, match=rf"layer '{L1}' of stage 1, microbatch 1 selectively .*BWD_I and BWD_W"
                                            rf".*Fix: recompute it fully \('{L1}' without ~sel\)"):
        pipe.step(mbs, program)
    for h in hooks:
        h.remove()
    assert calls == {} and all(p.grad is None for p in ex.model.parameters()), "refused before anything ran"
    # the same plan under a plain backward runs
    ex, pipe, mbs = build("vlm", torch.float64, 2, "1f1b", 1)
    apply_recompute(with_recompute(pipe.plan(mbs[:3]), {(1, 1): [L0, selective(L1)]}), pipe.stages)


def test_torch_selective_checkpointing_serves_one_backward_only():
    """Why the split backward refuses selective layers: BWD_I then a rewalking BWD_W over a
    selective region raises mid-backward, where a full one re-runs twice. If torch lifts this, the
    refusal in apply_recompute can go."""
    torch.manual_seed(0)
    layer = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 8)).double()
    for mode in (RecomputeMode.FULL, RecomputeMode.SELECTIVE):
        x = torch.randn(4, 8, dtype=torch.float64, requires_grad=True)
        y = RecomputableLayer(layer, mode)(x)
        _, work = backward_input([y], [torch.ones_like(y)], [x], list(layer.parameters()), rewalk=True)
        if mode is RecomputeMode.FULL:
            backward_weight(work)
        else:
            with pytest.raises(RuntimeError, match="backward an extra time"):
                backward_weight(work)


# -- one layer: what selective keeps and what it re-runs -------------------------------------------

class _OpCounts(TorchDispatchMode):
    """Calls per aten overload packet, and the bytes of the outputs of :data:`SELECTIVE_SAVED_OPS`."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: Counter[str] = Counter()
        self.kept_bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        self.calls[name] += 1
        if name in SELECTIVE_SAVED_OPS:
            outs = out if isinstance(out, (tuple, list)) else (out,)
            self.kept_bytes += sum(t.untyped_storage().nbytes() for t in outs if isinstance(t, torch.Tensor))
        return out


def _llama_block_step(mode: RecomputeMode) -> tuple[float, _OpCounts, _OpCounts]:
    """Bytes one LLaMA block keeps from forward to backward (live bytes its forward created, less
    its output) in ``mode``, and the ops its forward and its backward ran."""
    torch.manual_seed(0)
    block = LlamaBlock(64, 4, 2, 128)
    cos, sin = RotaryEmbedding(16)(torch.arange(32))
    x = torch.randn(2, 32, 64, requires_grad=True)
    layer = RecomputableLayer(block, mode)
    memory, fwd = LiveMemory(1), _OpCounts()
    with memory, fwd:
        y = layer(x, cos, sin)
    stash = memory.live[0] - y.untyped_storage().nbytes()
    bwd = _OpCounts()
    with bwd:
        y.sum().backward()
    return stash, fwd, bwd


def test_selective_stash_lies_between_full_and_none_and_is_the_kept_ops_outputs():
    none, fwd, _ = _llama_block_step(RecomputeMode.OFF)
    sel, _, _ = _llama_block_step(RecomputeMode.SELECTIVE)
    full, _, _ = _llama_block_step(RecomputeMode.FULL)
    assert full < sel < none, (full, sel, none)   # measured: 0 < 148,480 < 280,064 bytes
    # exactly the outputs of the matmuls and the fused attention the forward ran (7 linears + SDPA)
    assert fwd.kept_bytes > 0 and sel == fwd.kept_bytes, (sel, fwd.kept_bytes)
    assert full == 0, "full recomputation keeps only the layer's inputs, made before the forward"


def test_selective_backward_re_runs_the_cheap_ops_and_no_matmul():
    _, _, plain = _llama_block_step(RecomputeMode.OFF)
    _, _, sel = _llama_block_step(RecomputeMode.SELECTIVE)
    _, _, full = _llama_block_step(RecomputeMode.FULL)
    again = {name: sel.calls[name] - plain.calls[name] for name in ("mm", "silu", "rsqrt")}
    assert again["mm"] == 0, "matmul outputs are kept, not re-run"
    assert again["silu"] > 0 and again["rsqrt"] > 0, "activations and norms are re-run"
    assert sum(sel.calls[n] for n in SELECTIVE_SAVED_OPS) == sum(plain.calls[n] for n in SELECTIVE_SAVED_OPS)
    assert full.calls["mm"] > plain.calls["mm"], "full recomputation re-runs the matmuls too"


@pytest.mark.dist
@pytest.mark.timeout(240)
def test_distributed_selective_recompute_is_exact():
    from dipc.runtime.launch import spawn

    plan = {0: [selective(V0), selective(V1)], (0, 1): [V2], 1: [L1]}
    per_rank = spawn(distributed_recompute_grads, 2, plan, 4, timeout_s=200)
    ex, pipe, mbs = build("vlm", torch.float64, 2, "zb_h1", 1)
    want = reference_grads(ex.model, mbs[:4], independent_weights(ex, mbs[:4]))
    got = {n: g for r in range(2) for n, g in per_rank[r][1].items()}
    assert_grads_equal(got, want, rtol=1e-9, atol=1e-12, where="vlm/zb_h1/distributed selective recompute")
