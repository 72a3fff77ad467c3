"""A layer running an op SEMU has no FLOP formula for warns, naming the layer, the op and how to
register a cost; after registration the op's FLOPs are counted."""
from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from dipc.semu.symbolic import UnknownOpCostWarning, register_op_cost, trace_layer


@torch.library.custom_op("dipc_test::scaled_mm", mutates_args=())
def _scaled_mm(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return 2 * x @ w


@_scaled_mm.register_fake
def _(x, w):
    return x.new_empty(x.shape[0], w.shape[1])


class Fused(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(8, 16), requires_grad=False)
        self.norm = nn.LayerNorm(16)

    def forward(self, x):
        return self.norm(torch.ops.dipc_test.scaled_mm(x, self.w))


def test_unknown_op_warns_with_layer_op_and_fix():
    with pytest.warns(UnknownOpCostWarning, match=r"layer 'blocks\.3' \(Fused\).*dipc_test\.scaled_mm.*"
                                                  r"register_op_cost"):
        cost = trace_layer(Fused(), (torch.randn(5, 8),), name="blocks.3")
    assert cost.exprs["fwd_flops"] == 0       # counted as nothing, which is why it warns


def test_registered_op_is_counted_and_silent():
    register_op_cost(torch.ops.dipc_test.scaled_mm,
                     lambda x, w, out_shape=None, **kw: 2 * x[0] * x[1] * w[1])
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", UnknownOpCostWarning)
            cost = trace_layer(Fused(), (torch.randn(5, 8),), name="blocks.3")
        d0, d1 = cost.dim_symbols     # x's two dims (the fake kernel does not tie d1 to w's 8)
        assert cost.exprs["fwd_flops"] == 2 * d0 * d1 * 16
        register_op_cost(torch.ops.dipc_test.scaled_mm, None)      # "memory only": silent, 0 FLOPs
        with warnings.catch_warnings():
            warnings.simplefilter("error", UnknownOpCostWarning)
            assert trace_layer(Fused(), (torch.randn(5, 8),)).exprs["fwd_flops"] == 0
    finally:
        from dipc.semu import symbolic
        symbolic._OP_FLOPS.pop(torch.ops.dipc_test.scaled_mm, None)
        symbolic._NO_FLOPS.discard(torch.ops.dipc_test.scaled_mm)


def test_register_op_cost_rejects_non_ops():
    with pytest.raises(TypeError, match="op packet"):
        register_op_cost("aten::mm", None)


def test_example_models_trace_without_unknown_ops():
    import dipc
    from dipc.semu.costs import layer_cost_model
    from examples.data import make_example

    for name in ("vlm", "audio_llm", "t2v"):
        ex = make_example(name)
        pipe = dipc.compile(ex.model, ex.data.microbatches(1, 2)[0], num_stages=2)
        with warnings.catch_warnings():
            warnings.simplefilter("error", UnknownOpCostWarning)
            layer_cost_model(pipe.captured)


def test_registered_bytes_formula_replaces_the_default_traffic():
    """Without a bytes formula a custom op moves its inputs and outputs once; with one, SEMU charges
    what the formula says (symbolic in the op's sizes)."""
    from dipc.semu import symbolic

    class Op(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.randn(8, 16), requires_grad=False)

        def forward(self, x):
            return torch.ops.dipc_test.scaled_mm(x, self.w)

    op = torch.ops.dipc_test.scaled_mm
    try:
        register_op_cost(op, None)
        default = trace_layer(Op(), (torch.randn(5, 8),))
        d0, d1 = default.dim_symbols
        assert default.exprs["fwd_bytes"] == 4 * d0 * d1 + 4 * 8 * 16 + 4 * d0 * 16   # x, w, out: once each
        register_op_cost(op, None, bytes_moved=lambda x, w, out=None: 3 * x.numel() * x.element_size())
        assert trace_layer(Op(), (torch.randn(5, 8),)).exprs["fwd_bytes"] == 12 * d0 * d1
    finally:
        symbolic._NO_FLOPS.discard(op)
        symbolic._OP_BYTES.pop(op, None)
