"""Shared plumbing of the fused kernels: the guarded triton import, the "can Triton run here?"
checker, launch-size choices and input validation.

Triton is optional at run time. If it fails to import, every kernel is off (one warning) and
each op runs its plain-torch reference, which defines the op's semantics. Triton *can* run on a
tensor when it is on a CUDA device, or on the CPU when the kernels were defined under the Triton
interpreter (``TRITON_INTERPRET=1`` must be set before this package is imported: triton reads it
when a kernel is defined).

Not handled: multi-config autotuning (it fails without a GPU), fp64 on GPU (falls back), and
tensors that need gradients w.r.t. rotary tables (RoPE falls back to torch for those).
"""
from __future__ import annotations

import collections
import logging
import os
from typing import Any

import torch
# The fused ops are torch custom ops, whose first call imports torch._dynamo. dipc's capture runs
# layers inside torch.fx tracing, which patches math.* while it traces; a first import of
# torch._dynamo there caches the patched functions in Dynamo's rules, and torch.compile later
# graph-breaks on math.log. Importing it here, before any tracing, keeps that from happening.
import torch._dynamo  # noqa: F401

from dipc.errors import DipcError

__all__ = [
    "HAS_TRITON",
    "INTERPRET",
    "KernelInputError",
    "PATH_COUNTS",
    "check_inputs",
    "is_traced",
    "next_pow2",
    "record_path",
    "triton",
    "tl",
    "triton_usable",
]

_log = logging.getLogger(__name__)

try:  # guarded import: kernels are simply off without triton
    import triton
    import triton.language as tl

    HAS_TRITON = True
except Exception as exc:  # pragma: no cover - exercised only on machines without triton
    triton = None  # type: ignore[assignment]
    tl = None  # type: ignore[assignment]
    HAS_TRITON = False
    _log.warning("dipc.kernels: triton unavailable (%s); fused ops run their torch fallback", exc)

# Triton reads TRITON_INTERPRET when a kernel is *defined*; record what our kernels were defined
# under so a later change of the variable cannot send a CPU tensor to a GPU-compiled kernel.
INTERPRET = HAS_TRITON and os.environ.get("TRITON_INTERPRET", "0") not in ("", "0", "false", "False")

_TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# Which path each op took ({(op, "triton"|"torch"): count}); tests assert the Triton path ran.
PATH_COUNTS: collections.Counter[tuple[str, str]] = collections.Counter()


def record_path(op: str, path: str) -> None:
    PATH_COUNTS[(op, path)] += 1


class KernelInputError(DipcError, ValueError):
    """A fused op got inputs it cannot accept (dtype/device mix, wrong shapes)."""


def triton_usable(*tensors: torch.Tensor | None) -> bool:
    """True when the fused op runs for these tensors: all of a dtype the kernels support, on a
    device Triton can drive in this process (CUDA, or the CPU under the interpreter).

    Fake and meta tensors (SEMU and torch.compile trace with them) answer for the device they
    stand for, with ``meta`` standing for a GPU: the fused op then appears as one ``torch.ops.dipc``
    node with its own cost entry, exactly as the real run will execute it. functorch transforms
    (vmap, grad) take the torch fallback, which they can trace through."""
    if not HAS_TRITON or os.environ.get("DIPC_DISABLE_TRITON", "0") not in ("", "0"):
        return False
    for t in tensors:
        if t is None:
            continue
        if t.dtype not in _TRITON_DTYPES:
            return False
        if torch._C._functorch.is_functorch_wrapped_tensor(t):
            return False
        kind = t.device.type
        if kind == "meta":
            continue
        if kind == "cuda":
            if INTERPRET:
                return False
        elif kind == "cpu":
            if not INTERPRET:
                return False
        else:
            return False
    return True


def is_traced(t: torch.Tensor) -> bool:
    """A fake or meta tensor (shape tracing): it has no values to check."""
    if t.device.type == "meta":
        return True
    from torch._subclasses.fake_tensor import FakeTensor

    return isinstance(t, FakeTensor)


def check_inputs(op: str, *named: tuple[str, Any]) -> None:
    """Every tensor argument on one device and of one floating dtype, or a clear error."""
    tensors = [(n, t) for n, t in named if isinstance(t, torch.Tensor)]
    if not tensors:
        return
    n0, t0 = tensors[0]
    for n, t in tensors[1:]:
        if t.device != t0.device:
            raise KernelInputError(
                f"{op}: {n} is on {t.device} but {n0} is on {t0.device}. "
                f"Fix: move all inputs of {op} to one device."
            )
        if t.dtype != t0.dtype:
            raise KernelInputError(
                f"{op}: {n} is {t.dtype} but {n0} is {t0.dtype}. "
                f"Fix: cast the inputs of {op} to one dtype (or run the unfused module)."
            )
    if not t0.is_floating_point():
        raise KernelInputError(f"{op}: {n0} is {t0.dtype}. Fix: pass floating-point tensors.")


def next_pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


# GPU launch parameters, read at every launch (the interpreter ignores warps and uses its own
# sizes). ``benchmarks/kernel_sweep.py`` times the alternatives on a GPU by changing these.
# Measured on H200s (benchmarks/results/kernels*.json, kernel_sweep.json): the norms with 4 warps
# and one persistent program per SM ran RMSNorm at 16384x4096 in 0.76 ms, against 1.20 ms with
# Liger's warp ladder (8 warps there) and 4 programs per SM; a sweep of one knob at a time was
# within its own noise (the same configuration measured 0.75 and 1.15 ms), so these stay.
LAUNCH: dict[str, int] = {
    "row_warps_max": 4,        # warps of a row kernel (norms): Liger's ladder by row width, capped here
    "persistent_per_sm": 1,    # programs per SM of the persistent norm backward kernels
    "ew_block": 1024,          # elements per program of the elementwise kernels (SwiGLU, GELU)
    "ew_warps": 4,
    "rope_rows": 2048,         # rotary: elements (rows x half-dim) per program
    "rope_warps": 4,
    "ce_block": 32768,         # fused cross-entropy: vocabulary entries per loop step of a row
    "ce_warps": 32,
}


def row_warps(block_n: int) -> int:
    """Warps for a kernel whose program holds ``block_n``-wide rows: more warps for wider rows so
    each thread keeps few values in registers (Liger-Kernel's ``calculate_settings`` ladder)."""
    w = 32 if block_n >= 32768 else 16 if block_n >= 8192 else 8 if block_n >= 2048 else 4
    return min(w, LAUNCH["row_warps_max"])


def rows_per_program(block_n: int) -> int:
    """Rows one program handles: a few on a GPU for small rows, many under the interpreter
    (each interpreted program instance costs milliseconds, so fewer, fatter programs win)."""
    budget = 32768 if INTERPRET else 4096
    return max(1, min(64 if INTERPRET else 16, budget // block_n))


def num_persistent_programs(num_tiles: int, device: torch.device) -> int:
    """Programs of a persistent (grid-stride) kernel: ``LAUNCH["persistent_per_sm"]`` per SM on a
    GPU, 2 under the interpreter."""
    if device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        return max(1, min(num_tiles, sms * LAUNCH["persistent_per_sm"]))
    return max(1, min(num_tiles, 2))
