"""SEMU's symbolic per-layer costs against torch's FlopCounterMode on concrete batches.

For every example model, the symbolic expressions (traced once, on the example batch) are evaluated
on the layer inputs of >= 20 random batches and compared with FlopCounterMode run on the real layer
(forward, backward for inputs, backward for weights). Attention is not in FlopCounterMode's count on
CPU, so the matmul parts are compared there and attention is checked against its closed form.
"""
from __future__ import annotations

import random

import pytest
import sympy
import torch
from torch import fx
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import _disable_current_modes
from torch.utils.flop_counter import FlopCounterMode

from dipc.passes.capture import capture
from dipc.semu.costs import CostError, LengthStats, STAT_SYMBOLS, layer_cost_model
from dipc.semu.symbolic import measure_attention_pairs
from examples.data import make_example

NUM_BATCHES = 20


class _LayerInputs(fx.Interpreter):
    """Runs the captured graph and keeps every layer's real inputs."""

    def __init__(self, gm: fx.GraphModule, layers: set[str]):
        super().__init__(gm)
        self.layers = layers
        self.seen: dict[str, tuple] = {}

    def call_module(self, target, args, kwargs):
        if target in self.layers:
            self.seen[target] = (args, kwargs)
        return super().call_module(target, args, kwargs)


class _UncountedAttention(torch.autograd.Function):
    """Real SDPA (forward and backward) with every dispatch mode off, so FlopCounterMode counts the
    layer's matmul work only. (Which SDPA kernel runs, and so what FlopCounterMode would count for it,
    depends on the device and tensor rank: 0 for 4-D CPU flash, full for the 3-D math path.)"""

    @staticmethod
    def forward(ctx, q, k, v, mask, causal):
        ctx.save_for_backward(q, k, v)
        ctx.mask, ctx.causal = mask, causal
        with _disable_current_modes():
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)

    @staticmethod
    def backward(ctx, grad):
        q, k, v = ctx.saved_tensors
        with _disable_current_modes(), torch.enable_grad():
            q, k, v = (t.detach().requires_grad_(True) for t in (q, k, v))
            out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=ctx.mask, is_causal=ctx.causal)
            return (*torch.autograd.grad(out, (q, k, v), grad), None, None)


