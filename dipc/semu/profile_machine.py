"""Measure the machine dipc runs on and write a profile JSON (to be exposed as ``dipc profile``).

``measure_profile(path)`` times, with torch on the current device (CUDA if available, else CPU):

- matmul throughput per dtype over a ladder of square sizes: the best achieved FLOP/s is the
  dtype's "peak", and achieved / peak per size is the ``matmul`` efficiency curve (x = FLOPs);
- memory bandwidth: an out-of-place add (read 2, write 1) at the largest (out-of-cache) size of
  a ladder, best of several runs; the ladder gives the ``elementwise`` curve (x = bytes moved,
  cache-resident sizes clamped to 1);
- the per-op overhead: the time of an add on one-element tensors (launch + dispatch);
- on CPU, what torch's full checkpointing adds per op beyond the re-run (``ckpt_op_overhead``);
- on CPU, what torch's selective checkpointing adds per op (``sac_op_overhead``): the forward of
  a small transformer MLP block under selective vs full checkpointing, per op;
- memory capacity: the device's total memory (GPU) or the host's physical memory (CPU).

The ``attention`` and ``conv`` curves are taken from ``matmul`` and ``reduction`` from
``elementwise`` (they are not measured separately yet). Links are not measured: the profile
gets placeholder links (loopback for CPU ranks in one host, NVLink-class for GPUs) that the
SEMU calibration is meant to replace; the profile's ``source`` says so. Example::

    >>> from dipc.semu.profile_machine import measure_profile
    >>> cluster = measure_profile("this_machine.json", quick=True)  # doctest: +SKIP

``quick=True`` uses small sizes and few repeats (about 3 s on a CPU).
"""
from __future__ import annotations

import dataclasses
import math
import os
import platform
import time
from pathlib import Path

from dipc.semu.profiles import (ClusterProfile, DeviceProfile, EfficiencyCurve,
                                LinkProfile, load_profile, load_preset, save_profile)

__all__ = ["default_profile", "measure_ckpt_op_overhead", "measure_profile", "measure_sac_op_overhead"]


def _timer(device: str):
    import torch

    if device == "cuda":
        def sync() -> None:
            torch.cuda.synchronize()
    else:
        def sync() -> None:
            return None
    return sync


def _best_time(fn, sync, repeats: int, min_time: float) -> float:
    """Best per-call seconds over ``repeats`` batches, each run long enough to time reliably."""
    fn()
    sync()
    calls = 1
    while True:  # grow the batch until it takes min_time
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        sync()
        dt = time.perf_counter() - t0
        if dt >= min_time or calls >= 1 << 16:
            break
        calls *= 2
    best = dt / calls
    for _ in range(repeats - 1):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        sync()
        best = min(best, (time.perf_counter() - t0) / calls)
    return best


