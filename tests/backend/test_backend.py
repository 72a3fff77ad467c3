"""``torch.compile(model, backend=dipc_backend)``: forward and backward match eager on every example
model; the dynamic length symbols reach the cost pass as sympy symbols; graph breaks, new shapes
and unsupported graphs are handled; what the backend learned is inspectable."""
from __future__ import annotations

import copy
import importlib.metadata
import logging

import pytest
import sympy
import torch
import torch.nn.functional as F
from torch import nn

import dipc.backend as B
from dipc.backend import dipc_backend
from dipc.backend_graph import strip_input_name, strip_module_path
from dipc.semu.costs import STAT_SYMBOLS
from examples.data import make_example

SMALL = {"vlm": dict(num_layers=2, vision_num_layers=2), "audio_llm": dict(num_layers=2),
         "t2v": dict(num_layers=2)}
EXACT = {"fused_kernels": False}     # the eager-equivalence runs: no kernel rewrite, bit-for-bit torch ops
# the modality module each example's first layer belongs to
FIRST_MODULE = {"vlm": "vision", "audio_llm": "audio", "t2v": "text"}


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    B.clear_compiled()
    yield
    torch._dynamo.reset()


def _clean_batches(ex, n: int) -> list[dict]:
    """Batches with every dim >= 2 (Dynamo specialises sizes 0 and 1) and distinct lengths."""
    out, seen = [], set()
    for _ in range(200):
        mb = ex.data.microbatches(1, 2)[0]
        shapes = tuple(tuple(v.shape) for v in mb.values())
        if all(d >= 2 for s in shapes for d in s) and shapes not in seen:
            seen.add(shapes)
            out.append(mb)
            if len(out) == n:
                return out
    raise AssertionError("could not draw clean batches")


def _check_same(model, ref, compiled, batch, rtol=1e-5, atol=1e-6):
    for m in (model, ref):
        m.zero_grad(set_to_none=True)
    got = compiled(**batch)
    got.backward()
    want = ref(**batch)
    want.backward()
    torch.testing.assert_close(got, want, rtol=rtol, atol=atol)
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        if q.grad is None:
            assert p.grad is None, name
        else:
            torch.testing.assert_close(p.grad, q.grad, rtol=rtol, atol=atol, msg=name)


@pytest.mark.parametrize("name", ["vlm", "audio_llm", "t2v"])
def test_example_model_matches_eager_and_reports(name):
    ex = make_example(name, **SMALL[name])
    ref = copy.deepcopy(ex.model)
    b1, b2 = _clean_batches(ex, 2)
    compiled = torch.compile(ex.model, backend=dipc_backend, dynamic=True, options={**EXACT, "num_stages": 2})
    _check_same(ex.model, ref, compiled, b1)
    assert len(B.compiled_graphs()) == 1
    info = B.last_compiled()
    assert info.executor == "fx" and info.fallback_reason is None, info.summary()
    assert not [k for k in info.errors if not k.startswith("cost ")], info.errors

    # length symbols: the SymInt inputs' sympy symbols, recorded with their batch keys and example values
    syms = set(info.length_symbols.values())
    assert syms and all(isinstance(s, sympy.Symbol) for s in syms)
    assert set(info.input_keys) == set(b1)
    for key, dims in info.input_shapes.items():
        for d, e in enumerate(dims):
            if e.is_Symbol:
                assert e in syms and info.symbol_hints[e] == b1[key].shape[d]
    # ... and they reach the cost pass: per-layer costs over Dynamo's symbols (and SEMU's statistics)
    costly = {p: c for p, c in info.graph_costs.items() if c["fwd_flops"].free_symbols & syms}
    assert len(costly) >= len(info.layers) // 2, info.summary()
    for p, c in info.graph_costs.items():
        for field_, expr in c.items():
            assert isinstance(expr, sympy.Expr)
            assert expr.free_symbols <= syms | set(STAT_SYMBOLS), (p, field_, expr)
        assert info.costs[p].exprs["fwd_flops"].free_symbols <= set(STAT_SYMBOLS)
    # evaluated at the example lengths, a block's symbolic FLOPs are positive numbers
    p, c = next(iter(costly.items()))
    at = {**info.symbol_hints, **{s: 1 for s in STAT_SYMBOLS}}
    assert float(c["fwd_flops"].subs(at)) > 0

    # modality tags (data flow from batch keys) and the two-stage plan
    tags = {t.path: t.module for t in info.layer_tags}
    assert tags[info.layers[0]] == FIRST_MODULE[name] and "backbone" in tags.values(), tags
    assert {info.node_modality[n.name] for n in info.graph_module.graph.nodes if n.op == "placeholder"
            and n.name in info.node_modality} >= {FIRST_MODULE[name]}
    assert any(n.meta.get("dipc.layer") == info.layers[-1] for n in info.graph_module.graph.nodes)
    assert len(info.stages) == 2 and [l for s in info.stages for l in s.layers] == info.layers
    assert info.stages[0].module == FIRST_MODULE[name] and info.stages[-1].module == "backbone"
    assert info.layers[0] in info.summary()

    # new lengths: no recompilation with dynamic shapes, still equal to eager
    _check_same(ex.model, ref, compiled, b2)
    assert len(B.compiled_graphs()) == 1