class _NoAttentionCount(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (torch.nn.functional.scaled_dot_product_attention, torch._C._nn.scaled_dot_product_attention):
            b = dict(zip(("query", "key", "value", "attn_mask", "dropout_p", "is_causal"), args)) | kwargs
            return _UncountedAttention.apply(b["query"], b["key"], b["value"], b.get("attn_mask"),
                                             bool(b.get("is_causal", False)))
        return func(*args, **kwargs)


def _reference_flops(module, args, kwargs) -> tuple[int, int, int]:
    """FlopCounterMode on the real layer (attention excluded): forward, backward for inputs,
    backward for weights."""
    clone = lambda a: a.detach().requires_grad_(a.requires_grad) if isinstance(a, torch.Tensor) else a
    args = torch.utils._pytree.tree_map(clone, args)
    kwargs = torch.utils._pytree.tree_map(clone, kwargs)
    fwd = FlopCounterMode(display=False)
    with fwd, _NoAttentionCount():
        out = module(*args, **kwargs)
    outs = [o for o in torch.utils._pytree.tree_flatten(out)[0] if isinstance(o, torch.Tensor) and o.requires_grad]
    if not outs:
        return fwd.get_total_flops(), 0, 0
    inputs = [a for a in torch.utils._pytree.tree_flatten((args, kwargs))[0]
              if isinstance(a, torch.Tensor) and a.requires_grad]
    params = [p for p in module.parameters() if p.requires_grad]
    gouts = [torch.ones_like(o) for o in outs]
    b_in = 0
    if inputs:
        c = FlopCounterMode(display=False)
        with c:
            torch.autograd.grad(outs, inputs, gouts, retain_graph=True, allow_unused=True)
        b_in = c.get_total_flops()
    c = FlopCounterMode(display=False)
    with c:
        torch.autograd.grad(outs, inputs + params, gouts, allow_unused=True)
    return fwd.get_total_flops(), b_in, c.get_total_flops() - b_in


def _random_batch(ex, rng: random.Random) -> dict:
    return ex.collate(ex.data.samples(rng.randint(1, 4)))


@pytest.fixture(scope="module", params=["vlm", "audio_llm", "t2v"])
def example(request):
    ex = make_example(request.param)
    rng = random.Random(0)
    captured = capture(ex.model, _random_batch(ex, rng))
    return ex, captured, layer_cost_model(captured)


def test_matmul_flops_equal_flop_counter(example):
    ex, captured, cm = example
    rng = random.Random(1)
    checked = 0
    for _ in range(NUM_BATCHES):
        batch = _random_batch(ex, rng)
        interp = _LayerInputs(captured.graph_module, set(captured.layers))
        interp.run(*[batch[k] for k in captured.input_keys])
        for path in captured.layers:
            args, kwargs = interp.seen[path]
            module = captured.graph_module.get_submodule(path)
            pairs = measure_attention_pairs(module, args, kwargs)
            got = cm.cost_at(path, args, kwargs, pairs=pairs)
            fwd, b_in, b_w = _reference_flops(module, args, kwargs)
            assert got.fwd_flops - got.attn_fwd_flops == fwd, (path, "fwd")
            assert got.bwd_in_flops - 2 * got.attn_fwd_flops == b_in, (path, "bwd_in")
            assert got.bwd_w_flops == b_w, (path, "bwd_w")
            checked += 1
    assert checked >= NUM_BATCHES * len(captured.layers)


def _segment_lengths(ids: torch.Tensor, n: int | None = None) -> list[int]:
    if n is None:
        n = int(ids.max()) + 1 if ids.numel() else 0
    return torch.bincount(ids, minlength=n).tolist()


def _vlm_stats(batch: dict, path: str) -> LengthStats:
    if path.startswith("vision") or path == "projector":
        return LengthStats.of(_segment_lengths(batch["image_ids"]))
    b, t = batch["input_ids"].shape
    return LengthStats.padded(b, t)


def test_vlm_attention_closed_form_and_stats_binding():
    """Vision attention is block-diagonal over images: 4·d·ΣL² forward; the LM's causal attention is
    2·B·d·T(T+1); both from LengthStats, equal to the costs on the concrete layer inputs."""
    ex = make_example("vlm")
    rng = random.Random(2)
    captured = capture(ex.model, _random_batch(ex, rng))
    cm = layer_cost_model(captured)
    d_vis, d_lm = ex.config.vision_hidden_size, ex.config.hidden_size
    for _ in range(NUM_BATCHES):
        batch = _random_batch(ex, rng)
        interp = _LayerInputs(captured.graph_module, set(captured.layers))
        interp.run(*[batch[k] for k in captured.input_keys])
        lengths = _segment_lengths(batch["image_ids"])
        vis = cm.cost("vision.blocks.1", LengthStats.of(lengths))
        assert vis.attn_fwd_flops == 4 * d_vis * sum(x * x for x in lengths)
        b, t = batch["input_ids"].shape
        lm = cm.cost("language_model.layers.2", LengthStats.padded(b, t))
        assert lm.attn_fwd_flops == 2 * b * d_lm * t * (t + 1)
        for path in captured.layers:
            args, kwargs = interp.seen[path]
            module = captured.graph_module.get_submodule(path)
            at = cm.cost_at(path, args, kwargs, pairs=measure_attention_pairs(module, args, kwargs))
            assert cm.cost(path, _vlm_stats(batch, path)) == at, path


def test_t2v_cross_attention_binding():
    """A DiT block reads two streams (video tokens, text tokens): self-attention pairs bind to ΣLv²,
    cross-attention pairs to Σ Lv_i·Lt_i."""
    ex = make_example("t2v")
    rng = random.Random(3)
    captured = capture(ex.model, _random_batch(ex, rng))
    cm = layer_cost_model(captured)
    e = cm.expr("blocks.0")
    n, L, Q, T, nc, Lc, Qc, Tc, X = STAT_SYMBOLS
    assert e.exprs["attn_fwd_flops"].free_symbols == {Q, X}
    d = ex.config.hidden_size
    for _ in range(NUM_BATCHES):
        batch = _random_batch(ex, rng)
        num = len(batch["timesteps"])
        video = _segment_lengths(batch["video_ids"], num)
        text = _segment_lengths(batch["text_sample_ids"], num)
        c = cm.cost("blocks.3", LengthStats.of(video, context=text))
        assert c.attn_fwd_flops == 4 * d * (sum(v * v for v in video) + sum(v * t for v, t in zip(video, text)))
        interp = _LayerInputs(captured.graph_module, set(captured.layers))
        interp.run(*[batch[k] for k in captured.input_keys])
        args, kwargs = interp.seen["blocks.3"]
        at = cm.cost_at("blocks.3", args, kwargs,
                        pairs=measure_attention_pairs(captured.graph_module.get_submodule("blocks.3"), args, kwargs))
        assert c == at


def test_costs_ride_on_nodes_and_memory_fields(example):
    ex, captured, cm = example
    nodes = [n for n in captured.graph_module.graph.nodes if n.op == "call_module" and n.target in cm.exprs]
    assert {n.target for n in nodes} == set(captured.layers)
    for n in nodes:
        e = n.meta["dipc.cost"]
        assert e.path == n.target and set(e.exprs) >= {"fwd_flops", "bwd_in_flops", "bwd_w_flops", "act_bytes"}
        assert all(ex_.free_symbols <= set(STAT_SYMBOLS) for ex_ in e.exprs.values())
        module = captured.graph_module.get_submodule(n.target)
        c = cm.cost(n.target, LengthStats.of([7, 5], context=[3, 2]))
        assert c.num_params == sum(p.numel() for p in module.parameters())
        assert c.param_bytes == 4 * c.num_params and c.grad_bytes == c.param_bytes
        assert c.optim_bytes == 2 * c.param_bytes      # Adam moments, fp32 params
        assert c.act_bytes >= 0 and c.out_bytes > 0


def test_spatial_reuse_shares_functions_and_temporal_cache_hits():
    ex = make_example("vlm")
    captured = capture(ex.model, _random_batch(ex, random.Random(4)))
    cm = layer_cost_model(captured)
    blocks = [p for p in captured.layers if p.startswith("vision.blocks.")]
    assert len({cm.signature(p) for p in blocks}) == 1
    assert cm.num_traced < len(captured.layers)
    s = LengthStats.of([16, 9, 25])
    first = [cm.cost(p, s) for p in blocks]
    assert cm.misses == 1 and cm.hits == len(blocks) - 1 and len(set(first)) == 1
    total = cm.cost_sum(captured.layers, s)
    each = [cm.cost(p, s) for p in captured.layers]
    assert total.fwd_flops == sum(c.fwd_flops for c in each)
    assert total.act_bytes == sum(c.act_bytes for c in each)
    assert total.param_bytes == sum(c.param_bytes for c in each)
    no_reuse = layer_cost_model(captured, reuse=False, annotate=False)
    assert no_reuse.num_traced == len(captured.layers)
    for p in captured.layers:
        assert no_reuse.expr(p).exprs == cm.expr(p).exprs, p


def test_bucketing_rounds_up_within_tolerance():
    ex = make_example("vlm")
    captured = capture(ex.model, _random_batch(ex, random.Random(5)))
    exact = layer_cost_model(captured)
    bucketed = layer_cost_model(captured, bucket_rel=0.05, annotate=False)
    rng = random.Random(6)
    for _ in range(50):
        s = LengthStats.of([rng.randint(1, 64) for _ in range(rng.randint(1, 8))])
        a, b = exact.cost("vision.blocks.0", s), bucketed.cost("vision.blocks.0", s)
        assert a.fwd_flops <= b.fwd_flops <= a.fwd_flops * 1.05 ** 2 * 1.001
    assert bucketed.hits > 0


def test_unknown_layer_names_choices():
    ex = make_example("audio_llm")
    captured = capture(ex.model, _random_batch(ex, random.Random(7)))
    cm = layer_cost_model(captured)
    with pytest.raises(CostError, match="no layer 'nope'.*Fix"):
        cm.cost("nope", LengthStats.of([3]))


def _runtime_seed_bytes(module, args, kwargs) -> int:
    """Bytes of the distinct storages the runtime's BWD_I keeps for BWD_W when ``module`` is run
    alone, its inputs standing for the stage's activation path."""
    from dipc.runtime.split_backward import backward_input

    clone = lambda a: a.detach().requires_grad_(a.requires_grad) if isinstance(a, torch.Tensor) else a
    args = torch.utils._pytree.tree_map(clone, args)
    kwargs = torch.utils._pytree.tree_map(clone, kwargs)
    out = module(*args, **kwargs)
    outs = [o for o in torch.utils._pytree.tree_flatten(out)[0] if isinstance(o, torch.Tensor) and o.requires_grad]
    inputs = [a for a in torch.utils._pytree.tree_flatten((args, kwargs))[0]
              if isinstance(a, torch.Tensor) and a.requires_grad]
    params = [p for p in module.parameters() if p.requires_grad]
    if not outs or not inputs:
        return 0
    _, work = backward_input(outs, [torch.ones_like(o) for o in outs], inputs, params)
    storages = {g.untyped_storage()._cdata: g.untyped_storage().nbytes() for c in work.calls for g in c.grads}
    return sum(storages.values())


def test_wgrad_seed_bytes_equal_what_the_runtime_split_keeps(example):
    """The traced term counts exactly the gradients the runtime's BWD_I captures for BWD_W, on
    batches of other lengths than the traced one (the logits' gradient in ``lm_head``, every
    linear's output gradient in a block)."""
    ex, captured, cm = example
    rng = random.Random(2)
    held = 0
    for _ in range(3):
        batch = _random_batch(ex, rng)
        interp = _LayerInputs(captured.graph_module, set(captured.layers))
        interp.run(*[batch[k] for k in captured.input_keys])
        for path in captured.layers:
            args, kwargs = interp.seen[path]
            if any(a.numel() == 0 for a in torch.utils._pytree.tree_flatten(args)[0] if isinstance(a, torch.Tensor)):
                continue   # an empty stream (a batch without images): eager keeps a stray 4-byte storage
            module = captured.graph_module.get_submodule(path)
            got = cm.cost_at(path, args, kwargs, pairs=measure_attention_pairs(module, args, kwargs))
            want = _runtime_seed_bytes(module, args, kwargs)
            assert got.wgrad_seed_bytes == want, path
            held += want
    assert held > 0


@pytest.mark.parametrize("shape,bias,contiguous", [((5, 8), True, True), ((2, 5, 8), True, True),
                                                   ((2, 5, 8), True, False), ((2, 5, 8), False, True),
                                                   ((3, 2, 5, 8), True, True)])
def test_traced_linear_matches_f_linear_and_keeps_lengths_symbolic(shape, bias, contiguous):
    """The tracer spells F.linear with the ops torch's C++ linear dispatches (so lengths stay
    symbolic on releases whose linear reads sizes as plain ints): same values, and the trace of a
    linear layer keeps every leading dim free."""
    from dipc.semu.symbolic import _linear, trace_layer

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, generator=gen)
    if not contiguous:
        x = x.transpose(0, 1).contiguous().transpose(0, 1)
    w, b = torch.randn(4, 8, generator=gen), torch.randn(4, generator=gen) if bias else None
    torch.testing.assert_close(_linear(x, w, b), torch.nn.functional.linear(x, w, b))
    layer = torch.nn.Linear(8, 4, bias=bias)
    local = trace_layer(layer, (x.requires_grad_(),))
    pinned = {d for leaf, d, _ in local.specialized if leaf == 0}
    assert pinned == {len(shape) - 1}, f"leading dims pinned: {local.specialized}"
    rows = 1
    for s in shape[:-1]:
        rows *= s
    got = float(local.exprs["fwd_flops"].subs(dict(zip(local.dim_symbols, local.example_dims))))
    assert got == 2 * rows * 8 * 4


def test_a_layer_whose_rows_get_pinned_is_a_warning_naming_it(monkeypatch):
    """A trace that pins every leading dim (as torch 2.11's linear did) must not pass silently;
    the example models' own traces raise no such warning."""
    import warnings

    import dipc
    from dipc.semu import symbolic
    from dipc.semu.symbolic import PinnedShapeWarning

    def pinned_by(captured) -> list[str]:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            layer_cost_model(captured)
        return [str(w.message) for w in caught if issubclass(w.category, PinnedShapeWarning)]

    ex = make_example("vlm", seed=0)
    pipe = dipc.compile(ex.model, ex.data.microbatches(1, 2)[0], num_stages=2)
    assert pinned_by(pipe.captured) == []

    def pinning_linear(input, weight, bias=None):
        for s in input.shape[:-1]:
            int(s)   # reads sizes as ints: the guards pin them
        return torch.nn.functional.linear(input, weight, bias)

    monkeypatch.setattr(symbolic, "_linear", pinning_linear)
    pinned = pinned_by(pipe.captured)
    assert any("'lm_head'" in m for m in pinned), pinned
    assert any("'language_model.layers.0'" in m for m in pinned), pinned
