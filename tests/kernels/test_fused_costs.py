"""SEMU's cost entries for the fused ops (issue 7, item 3).

Under fake tensors each fused op must appear as its own ``torch.ops.dipc`` node, and SEMU must
cost what the fused op does, not what its torch fallback would do:

* activation bytes kept for backward == the bytes autograd actually saves when the op runs on
  real tensors through the Triton kernels (measured with ``saved_tensors_hooks``), and == the
  closed form of what each kernel keeps;
* FLOPs == the closed form (norms, activations and RoPE are memory-bound: 0, as for the torch ops
  they replace; fused linear + CE: ``2·N·D·V`` per matmul, all of them in the forward);
* on a rewritten example model, the per-layer activation memory drops by exactly what the
  fallback saved and the kernels do not, and a fused linear + CE head is not costed with logits.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import pytest
import sympy
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from dipc.kernels import _common
from dipc.kernels.activations import gelu, swiglu
from dipc.kernels.fused_linear_ce import _bytes_moved, _default_chunk, fused_linear_cross_entropy
from dipc.kernels.layer_norm import layer_norm
from dipc.kernels.rms_norm import rms_norm
from dipc.kernels.rope import rope
from dipc.semu.symbolic import UnknownOpCostWarning, trace_layer

pytestmark = pytest.mark.triton


# ---- one module per fused op (its parameters are real Parameters, as in a model) ---------------

class _RMSNorm(nn.Module):
    def __init__(self, d: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(d).to(dtype))

    def forward(self, x):
        return rms_norm(x, self.weight, 1e-6)


class _LayerNorm(nn.Module):
    def __init__(self, d: int, dtype: torch.dtype, affine: bool) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(d).to(dtype)) if affine else None
        self.bias = nn.Parameter(torch.randn(d).to(dtype)) if affine else None

    def forward(self, x):
        return layer_norm(x, self.weight, self.bias, 1e-5)


class _SwiGLU(nn.Module):
    def forward(self, gate, up):
        return swiglu(gate, up)


class _GELU(nn.Module):
    def forward(self, x):
        return gelu(x, "tanh")


class _RoPE(nn.Module):
    def forward(self, x, cos, sin):
        return rope(x, cos, sin)


class _LinearCE(nn.Module):
    def __init__(self, d: int, vocab: int, dtype: torch.dtype, bias: bool) -> None:
        super().__init__()
        self.weight = nn.Parameter((torch.randn(vocab, d) * 0.1).to(dtype))
        self.bias = nn.Parameter(torch.zeros(vocab).to(dtype)) if bias else None

    def forward(self, x, target):
        return fused_linear_cross_entropy(x, self.weight, target, self.bias)


@dataclass
class _Case:
    op: str
    module: nn.Module
    args: tuple
    act: int                           # closed form: bytes kept for backward
    flops: int                         # closed form: forward FLOPs (backward: 0)
    traffic: tuple[int, int] | None    # closed form: (forward, backward) bytes moved, inputs + outputs once


def _cases(dtype: torch.dtype) -> list[_Case]:
    e = torch.tensor([], dtype=dtype).element_size()
    rows, d, hidden, vocab = 15, 24, 40, 56   # rows = tokens of every case's main input

    def x(*shape, grad=True):
        return torch.randn(*shape).to(dtype).requires_grad_(grad)

    labels = torch.randint(0, vocab, (rows,))
    lce = 2 * rows * d * vocab   # one matmul
    rope_x, table = 2 * 3 * 5 * 8, 5 * 8
    return [
        _Case("rms_norm", _RMSNorm(d, dtype), (x(3, 5, d),), rows * d * e + rows * 4, 0,
              (2 * rows * d * e + d * e + 4 * rows, 3 * rows * d * e + 2 * d * e + 4 * rows)),
        _Case("layer_norm", _LayerNorm(d, dtype, True), (x(3, 5, d),), rows * d * e + 2 * rows * 4, 0,
              (2 * rows * d * e + 2 * d * e + 8 * rows, 3 * rows * d * e + 3 * d * e + 8 * rows)),
        _Case("layer_norm", _LayerNorm(d, dtype, False), (x(rows, d),), rows * d * e + 2 * rows * 4, 0,
              (2 * rows * d * e + 8 * rows, 3 * rows * d * e + 8 * rows)),
        _Case("swiglu", _SwiGLU(), (x(rows, hidden), x(rows, hidden)), 2 * rows * hidden * e, 0,
              (3 * rows * hidden * e, 5 * rows * hidden * e)),
        _Case("gelu", _GELU(), (x(3, 5, hidden),), rows * hidden * e, 0,
              (2 * rows * hidden * e, 3 * rows * hidden * e)),
        _Case("rope", _RoPE(), (x(2, 3, 5, 8), x(5, 8, grad=False), x(5, 8, grad=False)), 2 * table * e, 0,
              (2 * rope_x * e + 2 * table * e,) * 2),
        _Case("fused_linear_cross_entropy", _LinearCE(d, vocab, dtype, False), (x(rows, d), labels),
              rows * d * e + vocab * d * e, 3 * lce, None),
        _Case("fused_linear_cross_entropy", _LinearCE(d, vocab, dtype, True), (x(rows, d), labels),
              rows * d * e + vocab * d * e + vocab * 4, 3 * lce, None),
        _Case("fused_linear_cross_entropy", _LinearCE(d, vocab, dtype, False), (x(rows, d, grad=False), labels),
              vocab * d * e, 2 * lce, None),   # frozen input (e.g. a frozen trunk): no dx computed or kept
    ]


_CASE_IDS = ["rms_norm", "layer_norm", "layer_norm_noaffine", "swiglu", "gelu", "rope", "linear_ce", "linear_ce_bias",
             "linear_ce_frozen_input"]


def _measured_saved_bytes(module: nn.Module, args: tuple) -> int:
    """Bytes of the distinct storages autograd saves when ``module`` runs on real tensors
    (parameters excluded, as SEMU accounts them apart)."""
    params = {p.untyped_storage().data_ptr() for p in module.parameters()}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            saved[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = module(*args)
    out.float().sum().backward()   # the saved tensors are what the backward can use
    return sum(saved.values())


def _at_example(expr: sympy.Expr, local) -> int:
    return int(expr.subs(dict(zip(local.dim_symbols, local.example_dims))))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("index", range(len(_CASE_IDS)), ids=_CASE_IDS)
def test_semu_costs_what_the_fused_op_saves(index, dtype, device):
    case = _cases(dtype)[index]
    module = case.module.to(device)
    args = tuple(a.to(device).detach().requires_grad_(a.requires_grad) if a.is_floating_point() else a.to(device)
                 for a in case.args)
    before = _common.PATH_COUNTS[(case.op, "triton")]
    measured = _measured_saved_bytes(module, args)
    assert _common.PATH_COUNTS[(case.op, "triton")] == before + 1, f"{case.op}: the Triton path did not run"
    with warnings.catch_warnings():
        warnings.simplefilter("error", UnknownOpCostWarning)   # every dipc op has a cost entry
        local = trace_layer(module, args, name=case.op)
    act = _at_example(local.exprs["act_bytes"], local)
    assert act == measured == case.act, (act, measured, case.act)
    assert _at_example(local.exprs["fwd_flops"], local) == case.flops
    assert local.exprs["bwd_in_flops"] == 0 and local.exprs["bwd_w_flops"] == 0
    if case.traffic is not None:
        traffic = (_at_example(local.exprs["fwd_bytes"], local), _at_example(local.exprs["bwd_bytes"], local))
        assert traffic == case.traffic
    # symbolic in the token dims: the costs grow with the rows, not fixed at the example
    assert local.exprs["fwd_bytes"].free_symbols, local.exprs["fwd_bytes"]


class _SeenOps(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.seen: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.seen.add(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("index", range(len(_CASE_IDS)), ids=_CASE_IDS)
def test_fake_tracing_sees_one_dipc_node_per_direction(index):
    """Under fake tensors the fused op is one ``dipc`` node forward (and one backward), none of
    the fallback's ATen ops."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    case = _cases(torch.float32)[index]
    op, module, args = case.op, case.module, case.args
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        fake = [mode.from_tensor(a.detach().to("meta")).requires_grad_(a.requires_grad) for a in args]
        spy = _SeenOps()
        with spy:
            out = module.to("meta")(*fake)
            out.float().sum().backward()
    dipc_ops = {s for s in spy.seen if s.startswith("dipc.")}
    name = {"fused_linear_cross_entropy": "linear_cross_entropy"}.get(op, op)
    assert f"dipc.{name}" in dipc_ops, spy.seen
    assert dipc_ops <= {f"dipc.{name}", f"dipc.{name}_backward"}
    fallback_ops = {"aten.rsqrt", "aten.native_layer_norm", "aten.silu", "aten.gelu", "aten.cat", "aten.mm",
                    "aten.addmm", "aten._log_softmax", "aten.nll_loss_forward"}
    assert not spy.seen & fallback_ops, spy.seen & fallback_ops


