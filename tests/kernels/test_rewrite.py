"""The FX rewrite: which patterns it swaps, that it never edits its input, that the rewritten
example models train exactly like the originals, and the fallbacks / errors on bad input."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

from dipc.kernels import _common
from dipc.kernels.fused_linear_ce import fused_linear_cross_entropy
from dipc.kernels.layer_norm import layer_norm
from dipc.kernels.modules import FusedGELU, FusedLayerNorm, FusedRMSNorm
from dipc.kernels.rewrite import fuse_module, rewrite_fused
from dipc.kernels.rms_norm import rms_norm
from dipc.kernels.rope import rope
from examples.data import EXAMPLE_NAMES, make_example
from examples.models.layers import RMSNorm

pytestmark = pytest.mark.triton


class _FunctionalBlock(nn.Module):
    """Functional forms of every pattern, in one graph."""

    def __init__(self, d=12, v=19):
        super().__init__()
        self.norm = RMSNorm(d)
        self.ln_w = nn.Parameter(torch.randn(d))
        self.gate, self.up = nn.Linear(d, 2 * d), nn.Linear(d, 2 * d)
        self.head = nn.Linear(2 * d, v)

    def forward(self, x, target):
        h = F.layer_norm(self.norm(x), (x.shape[-1],), self.ln_w, None, 1e-5)
        h = F.gelu(h, approximate="tanh") + h
        h = F.silu(self.gate(h)) * self.up(h)
        return F.cross_entropy(self.head(h).flatten(0, 1).float(), target.flatten(), ignore_index=-100)


class _NormLeafTracer(fx.Tracer):
    """symbolic_trace inlines custom modules; keep RMSNorm a leaf, as a layer tracer would."""

    def is_leaf_module(self, m, qualname):
        return isinstance(m, RMSNorm) or super().is_leaf_module(m, qualname)


def _fused_ops(gm):
    return sorted(gm.meta["dipc.fused_ops"])


def test_rewrite_finds_every_pattern_and_keeps_the_input(device):
    torch.manual_seed(0)
    block = _FunctionalBlock().to(device)
    gm = fx.GraphModule(block, _NormLeafTracer().trace(block))
    before = gm.code
    fused = rewrite_fused(gm)
    assert gm.code == before, "rewrite_fused edited its input"
    assert _fused_ops(fused) == ["gelu", "layer_norm", "linear_cross_entropy", "rms_norm", "swiglu"]
    # the new module shares the Parameters and keeps the state_dict keys
    assert set(fused.state_dict()) <= set(block.state_dict())
    assert fused.get_parameter("norm.weight") is block.norm.weight
    x = torch.randn(2, 5, 12, device=device)
    target = torch.randint(0, 19, (2, 5), device=device)
    target[0, :2] = -100
    ref = block(x, target)
    ref.backward()
    ref_grads = {n: p.grad.clone() for n, p in block.named_parameters()}
    block.zero_grad()
    out = fused(x, target)
    out.backward()
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    for n, p in block.named_parameters():
        torch.testing.assert_close(p.grad, ref_grads[n], rtol=1e-5, atol=1e-6, msg=lambda m: f"{n}: {m}")


def test_rewrite_leaves_lookalikes_alone():
    class GemmaRMSNorm(nn.Module):  # (1 + weight) scaling: not the LLaMA op
        def __init__(self, d):
            super().__init__()
            self.eps, self.weight = 1e-6, nn.Parameter(torch.zeros(d))

        def forward(self, x):
            return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * (1 + self.weight)

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm, self.act = GemmaRMSNorm(8), nn.SiLU()
            self.proj = nn.Linear(8, 8)

        def forward(self, x):
            a = self.act(x)
            return self.proj(self.norm(x)) * a + a  # silu has two users: not a SwiGLU

    class Tracer(fx.Tracer):
        def is_leaf_module(self, m, qualname):
            return isinstance(m, GemmaRMSNorm) or super().is_leaf_module(m, qualname)

    m = M()
    gm = fx.GraphModule(m, Tracer().trace(m))
    assert rewrite_fused(gm).meta["dipc.fused_ops"] == []
    assert rewrite_fused(fx.symbolic_trace(nn.Sequential(nn.LayerNorm((4, 8)))), ops={"layer_norm"}).meta[
        "dipc.fused_ops"] == []  # 2-D normalized shape


def test_switch_off(monkeypatch):
    block = nn.Sequential(nn.LayerNorm(8), nn.GELU())
    monkeypatch.setenv("DIPC_FUSED_KERNELS", "0")
    assert fuse_module(block) is block
    assert "dipc.fused_ops" not in rewrite_fused(fx.symbolic_trace(block)).meta
    with pytest.raises(ValueError, match="unknown ops"):
        rewrite_fused(fx.symbolic_trace(block), ops={"flash_attention"})


def test_fuse_module_swaps_leaves_sharing_parameters():
    block = make_example("vlm").model.language_model.layers[0]
    fused = fuse_module(block)
    assert isinstance(fused, type(block)) and fused is not block
    assert isinstance(fused.input_layernorm, FusedRMSNorm)
    assert fused.input_layernorm.weight is block.input_layernorm.weight
    assert isinstance(block.input_layernorm, RMSNorm), "fuse_module edited its input"
    assert list(fused.state_dict()) == list(block.state_dict())
    enc = fuse_module(make_example("vlm").model.vision.blocks[0])
    assert isinstance(enc.norm1, FusedLayerNorm) and isinstance(enc.mlp.act, FusedGELU)


@pytest.mark.parametrize("name", EXAMPLE_NAMES)
def test_fused_example_models_match(name, device):
    """Whole example models: same loss and gradients as the originals, Triton path taken."""
    ex = make_example(name, seed=0)
    model = ex.model.to(device)
    batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in ex.data.microbatches(1, 2)[0].items()}
    ref_model = copy.deepcopy(model)
    ref = ref_model(**batch)
    ref.backward()
    fused = fuse_module(model)
    _common.PATH_COUNTS.clear()
    loss = fused(**batch)
    loss.backward()
    assert _common.PATH_COUNTS[("rms_norm", "triton")] > 0 and _common.PATH_COUNTS[("rope", "triton")] > 0
    assert not [k for k in _common.PATH_COUNTS if k[1] == "torch"], dict(_common.PATH_COUNTS)
    ops = set(next(iter(fused._dipc_fused_graphs.values())).meta["dipc.fused_ops"])
    assert {"rope", "swiglu"} <= ops  # norms and GELU are already swapped for fused leaf modules
    if name != "t2v":
        assert "linear_cross_entropy" in ops
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    ref_grads = dict(ref_model.named_parameters())
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref_grads[n].grad, rtol=1e-4, atol=1e-6, msg=lambda m: f"{n}: {m}")


def test_fused_layer_specialises_on_call_arguments(device):
    """LlamaBlock branches on ``attn_mask is None``: the traced rewrite must follow the call."""
    torch.manual_seed(0)
    block = make_example("t2v").model.text_encoder.layers[0].to(device)
    fused = fuse_module(block)
    x = torch.randn(7, 32, device=device)
    cos, sin = torch.randn(7, 16, device=device), torch.randn(7, 16, device=device)
    mask = torch.rand(7, 7, device=device) > 0.3
    mask |= torch.eye(7, dtype=torch.bool, device=device)
    for args in [(x, cos, sin), (x, cos, sin, mask)]:
        torch.testing.assert_close(fused(*args), block(*args), rtol=1e-5, atol=1e-6)
    assert len(fused._dipc_fused_graphs) == 2


# ---- fallbacks and errors --------------------------------------------------------------------

def test_fallbacks_are_correct(device):
    w = torch.randn(9, device=device)
    for x in [torch.randn(4, 9, dtype=torch.float64, device=device),     # fp64: torch path
              torch.randn(9, 4, device=device).t(),                        # non-contiguous: copied
              torch.randn(0, 9, device=device)]:                           # empty
        ref = w.to(x.dtype) * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))
        torch.testing.assert_close(rms_norm(x, w.to(x.dtype), 1e-6), ref)
    m = FusedRMSNorm(nn.Parameter(torch.randn(9, device=device)), 1e-6)  # bf16 input, fp32 weight
    xb = torch.randn(4, 9, device=device).to(torch.bfloat16)
    torch.testing.assert_close(m(xb), RMSNorm(9).to(device).requires_grad_(False).__class__.forward(
        type("R", (), {"eps": 1e-6, "weight": m.weight})(), xb))
    q = torch.randn(2, 3, 5, 8, device=device)
    cos = torch.randn(5, 8, device=device, requires_grad=True)  # grads w.r.t. tables: torch path
    before = _common.PATH_COUNTS[("rope", "torch")]
    rope(q, cos, torch.randn(5, 8, device=device)).sum().backward()
    assert _common.PATH_COUNTS[("rope", "torch")] == before + 1 and cos.grad is not None


@pytest.mark.parametrize("call, message", [
    (lambda d: rms_norm(torch.randn(3, 8, device=d), torch.randn(8, device=d, dtype=torch.bfloat16)), "dtype"),
    (lambda d: rms_norm(torch.randn(3, 8, device=d), torch.randn(7, device=d)), "weight must be 1-D"),
    (lambda d: rms_norm(torch.randn(3, 8, device=d), torch.randn(8, device="meta")), "device"),
    (lambda d: layer_norm(torch.randn(3, 8, device=d), torch.randn(8, device=d), torch.randn(4, device=d)), "bias"),
    (lambda d: rms_norm(torch.ones(3, 8, dtype=torch.long, device=d), torch.ones(8, dtype=torch.long, device=d)),
     "floating-point"),
    (lambda d: rope(torch.randn(2, 3, 5, 7, device=d), torch.randn(5, 7, device=d), torch.randn(5, 7, device=d)),
     "odd"),
    (lambda d: fused_linear_cross_entropy(torch.randn(6, 8, device=d), torch.randn(11, 8, device=d),
                                          torch.arange(5, device=d)), "one target per row"),
    (lambda d: fused_linear_cross_entropy(torch.randn(6, 8, device=d), torch.randn(11, 9, device=d),
                                          torch.arange(6, device=d)), "weight must be"),
])
def test_bad_input_errors(call, message, device):
    from dipc.errors import DipcError

    with pytest.raises(DipcError, match=message):
        call(device)


def test_fused_layer_follows_swapped_parameters(device):
    """``torch.func.functional_call`` (how SEMU traces a layer) swaps a layer's Parameters; the
    fused layer's cached graph must use the swapped ones, not those it was traced with."""
    head = nn.Sequential(nn.LayerNorm(8), nn.Linear(8, 5)).to(device)
    fused = fuse_module(head[1])   # a leaf layer: its graph reads weight/bias through get_attr
    x = torch.randn(3, 8, device=device)
    torch.testing.assert_close(fused(x), head[1](x))   # traced and cached here
    new = {"weight": torch.randn(5, 8, device=device), "bias": torch.randn(5, device=device)}
    got = torch.func.functional_call(fused, new, (x,))
    torch.testing.assert_close(got, x @ new["weight"].t() + new["bias"])
    torch.testing.assert_close(fused(x), head[1](x))   # and back to its own afterwards
