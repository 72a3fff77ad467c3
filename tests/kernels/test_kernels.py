"""Each fused kernel, forward and backward, against a torch reference written here (not the one in
dipc.kernels), on awkward shapes, under the Triton interpreter on CPU (or on a GPU).

Tolerances (``torch.testing.assert_close``), per dtype, for outputs and gradients, compared with
the reference computed in float64 and cast back:

==========  ======  ======  ==========================================================
dtype       rtol    atol    why
==========  ======  ======  ==========================================================
float32     1e-5    1e-5    fp32 accumulation; only summation order differs
bfloat16    2e-2    3e-2    one bf16 rounding of the output (8-bit mantissa, eps 2^-8),
                            plus the reference's own rounding of intermediates
==========  ======  ======  ==========================================================

The fused linear + cross-entropy reduces over the vocabulary in fp32 and its weight gradient
sums over all rows, so for it atol is scaled by the reduction size (see ``_LOSS_TOL``).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dipc.kernels import _common
from dipc.kernels.activations import gelu, swiglu
from dipc.kernels.fused_linear_ce import fused_linear_cross_entropy
from dipc.kernels.layer_norm import layer_norm
from dipc.kernels.rms_norm import rms_norm
from dipc.kernels.rope import multi_axis_cos_sin, rope

pytestmark = pytest.mark.triton

TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.bfloat16: dict(rtol=2e-2, atol=3e-2)}
_LOSS_TOL = {torch.float32: dict(rtol=1e-4, atol=1e-5), torch.bfloat16: dict(rtol=3e-2, atol=3e-2)}
DTYPES = [torch.float32, torch.bfloat16]
SHAPES = [(1, 1), (3, 7), (5, 123, 123), (2, 65, 257)]


# ---- references, written independently of dipc.kernels -------------------------------------

def ref_rms_norm(x, w, eps):
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def ref_layer_norm(x, w, b, eps):
    mu = x.mean(-1, keepdim=True)
    var = (x - mu).pow(2).mean(-1, keepdim=True)
    y = (x - mu) / torch.sqrt(var + eps)
    return y * (w if w is not None else 1) + (b if b is not None else 0)


def ref_swiglu(a, b):
    return a * torch.sigmoid(a) * b


def ref_gelu(x, approximate):
    if approximate == "tanh":
        return 0.5 * x * (1 + torch.tanh(0.7978845608028654 * (x + 0.044715 * x**3)))
    return 0.5 * x * (1 + torch.erf(x / 2**0.5))


def ref_rope(x, cos, sin):
    half = x.shape[-1] // 2
    rot = torch.cat((-x[..., half:], x[..., :half]), -1)
    return x * cos.unsqueeze(-3) + rot * sin.unsqueeze(-3)


def ref_linear_ce(x, w, target, bias, ignore_index, reduction):
    logits = x @ w.t() + (bias if bias is not None else 0)
    return F.cross_entropy(logits, target, ignore_index=ignore_index, reduction=reduction)


# ---- harness --------------------------------------------------------------------------------

def _check(op, fused, ref, inputs, dtype, tol=None):
    """Run ``fused`` on ``inputs`` and ``ref`` on float64 copies; compare outputs and grads and
    assert the Triton path (not the fallback) ran."""
    tol = tol or TOL[dtype]
    ours = [t.detach().clone().requires_grad_(t.requires_grad) if isinstance(t, torch.Tensor) else t for t in inputs]
    theirs = [t.detach().double().requires_grad_(t.requires_grad)
              if isinstance(t, torch.Tensor) and t.is_floating_point() else t for t in inputs]
    before = _common.PATH_COUNTS[(op, "triton")]
    y = fused(*ours)
    assert _common.PATH_COUNTS[(op, "triton")] == before + 1, f"{op}: the Triton kernel did not run"
    y_ref = ref(*theirs)
    torch.testing.assert_close(y, y_ref.to(y.dtype), **tol)
    grad = torch.randn_like(y)
    y.backward(grad)
    y_ref.backward(grad.double())
    for i, (a, b) in enumerate(zip(ours, theirs)):
        if isinstance(a, torch.Tensor) and a.requires_grad:
            torch.testing.assert_close(a.grad, b.grad.to(a.grad.dtype), **tol, msg=lambda m: f"grad of input {i}: {m}")


def _randn(shape, dtype, device, grad=True, scale=1.0):
    return (torch.randn(shape, device=device) * scale).to(dtype).requires_grad_(grad)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_rms_norm(shape, dtype, device):
    torch.manual_seed(0)
    x, w = _randn(shape, dtype, device), _randn(shape[-1:], dtype, device)
    _check("rms_norm", lambda x, w: rms_norm(x, w, 1e-6), lambda x, w: ref_rms_norm(x, w, 1e-6), [x, w], dtype)


@pytest.mark.parametrize("affine", ["weight+bias", "none"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_layer_norm(shape, dtype, affine, device):
    torch.manual_seed(1)
    x = _randn(shape, dtype, device, scale=3.0) + 2.0  # non-zero mean
    x = x.detach().requires_grad_()
    w = _randn(shape[-1:], dtype, device) if affine != "none" else None
    b = _randn(shape[-1:], dtype, device) if affine != "none" else None
    _check("layer_norm", lambda x, w, b: layer_norm(x, w, b, 1e-5),
           lambda x, w, b: ref_layer_norm(x, w, b, 1e-5), [x, w, b], dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_swiglu(shape, dtype, device):
    torch.manual_seed(2)
    _check("swiglu", swiglu, ref_swiglu, [_randn(shape, dtype, device, scale=3), _randn(shape, dtype, device)], dtype)


@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_gelu(shape, dtype, approximate, device):
    torch.manual_seed(3)
    _check("gelu", lambda x: gelu(x, approximate), lambda x: ref_gelu(x, approximate),
           [_randn(shape, dtype, device, scale=3)], dtype)


def _tables(positions, head_dim, device):
    inv = 1.0 / (10000 ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    freqs = positions.float().unsqueeze(-1) * inv
    emb = torch.cat((freqs, freqs), -1).to(device)
    return emb.cos(), emb.sin()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["bhtd", "transposed_view", "per_sample_tables", "packed_3d"])
def test_rope(layout, dtype, device):
    torch.manual_seed(4)
    b, h, t, d = 2, 3, 11, 18  # odd sequence length, head_dim/2 = 9 is not a power of two
    cos, sin = _tables(torch.arange(t), d, device)
    if layout == "bhtd":
        x = _randn((b, h, t, d), dtype, device)
    elif layout == "transposed_view":  # what Attention produces: [B, T, H, D].transpose(1, 2)
        x = _randn((b, t, h, d), dtype, device, grad=False).transpose(1, 2).requires_grad_()
    elif layout == "per_sample_tables":
        cos, sin = _tables(torch.stack([torch.arange(t), torch.arange(t) + 5]), d, device)
        x = _randn((b, h, t, d), dtype, device)
    else:  # packed tokens, no batch dim: [H, T, D] with [T, D] tables
        x = _randn((h, t, d), dtype, device)
    _check("rope", lambda x: rope(x, cos, sin), lambda x: ref_rope(x, cos.double(), sin.double()), [x], dtype)


def test_multi_axis_rope_tables_and_kernel(device):
    """Video (t, h, w) positions: each band rotates by its own axis; one axis == 1-D RoPE."""
    torch.manual_seed(5)
    d = 16
    inv = 1.0 / (10000 ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
    pos1 = torch.arange(7)[:, None]
    cos1, sin1 = multi_axis_cos_sin(pos1, inv, [d // 2])
    cos_ref, sin_ref = _tables(torch.arange(7), d, "cpu")
    torch.testing.assert_close(cos1, cos_ref)
    torch.testing.assert_close(sin1, sin_ref)
    thw = torch.stack(torch.meshgrid(torch.arange(2), torch.arange(3), torch.arange(2), indexing="ij"), -1).reshape(-1, 3)
    cos, sin = multi_axis_cos_sin(thw, inv, [2, 3, 3])
    assert cos.shape == (12, d)
    band_axis = torch.tensor([0, 0, 1, 1, 1, 2, 2, 2])
    torch.testing.assert_close(cos[:, :8], torch.cos(thw[:, band_axis].float() * inv))
    x = _randn((2, 12, d), torch.float32, device)
    cos, sin = cos.to(device), sin.to(device)
    _check("rope", lambda x: rope(x, cos, sin), lambda x: ref_rope(x, cos.double(), sin.double()), [x], torch.float32)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", ["mean_chunked", "sum_bias", "one_row", "all_but_one_ignored"])
def test_fused_linear_cross_entropy(case, dtype, device):
    torch.manual_seed(6)
    n, d, v = 37, 24, 101
    bias = None
    reduction, chunk = "mean", 8
    if case == "sum_bias":
        reduction, chunk = "sum", None
        bias = _randn((v,), dtype, device)
    if case == "one_row":
        n = 1
    x, w = _randn((n, d), dtype, device), _randn((v, d), dtype, device, scale=0.3)
    target = torch.randint(0, v, (n,), device=device)
    if case == "mean_chunked":
        target[::5] = -100
    if case == "all_but_one_ignored":
        target[1:] = -100
    tol = dict(_LOSS_TOL[dtype])
    if reduction == "sum" and dtype == torch.bfloat16:
        tol["atol"] = 0.5  # bf16 logits; the loss and dW sum over 37 rows
    _check("fused_linear_cross_entropy",
           lambda x, w, b: fused_linear_cross_entropy(x, w, target, b, -100, reduction, chunk),
           lambda x, w, b: ref_linear_ce(x, w, target, b, -100, reduction), [x, w, bias], dtype, tol)


def test_fused_linear_cross_entropy_never_builds_full_logits(device):
    """With chunk_size=4 the largest [rows, vocab] float buffer is one chunk (4 x V)."""
    torch.manual_seed(7)
    x, w = _randn((40, 16), torch.float32, device), _randn((64, 16), torch.float32, device)
    target = torch.randint(0, 64, (40,), device=device)
    seen = []
    real_linear = F.linear

    def spy(inp, weight, bias=None):
        out = real_linear(inp, weight, bias)
        seen.append(tuple(out.shape))
        return out

    import dipc.kernels.fused_linear_ce as mod

    old = mod.F.linear
    mod.F.linear = spy
    try:
        fused_linear_cross_entropy(x, w, target, chunk_size=4).backward()
    finally:
        mod.F.linear = old
    assert seen and max(r for r, _ in seen) == 4


def test_fused_linear_cross_entropy_repeated_backward(device):
    """The op scales its kept gradients in place on the first backward (no weight-sized copy).
    A second backward through the same graph (the split backward's weight pass) must still get
    ``grad·g``, and what the first one handed out must not change when the second uses another g."""
    torch.manual_seed(8)
    x, w = _randn((12, 16), torch.float32, device), _randn((40, 16), torch.float32, device)
    target = torch.randint(0, 40, (12,), device=device)
    xs, ws = x.detach().requires_grad_(), w.detach().requires_grad_()
    ref_x, ref_w = torch.autograd.grad(ref_linear_ce(xs, ws, target, None, -100, "mean"), (xs, ws))
    x, w = x.detach().requires_grad_(), w.detach().requires_grad_()
    loss = fused_linear_cross_entropy(x, w, target)
    g1, g2 = torch.tensor(0.5, device=device), torch.tensor(3.0, device=device)
    first = torch.autograd.grad(loss, (x, w), g1, retain_graph=True)
    kept = [t.clone() for t in first]
    again = torch.autograd.grad(loss, (x, w), g1, retain_graph=True)
    other = torch.autograd.grad(loss, (x, w), g2)
    for got, ref in zip(first, (ref_x, ref_w)):
        torch.testing.assert_close(got, ref * 0.5, rtol=1e-4, atol=1e-6)
    for got, ref in zip(again, (ref_x, ref_w)):
        torch.testing.assert_close(got, ref * 0.5, rtol=1e-4, atol=1e-6)
    for got, ref in zip(other, (ref_x, ref_w)):
        torch.testing.assert_close(got, ref * 3.0, rtol=1e-4, atol=1e-6)
    for got, was in zip(first, kept):
        assert torch.equal(got, was), "a later backward changed gradients an earlier one handed out"
    assert w.dtype == first[1].dtype