# ---- fused linear + cross-entropy against the unfused head -----------------------------------

class _Head(nn.Module):
    """An LM loss head as models write it: Linear, flatten, float, cross-entropy."""

    def __init__(self, d: int, vocab: int) -> None:
        super().__init__()
        self.lm_head = nn.Linear(d, vocab, bias=False)

    def forward(self, h, labels):
        logits = self.lm_head(h)
        return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100)


def test_fused_head_is_not_costed_with_logits():
    from dipc.kernels.rewrite import fuse_module

    d, vocab = 16, 96
    head = _Head(d, vocab)
    args = (torch.randn(2, 7, d, requires_grad=True), torch.randint(0, vocab, (2, 7)))
    plain = trace_layer(head, args, name="head")
    fused = trace_layer(fuse_module(head), args, name="head")
    n, t = plain.dim_symbols[:2]
    tokens = n * t
    e = 4
    # fused: keeps dx and the fp32 weight gradient, nothing per (token, vocab)
    assert sympy.expand(fused.exprs["act_bytes"] - (tokens * d * e + vocab * d * 4)) == 0, fused.exprs["act_bytes"]
    # unfused: keeps at least the logits (tokens x vocab)
    assert sympy.Poly(plain.exprs["act_bytes"], n, t).coeff_monomial(n * t) >= vocab * e
    # same matmul work (2·N·D·V each: logits, dx, dW), moved to the fused forward
    total = lambda c: sympy.expand(c.exprs["fwd_flops"] + c.exprs["bwd_in_flops"] + c.exprs["bwd_w_flops"])
    assert total(fused) == total(plain) == sympy.expand(6 * tokens * d * vocab)
    assert sympy.expand(fused.exprs["fwd_flops"] - 6 * tokens * d * vocab) == 0
    assert plain.exprs["fwd_flops"] == sympy.expand(2 * tokens * d * vocab)


