"""Issue 7's bad-input line: a wrong dtype/device mix, a non-contiguous tensor or a shape the
kernel does not support gets a clear error or a correct fallback, never a wrong result.

Three tables: inputs that must raise (with the op's name and a Fix), inputs the kernel cannot
take that must fall back to torch and match the reference, and non-contiguous views the Triton
path must read correctly (forward and gradients, against the reference on contiguous copies).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dipc.errors import DipcError
from dipc.kernels import _common
from dipc.kernels.activations import gelu, swiglu
from dipc.kernels.fused_linear_ce import fused_linear_cross_entropy
from dipc.kernels.layer_norm import layer_norm
from dipc.kernels.rms_norm import rms_norm
from dipc.kernels.rope import rope

pytestmark = pytest.mark.triton


def _r(*shape, dtype=torch.float32, device="cpu"):
    return torch.randn(*shape, device=device).to(dtype)


# ---- clear errors -----------------------------------------------------------------------------

_ERRORS = [
    ("layer_norm dtype mix", lambda d: layer_norm(_r(3, 8, device=d), _r(8, dtype=torch.bfloat16, device=d)),
     r"layer_norm: weight is torch.bfloat16 but x is torch.float32.*Fix"),
    ("swiglu dtype mix", lambda d: swiglu(_r(3, 8, device=d), _r(3, 8, dtype=torch.bfloat16, device=d)),
     r"swiglu: up is torch.bfloat16.*Fix"),
    ("swiglu device mix", lambda d: swiglu(_r(3, 8, device=d), _r(3, 8, device="meta")), r"swiglu: up is on meta.*Fix"),
    ("gelu integer input", lambda d: gelu(torch.ones(3, 8, dtype=torch.long, device=d)), r"gelu.*floating-point"),
    ("gelu bad approximate", lambda d: gelu(_r(3, 8, device=d), "sigmoid"), r"approximate='sigmoid'.*Fix"),
    ("rope table device", lambda d: rope(_r(2, 3, 5, 8, device=d), _r(5, 8, device="meta"), _r(5, 8, device="meta")),
     r"rope: cos is on meta.*Fix"),
    ("linear_ce weight dtype", lambda d: fused_linear_cross_entropy(_r(6, 8, device=d), _r(11, 8, dtype=torch.bfloat16,
                                                                                           device=d),
                                                                    torch.arange(6, device=d)),
     r"fused_linear_cross_entropy: weight is torch.bfloat16.*Fix"),
    ("linear_ce target device", lambda d: fused_linear_cross_entropy(_r(6, 8, device=d), _r(11, 8, device=d),
                                                                     torch.arange(6, device="meta")),
     r"target is on meta.*Fix"),
    ("linear_ce target >= vocab", lambda d: fused_linear_cross_entropy(_r(6, 8, device=d), _r(11, 8, device=d),
                                                                       torch.tensor([0, 1, 11, 2, 3, 4], device=d)),
     r"target 11 is outside \[0, 11\).*Fix"),
    ("linear_ce negative target", lambda d: fused_linear_cross_entropy(_r(6, 8, device=d), _r(11, 8, device=d),
                                                                       torch.tensor([0, -3, 1, 2, 3, 4], device=d)),
     r"target -3 is outside"),
    ("linear_ce chunk size", lambda d: fused_linear_cross_entropy(_r(6, 8, device=d), _r(11, 8, device=d),
                                                                  torch.arange(6, device=d), chunk_size=0),
     r"chunk_size=0.*Fix"),
]


@pytest.mark.parametrize("call, message", [c[1:] for c in _ERRORS], ids=[c[0] for c in _ERRORS])
def test_bad_inputs_raise_clear_errors(call, message, device):
    with pytest.raises(DipcError, match=message):
        call(device)


def test_ignored_targets_are_not_range_checked(device):
    x, w = _r(4, 8, device=device), _r(11, 8, device=device)
    target = torch.tensor([1, -100, 3, -100], device=device)
    torch.testing.assert_close(fused_linear_cross_entropy(x, w, target),
                               F.cross_entropy(x @ w.t(), target, ignore_index=-100), rtol=1e-5, atol=1e-5)


# ---- unsupported by the kernel: torch fallback, same result ---------------------------------

def _rms_ref(x, w, eps=1e-6):
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


_FALLBACKS = [
    ("rms_norm fp64", "rms_norm", lambda d: (rms_norm, (_r(4, 9, dtype=torch.float64, device=d),
                                                        _r(9, dtype=torch.float64, device=d)), _rms_ref)),
    ("rms_norm rows wider than 65536", "rms_norm",
     lambda d: (rms_norm, (_r(2, 65537, device=d), _r(65537, device=d)), _rms_ref)),
    ("layer_norm fp64", "layer_norm",
     lambda d: (layer_norm, (_r(4, 9, dtype=torch.float64, device=d),),
                lambda x: F.layer_norm(x, (9,), eps=1e-5))),
    ("swiglu broadcast", "swiglu",
     lambda d: (swiglu, (_r(4, 8, device=d), _r(1, 8, device=d)), lambda a, b: F.silu(a) * b)),
    ("swiglu empty", "swiglu",
     lambda d: (swiglu, (_r(0, 8, device=d), _r(0, 8, device=d)), lambda a, b: F.silu(a) * b)),
    ("gelu fp64", "gelu", lambda d: (gelu, (_r(5, 7, dtype=torch.float64, device=d),), F.gelu)),
    ("rope tables with grad", "rope",
     lambda d: (rope, (_r(2, 3, 5, 8, device=d), _r(5, 8, device=d).requires_grad_(),
                       _r(5, 8, device=d)),
                lambda x, c, s: x * c + torch.cat((-x[..., 4:], x[..., :4]), -1) * s)),
    ("linear_ce reduction none", "fused_linear_cross_entropy",
     lambda d: (lambda x, w, t: fused_linear_cross_entropy(x, w, t, reduction="none"),
                (_r(6, 8, device=d), _r(11, 8, device=d), torch.arange(6, device=d)),
                lambda x, w, t: F.cross_entropy(x @ w.t(), t, reduction="none"))),
    ("linear_ce fp64", "fused_linear_cross_entropy",
     lambda d: (fused_linear_cross_entropy, (_r(6, 8, dtype=torch.float64, device=d),
                                             _r(11, 8, dtype=torch.float64, device=d), torch.arange(6, device=d)),
                lambda x, w, t: F.cross_entropy(x @ w.t(), t))),
]


@pytest.mark.parametrize("make, op", [(c[2], c[1]) for c in _FALLBACKS], ids=[c[0] for c in _FALLBACKS])
def test_unsupported_inputs_fall_back_correctly(make, op, device):
    fused, args, ref = make(device)
    before = _common.PATH_COUNTS[(op, "torch")]
    got = fused(*args)
    assert _common.PATH_COUNTS[(op, "torch")] == before + 1, f"{op}: expected the torch fallback"
    torch.testing.assert_close(got, ref(*args).to(got.dtype), rtol=1e-5, atol=1e-5)


# ---- non-contiguous views: the Triton path reads them correctly -------------------------------

def _rope_ref(x, c, s):
    return x * c + torch.cat((-x[..., 4:], x[..., :4]), -1) * s


def _halves(t):
    return t.chunk(2, dim=-1)


_VIEWS = [   # (id, op, fused(*args), args (views), reference(*args), which args get gradients)
    ("rms_norm transposed", "rms_norm", rms_norm,
     lambda d: [torch.randn(9, 5, device=d).t(), torch.randn(9, device=d)], _rms_ref, (True, True)),
    ("layer_norm column slice", "layer_norm", layer_norm,
     lambda d: [torch.randn(5, 20, device=d)[:, 3:12], torch.randn(9, device=d), torch.randn(9, device=d)],
     lambda x, w, b: F.layer_norm(x, (9,), w, b), (True, True, True)),
    ("swiglu halves of one tensor", "swiglu", lambda t: swiglu(*_halves(t)),
     lambda d: [torch.randn(6, 16, device=d)], lambda t: F.silu(_halves(t)[0]) * _halves(t)[1], (True,)),
    ("gelu strided", "gelu", lambda x: gelu(x, "tanh"),
     lambda d: [torch.randn(6, 14, device=d)[:, ::2]], lambda x: F.gelu(x, approximate="tanh"), (True,)),
    ("rope strided head dim", "rope", rope,
     lambda d: [torch.randn(2, 3, 5, 16, device=d)[..., ::2], torch.randn(5, 8, device=d),
                torch.randn(5, 8, device=d)], _rope_ref, (True, False, False)),
    ("linear_ce transposed x", "fused_linear_cross_entropy",
     lambda x, w: fused_linear_cross_entropy(x, w, torch.arange(6, device=x.device) % 11),
     lambda d: [torch.randn(8, 6, device=d).t(), torch.randn(11, 8, device=d)],
     lambda x, w: F.cross_entropy(x @ w.t(), torch.arange(6, device=x.device) % 11), (True, True)),
]


@pytest.mark.parametrize("op, fused, make, ref, grads", [c[1:] for c in _VIEWS], ids=[c[0] for c in _VIEWS])
def test_non_contiguous_inputs_take_the_kernel_and_match(op, fused, make, ref, grads, device):
    args = make(device)
    mine = [a.detach().requires_grad_(g) for a, g in zip(args, grads)]
    theirs = [a.detach().contiguous().requires_grad_(g) for a, g in zip(args, grads)]
    before = _common.PATH_COUNTS[(op, "triton")]
    out = fused(*mine)
    assert _common.PATH_COUNTS[(op, "triton")] == before + 1, f"{op}: the Triton path did not run"
    expected = ref(*theirs)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    grad = torch.randn_like(out)
    out.backward(grad)
    expected.backward(grad)
    for a, b in zip(mine, theirs):
        if a.requires_grad:
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-5)