class _Block(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.fc = nn.Linear(d, d)

    def forward(self, x):
        return x + F.gelu(self.fc(self.norm(x)))


class _Tiny(nn.Module):
    """Packed text: ``input_ids [ΣL]``, ``labels [ΣL]``; optional graph breaks in the middle."""

    def __init__(self, d: int = 16, vocab: int = 32, layers: int = 4, breaks: bool = False):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList(_Block(d) for _ in range(layers))
        self.head = nn.Linear(d, vocab)
        self.breaks = breaks

    def forward(self, input_ids, labels):
        x = self.embed(input_ids)
        if not self.breaks:
            for blk in self.blocks:
                x = blk(x)
            return F.cross_entropy(self.head(x), labels)
        # (a graph break inside a for loop makes Dynamo skip the whole frame: keep them outside)
        x = self.blocks[0](x)
        x = self.blocks[1](x)
        print("dipc backend test: graph break")       # a graph break
        if x.sum().item() > 1e9:                       # data-dependent control flow: another one
            x = x * 0.5
        x = self.blocks[2](x)
        x = self.blocks[3](x)
        return F.cross_entropy(self.head(x), labels)


def _tiny_batch(n: int, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"input_ids": torch.randint(0, 32, (n,), generator=g), "labels": torch.randint(0, 32, (n,), generator=g)}


def test_graph_breaks_are_survived(capsys):
    torch.manual_seed(0)
    model = _Tiny(breaks=True)
    ref = copy.deepcopy(model)
    compiled = torch.compile(model, backend=dipc_backend, dynamic=True, options=EXACT)
    _check_same(model, ref, compiled, _tiny_batch(7))
    graphs = B.compiled_graphs()
    assert len(graphs) >= 2, [g.summary() for g in graphs]
    assert "graph break" in capsys.readouterr().out
    assert graphs[0].layers[:2] == ["embed", "blocks.0"]
    assert any(g.layers and g.layers[-1] == "head" for g in graphs[1:])
    assert all(g.executor == "fx" for g in graphs)
    n = len(graphs)
    _check_same(model, ref, compiled, _tiny_batch(11, seed=1))    # new length: no recompilation
    assert len(B.compiled_graphs()) == n


def test_recompilation_on_specialised_shape_is_recorded():
    torch.manual_seed(0)
    model = _Tiny()
    ref = copy.deepcopy(model)
    compiled = torch.compile(model, backend=dipc_backend, dynamic=True, options=EXACT)
    _check_same(model, ref, compiled, _tiny_batch(9))
    _check_same(model, ref, compiled, _tiny_batch(1))      # size 1 is specialised by Dynamo: a new graph
    graphs = B.compiled_graphs()
    assert len(graphs) == 2 and graphs[0].compile_id != graphs[1].compile_id
    assert graphs[0].length_symbols and not graphs[1].length_symbols


def test_num_stages_option_and_aot_path():
    torch.manual_seed(0)
    model = _Tiny(layers=2)
    ref = copy.deepcopy(model)
    compiled = torch.compile(model, backend=dipc_backend, dynamic=True,
                             options={**EXACT, "aot": True, "num_stages": 3})
    _check_same(model, ref, compiled, _tiny_batch(6))
    info = B.last_compiled()
    assert info.executor == "aot_autograd" and {"forward", "backward"} <= set(info.aot_graphs)
    assert len(info.stages) == 3 and info.layers == ["embed", "blocks.0", "blocks.1", "head"]
    (s,) = info.length_symbols.values()
    assert s in info.graph_costs["blocks.0"]["fwd_flops"].free_symbols      # 2*16*16 FLOPs per token
    assert info.graph_costs["blocks.0"]["fwd_flops"] == 512 * s


def test_unknown_option_is_a_clear_error():
    compiled = torch.compile(_Tiny(), backend=dipc_backend, options={"num_stage": 2})
    with pytest.raises(Exception, match="unknown option"):
        compiled(**_tiny_batch(5))


class _Spectral(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        return self.fc(torch.view_as_real(x * x).flatten(-2)).sum()


def test_unsupported_graph_falls_back_with_reason(caplog):
    torch.manual_seed(0)
    model = _Spectral()
    ref = copy.deepcopy(model)
    x = torch.randn(5, 2, dtype=torch.complex64)
    compiled = torch.compile(model, backend=dipc_backend, options=EXACT)
    with caplog.at_level(logging.WARNING, logger="dipc.backend"):
        got = compiled(x)
    got.backward()
    want = ref(x)
    want.backward()
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(model.fc.weight.grad, ref.fc.weight.grad)
    info = B.last_compiled()
    assert info.executor == "eager-fallback" and "complex64" in info.fallback_reason
    recs = [r for r in caplog.records if r.name == "dipc.backend" and r.levelno == logging.WARNING]
    assert recs and "falls back to eager" in recs[0].getMessage() and "complex64" in recs[0].getMessage()


@pytest.mark.triton
def test_kernel_rewrite_runs_fused_ops():
    from dipc.kernels import _common

    torch.manual_seed(0)
    model = _Tiny(layers=2)
    ref = copy.deepcopy(model)
    before = dict(_common.PATH_COUNTS)
    compiled = torch.compile(model, backend=dipc_backend, dynamic=True, options={"fused_kernels": True})
    _check_same(model, ref, compiled, _tiny_batch(6), rtol=1e-4, atol=1e-5)
    info = B.last_compiled()
    assert {"layer_norm", "gelu"} <= set(info.fused_ops) and info.executor == "fx"
    ran = {k: v - before.get(k, 0) for k, v in _common.PATH_COUNTS.items() if v - before.get(k, 0) > 0}
    assert {op for op, _ in ran} >= {"layer_norm", "gelu"}, ran
    if _common.HAS_TRITON and _common.INTERPRET:
        assert any(path == "triton" for _, path in ran), ran


def test_fused_kernels_switch_off():
    model = _Tiny(layers=1)
    torch.compile(model, backend=dipc_backend, options={"fused_kernels": False})(**_tiny_batch(4))
    assert B.last_compiled().fused_ops == []


def test_dynamo_prefixes_are_stripped():
    assert strip_module_path("L['self'].vision.blocks.0") == "vision.blocks.0"
    assert strip_module_path("L['self'].vision.blocks[0].attn") == "vision.blocks.0.attn"
    assert strip_module_path("L['self']._modules['vision']._modules['blocks']._modules['1']") == "vision.blocks.1"
    assert strip_module_path("L['model'].lm_head") == "lm_head"
    assert strip_input_name("L_input_ids_") == "input_ids"
    assert strip_input_name("L_kwargs_pixel_values_") == "pixel_values"


def _entry_point_installed() -> bool:
    eps = importlib.metadata.entry_points(group="torch_dynamo_backends")
    return any(ep.name == "dipc" for ep in eps)


@pytest.mark.skipif(not _entry_point_installed(), reason="dipc's torch_dynamo_backends entry point is not installed")
def test_backend_by_name():
    from torch._dynamo.backends.registry import lookup_backend

    assert "dipc" in torch._dynamo.list_backends(exclude_tags=())
    assert lookup_backend("dipc") is dipc_backend
    torch.manual_seed(0)
    model = _Tiny(layers=1)
    ref = copy.deepcopy(model)
    _check_same(model, ref, torch.compile(model, backend="dipc", options=EXACT), _tiny_batch(5))
    assert B.last_compiled().layers