@pytest.mark.parametrize("rows, d, vocab, exact", [(64, 8, 32, True), (3, 8, 100, True), (512, 16, 200, False)])
def test_linear_ce_bytes_count_the_chunks_it_runs(rows, d, vocab, exact):
    """Without an explicit chunk size the cost entry takes ``min(N, ceil(V/D))`` chunks (W is read
    per chunk): the launcher's count where its power-of-two chunk divides evenly, else above it."""
    chunk = _default_chunk(rows, vocab, d)
    x, w, t = torch.empty(rows, d), torch.empty(vocab, d), torch.empty(rows, dtype=torch.long)
    for need in [(False, False, False), (True, True, False)]:
        estimated = _bytes_moved(x, w, None, t, -100, "mean", None, *need)
        launched = _bytes_moved(x, w, None, t, -100, "mean", chunk, *need)
        assert estimated == launched if exact else estimated > launched


# ---- a rewritten example model ------------------------------------------------------------------

def test_rewritten_vlm_layers_keep_less_for_backward():
    """VLM (LLaMA backbone, ViT encoder), fused vs unfused, per layer: each LLaMA block keeps two
    fp32 ``[tokens, D]`` normalised copies (its two RMSNorms) and one ``[tokens, I]`` SiLU output
    less; the final RMSNorm one ``[tokens, D]``; LayerNorm, GELU and RoPE already kept only their
    inputs, so the encoder blocks are unchanged; the matmul/attention FLOPs are the same."""
    import dipc
    from dipc.semu.costs import STAT_SYMBOLS, layer_cost_model
    from examples.data import make_example

    ex = make_example("vlm")
    mb = ex.data.microbatches(1, 2)[0]
    models = {f: layer_cost_model(dipc.compile(ex.model, mb, num_stages=2, fused_kernels=f).captured)
              for f in (False, True)}
    plain, fused = models[False], models[True]
    assert plain.layers == fused.layers
    n, T = STAT_SYMBOLS[0], STAT_SYMBOLS[3]
    d, inter, e = ex.config.hidden_size, ex.config.intermediate_size, 4
    expected = {f"language_model.layers.{i}": n * T * (2 * d * e + inter * e) for i in range(ex.config.num_layers)}
    expected["language_model.norm"] = n * T * d * e
    for path in plain.layers:
        p, f = plain.expr(path).exprs, fused.expr(path).exprs
        drop = sympy.expand(p["act_bytes"] - f["act_bytes"])
        assert drop == sympy.expand(expected.get(path, 0)), (path, drop)
        for k in ("fwd_flops", "bwd_in_flops", "bwd_w_flops", "attn_fwd_flops"):
            assert sympy.expand(p[k] - f[k]) == 0, (path, k)