def _probe_block():
    """(block, input, ATen ops in its forward): a small RMSNorm + SwiGLU block, a transformer
    layer's op mix, wrapped in a :class:`~dipc.runtime.recompute.RecomputableLayer`."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    from dipc.runtime.recompute import RecomputableLayer

    class Block(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.gate, self.up = torch.nn.Linear(64, 172, bias=False), torch.nn.Linear(64, 172, bias=False)
            self.down = torch.nn.Linear(172, 64, bias=False)
            self.weight = torch.nn.Parameter(torch.ones(64))

        def forward(self, x):
            h = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.weight
            return x + self.down(torch.nn.functional.silu(self.gate(h)) * self.up(h))

    class Count(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.n += 1
            return func(*args, **(kwargs or {}))

    block = Block()
    x = torch.randn(2, 48, 64, requires_grad=True)
    with Count() as count:
        block(x)
    return RecomputableLayer(block), x, count.n


def measure_sac_op_overhead(repeats: int = 5, min_time: float = 0.05) -> float:
    """Seconds per op that torch's selective checkpointing adds on this CPU thread (SEMU charges
    it per op of the layer's forward, in the FWD and again in the re-run). Timed on the forward of
    :func:`_probe_block` under selective against full checkpointing: both skip autograd's saving,
    and the difference is the caching dispatch mode every op passes through; the re-run's mode is
    taken to cost the same per op. Best of ``repeats``."""
    from dipc.runtime.recompute import RecomputeMode

    layer, x, ops = _probe_block()
    sync = _timer("cpu")

    def forward(mode):
        def run() -> None:
            layer.mode = mode
            layer(x)
        return run

    selective = _best_time(forward(RecomputeMode.SELECTIVE), sync, repeats, min_time)
    full = _best_time(forward(RecomputeMode.FULL), sync, repeats, min_time)
    return max(selective - full, 0.0) / ops


def measure_ckpt_op_overhead(repeats: int = 5, min_time: float = 0.05) -> float:
    """Seconds per forward op that torch's full checkpointing adds on this CPU thread beyond the
    layer's re-run (SEMU charges it once per re-run): forward + backward of :func:`_probe_block`
    checkpointed, less the same uncheckpointed, less one forward (the re-run), per op. Measured
    here: ~10-20 us per op, against ~4-8 us for the op itself on such a block. Best of ``repeats``."""
    from dipc.runtime.recompute import RecomputeMode

    layer, x, ops = _probe_block()
    sync = _timer("cpu")

    def step(mode, backward: bool = True):
        def run() -> None:
            layer.mode = mode
            y = layer(x)
            if backward:
                y.sum().backward()
        return run

    plain = _best_time(step(RecomputeMode.OFF), sync, repeats, min_time)
    full = _best_time(step(RecomputeMode.FULL), sync, repeats, min_time)
    rerun = _best_time(step(RecomputeMode.OFF, backward=False), sync, repeats, min_time)
    return max(full - plain - rerun, 0.0) / ops


def _curve(points: list[tuple[float, float]]) -> EfficiencyCurve:
    """Monotone, strictly ascending, clamped to (0, 1] — measured noise must not break the format."""
    points = sorted(points)
    clean: list[tuple[float, float]] = []
    for size, eff in points:
        eff = min(1.0, max(eff, 1e-4))
        if clean and size <= clean[-1][0]:
            continue
        clean.append((size, eff))
    return EfficiencyCurve(points=tuple(clean))


def _measure_matmul(torch, device: str, dtype, sizes, sync, repeats, min_time):
    achieved = []
    for n in sizes:
        a = torch.randn(n, n, device=device).to(dtype)
        b = torch.randn(n, n, device=device).to(dtype)
        t = _best_time(lambda: torch.mm(a, b), sync, repeats, min_time)
        achieved.append((2.0 * n ** 3, 2.0 * n ** 3 / t))
    peak = max(f for _, f in achieved)
    return peak, [(flops, f / peak) for flops, f in achieved]


def measure_profile(path: str | Path | None = None, *, quick: bool = False,
                    device: str | None = None, name: str | None = None,
                    num_threads: int | None = 1) -> ClusterProfile:
    """Measure this machine, write the profile to ``path`` (if given) and return it.

    On CPU the profile describes one rank running ``num_threads`` torch threads (default 1: the
    CPU tests run one thread per rank, and the launcher gives each rank ``cores // world``).
    ``None`` keeps torch's current setting. Oversubscribed threads make small matmuls erratic
    (measured here: a 64x64 matmul took 7 ms with 2 threads on a 2-core quota, 6 us with 1).
    """
    import torch

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    saved_threads = torch.get_num_threads()
    if device == "cpu" and num_threads is not None:
        torch.set_num_threads(num_threads)
    try:
        return _measure(torch, path, quick=quick, device=device, name=name)
    finally:
        torch.set_num_threads(saved_threads)


def _measure(torch, path, *, quick: bool, device: str, name: str | None) -> ClusterProfile:
    sync = _timer(device)
    repeats, min_time = (2, 0.01) if quick else (5, 0.05)
    if device == "cuda":
        mm_sizes = [256, 512, 1024, 2048, 4096] if quick else [256, 512, 1024, 2048, 4096, 8192]
        dtypes = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
        ew_numels = [1 << k for k in (10, 14, 18, 22, 26)]
    else:
        mm_sizes = [32, 64, 128, 256] if quick else [32, 64, 128, 256, 512, 1024]
        # every dtype a CPU model may run in, quick or not: a profile without a model's dtype
        # cannot score it (pipe.plan(memory_limit=) measures the quick one for float64 tests)
        dtypes = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16}
        ew_numels = [1 << k for k in ((8, 12, 16, 20, 22) if quick else (8, 12, 16, 20, 23, 25))]

    main_dtype = "bfloat16" if device == "cuda" else "float32"  # the curve comes from this one
    peaks: dict[str, float] = {}
    matmul_curve: list[tuple[float, float]] = []
    for dname, dtype in dtypes.items():
        peak, curve = _measure_matmul(torch, device, dtype, mm_sizes, sync, repeats, min_time)
        peaks[dname] = peak
        if dname == main_dtype:
            matmul_curve = curve

    # elementwise: c = a + b moves 3 * numel * 4 bytes
    ew: list[tuple[float, float]] = []
    for numel in ew_numels:
        a = torch.randn(numel, device=device)
        b = torch.randn(numel, device=device)
        out = torch.empty_like(a)
        t = _best_time(lambda: torch.add(a, b, out=out), sync, repeats, min_time)
        ew.append((3.0 * numel * 4, 3.0 * numel * 4 / t))
    # memory bandwidth is what the largest (out-of-cache) size reaches; cache-resident sizes run
    # faster than that and are clamped to efficiency 1
    bandwidth = ew[-1][1]
    ew_curve = [(nbytes, bw / bandwidth) for nbytes, bw in ew]

    one_a = torch.ones(1, device=device)
    one_b = torch.ones(1, device=device)
    overhead = _best_time(lambda: torch.add(one_a, one_b), sync, repeats, min_time)

    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        capacity = float(props.total_memory)
        dev_name = props.name
        links = (LinkProfile(latency=5e-6, bandwidth=100e9), LinkProfile(latency=10e-6, bandwidth=25e9))
        gpus_per_node = max(1, torch.cuda.device_count())
        kind = "gpu"
    else:
        try:
            capacity = float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
        except (ValueError, OSError, AttributeError):
            capacity = 16 * 2**30
        dev_name = platform.processor() or platform.machine() or "cpu"
        # ranks on one host talk through loopback / shared memory: about a memory copy
        links = (LinkProfile(latency=50e-6, bandwidth=bandwidth / 3),
                 LinkProfile(latency=100e-6, bandwidth=1.25e9))
        gpus_per_node = max(1, os.cpu_count() or 1)  # CPU "devices" (gloo ranks) on this host
        kind = "cpu"
    # host-side Python per op: it adds to the op on one CPU thread; on a GPU it runs ahead of
    # the kernels, which the emulator does not model, so it stays 0 there
    sac = measure_sac_op_overhead(repeats, min_time) if device == "cpu" else 0.0
    ckpt = measure_ckpt_op_overhead(repeats, min_time) if device == "cpu" else 0.0

    curves = {
        "matmul": _curve(matmul_curve),
        "attention": _curve(matmul_curve),
        "conv": _curve(matmul_curve),
        "elementwise": _curve(ew_curve),
        "reduction": _curve(ew_curve),
    }
    host = platform.node() or "this machine"
    stamp = time.strftime("%Y-%m-%d %H:%M:%S")
    device_profile = DeviceProfile(
        name=f"{dev_name} ({device})", kind=kind, peak_flops=peaks, memory_bandwidth=bandwidth,
        memory_capacity=capacity, launch_overhead=overhead, efficiency=curves, sac_op_overhead=sac,
        ckpt_op_overhead=ckpt,
        source=f"measured on {host} at {stamp} with torch {torch.__version__}"
               f"{' (quick)' if quick else ''}, {torch.get_num_threads() if device == 'cpu' else 'all'} "
               "threads; peaks are the best measured matmul FLOP/s; "
               "attention/conv curves copy matmul, reduction copies elementwise",
    )
    cluster = ClusterProfile(
        name=name or f"measured-{device}", device=device_profile, gpus_per_node=gpus_per_node,
        intra_node=links[0], inter_node=links[1],
        source="device measured; links are placeholders (not measured yet), to be calibrated",
    )
    if path is not None:
        save_profile(cluster, path)
    if not all(math.isfinite(v) for v in peaks.values()):
        raise RuntimeError(f"measured non-finite peaks {peaks}")
    return cluster


# GPU name fragment -> preset, most specific first
_GPU_PRESETS = (("H800", "h800"), ("H200", "h200"), ("H100", "h100_sxm"), ("A100", "a100_80gb"))
_DEFAULTS: dict[str, ClusterProfile] = {}


def default_profile(device: str = "cpu") -> ClusterProfile:
    """The profile SEMU models a pipeline on when the caller names none (``pipe.plan(...,
    memory_limit=)``): ``$DIPC_PROFILE`` (a preset name or a profile JSON) if set; on a GPU the
    preset of its name, else the GPU measured; on CPU this machine measured (``quick``, ~3 s, once
    per process) with masked attention dense.

    Why not a GPU preset everywhere: peak memory depends on the device through masked attention.
    On CPU, torch's SDPA takes the mask as a dense float tensor and SEMU's peaks match the measured
    ones only when it is charged densely (this project's VM, 4 microbatches on 2 ranks: example VLM
    rank 0 measured 5.24 MiB, predicted 5.09 dense and 3.35 not; T2V rank 1 36.5 against 34.6 and
    22.1), as the profile calibration also found. A CPU plan fitted on the H800 preset could
    overshoot its limit by half.

    Each process measures its own, so under torchrun plan on one rank and broadcast the program
    (:func:`dipc.runtime.async_plan.broadcast_program`) or name a profile: ranks whose measurements
    differ may fit different plans (the distributed executor refuses mismatched plans before the
    first message)."""
    named = os.environ.get("DIPC_PROFILE")
    if named:
        return load_profile(named)
    kind = "cuda" if str(device).startswith("cuda") else "cpu"
    hit = _DEFAULTS.get(kind)
    if hit is None:
        if kind == "cuda":
            import torch

            name = torch.cuda.get_device_name()
            preset = next((p for frag, p in _GPU_PRESETS if frag in name), None)
            hit = load_preset(preset) if preset else measure_profile(quick=True, device="cuda")
        else:
            measured = measure_profile(quick=True, device="cpu")
            hit = dataclasses.replace(measured, device=dataclasses.replace(measured.device,
                                                                           dense_masked_attention=True))
        _DEFAULTS[kind] = hit
    return hit
