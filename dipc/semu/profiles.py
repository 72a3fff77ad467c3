"""Device and cluster profiles: what SEMU knows about the hardware, as validated JSON.

A :class:`DeviceProfile` holds one accelerator's (or CPU's) peak FLOP/s per dtype, memory
bandwidth and capacity, kernel launch overhead, and per-op-class efficiency curves; a
:class:`ClusterProfile` adds how devices are wired (GPUs per node, intra- and inter-node link
latency and bandwidth). Presets for common GPUs live in ``dipc/semu/presets/*.json`` (published
specifications); :func:`dipc.semu.profile_machine.measure_profile` measures the machine it runs on.

Units are SI throughout: seconds, bytes, bytes/s, FLOP/s. Link bandwidth is what one point-to-point
transfer achieves in one direction (NVIDIA quotes NVLink as the bidirectional aggregate, which is
twice that). Example::

    >>> from dipc.semu.profiles import load_preset
    >>> cluster = load_preset("h800")
    >>> cluster.device.peak_flops["bfloat16"] / 1e12
    989.4
    >>> round(cluster.transfer_time(0, 1, 100e6) * 1e3, 3)  # 100 MB over NVLink, in ms
    0.503

The JSON layout (``format: dipc-profile``, ``version: 1``) is exactly the dataclass fields;
:func:`profile_from_json` rejects anything else with an error that names the bad field
(``device.efficiency.matmul.points[2]: ...``). Not modelled (yet): contention between concurrent
transfers that share a NIC or NVSwitch port, collectives (the caller times REDUCE), and
frequency/thermal effects; efficiency curves of the presets are uncalibrated defaults.
"""
from __future__ import annotations

import bisect
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dipc.errors import DipcError
from dipc.ir import Op

_OP_NAMES = tuple(op.value for op in Op)
_KIND_OPS = ("FWD", "BWD", "BWD_I", "BWD_W")   # the compute instruction kinds

__all__ = [
    "DTYPE_BYTES",
    "OP_CLASSES",
    "ClusterProfile",
    "DeviceProfile",
    "EfficiencyCurve",
    "LinkProfile",
    "ProfileError",
    "list_presets",
    "load_preset",
    "load_profile",
    "profile_from_json",
    "profile_to_json",
    "save_profile",
]

PROFILE_FORMAT = "dipc-profile"
PROFILE_VERSION = 1
PRESET_DIR = Path(__file__).with_name("presets")

OP_CLASSES: dict[str, str] = {
    "matmul": "flops",       # GEMMs (linear layers, batched matmuls): efficiency vs FLOPs of the op
    "attention": "flops",    # fused attention (flash/SDPA): efficiency vs FLOPs of the op
    "conv": "flops",         # convolutions (patch embeddings, video VAEs)
    "elementwise": "bytes",  # pointwise ops: efficiency of memory bandwidth vs bytes moved
    "reduction": "bytes",    # norms, softmax, reductions: bandwidth efficiency vs bytes moved
}
"""Op classes a profile must cover, and the unit of their efficiency curve's x axis."""

DTYPE_BYTES: dict[str, int] = {
    "float64": 8, "float32": 4, "tfloat32": 4, "float16": 2, "bfloat16": 2,
    "float8_e4m3fn": 1, "float8_e5m2": 1, "int64": 8, "int32": 4, "int16": 2, "int8": 1,
    "uint8": 1, "bool": 1,
}
"""Bytes per element of the dtype names ``TensorSpec.dtype`` uses (torch's names)."""


class ProfileError(DipcError, ValueError):
    """A profile is malformed, or names an unknown preset, dtype or op class."""


def _fail(path: str, problem: str, fix: str) -> ProfileError:
    return ProfileError(f"profile field '{path}': {problem}. Fix: {fix}.")


def _positive(path: str, value: Any, *, allow_zero: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise _fail(path, f"expected a finite number, got {value!r}", "write a number in SI units")
    if value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise _fail(path, f"expected a number {bound}, got {value!r}", f"use a value {bound}")
    return float(value)


def _integer(path: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise _fail(path, f"expected a positive integer, got {value!r}", "use an integer >= 1")
    return value


P2P_MODES = ("eager", "rendezvous", "handshake")   # dipc.semu.emulator.simulate's p2p


def _p2p(path: str, value: Any) -> str:
    if value not in P2P_MODES:
        raise _fail(path, f"expected one of {', '.join(P2P_MODES)}, got {value!r}",
                    "use eager (NCCL-like), rendezvous or handshake (gloo)")
    return value


def _count(path: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise _fail(path, f"expected an integer >= 0, got {value!r}", "use an integer >= 0")
    return value


def _string(path: str, value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise _fail(path, f"expected a non-empty string, got {value!r}", "write a string")
    return value


def _object(path: str, value: Any, required: tuple[str, ...], optional: tuple[str, ...] = ()) -> dict:
    if not isinstance(value, Mapping):
        raise _fail(path or "<root>", f"expected an object, got {type(value).__name__}",
                    "write a JSON object")
    prefix = f"{path}." if path else ""
    missing = [k for k in required if k not in value]
    if missing:
        raise _fail(prefix + missing[0], "missing", f"add it (required keys: {', '.join(required)})")
    unknown = sorted(set(value) - set(required) - set(optional))
    if unknown:
        raise _fail(prefix + unknown[0], "unknown key",
                    f"remove it or use one of {', '.join(required + optional)}")
    return dict(value)


# ------------------------------------------------------------------------------------------------
# value types


@dataclass(frozen=True, slots=True, kw_only=True)
class EfficiencyCurve:
    """Fraction of peak an op class reaches, as a function of the op's size.

    ``points`` are ``(size, efficiency)`` pairs with sizes strictly ascending and efficiencies in
    ``(0, 1]``; between points the curve is linear in ``log10(size)``, outside it is clamped to
    the end values. ``size`` is in FLOPs or bytes (see :data:`OP_CLASSES`).
    """

    points: tuple[tuple[float, float], ...]
    _xs: tuple[float, ...] = field(init=False, repr=False, compare=False, default=())

    def __post_init__(self) -> None:
        points = _check_curve("efficiency", self.points)
        object.__setattr__(self, "points", points)
        object.__setattr__(self, "_xs", tuple(math.log10(s) for s, _ in points))

    def __call__(self, size: float) -> float:
        pts = self.points
        if size <= pts[0][0]:
            return pts[0][1]
        if size >= pts[-1][0]:
            return pts[-1][1]
        xs = self._xs
        x = math.log10(size)
        i = bisect.bisect_right(xs, x)
        x0, x1 = xs[i - 1], xs[i]
        e0, e1 = pts[i - 1][1], pts[i][1]
        return e0 + (e1 - e0) * (x - x0) / (x1 - x0)


def _check_curve(path: str, points: Any) -> tuple[tuple[float, float], ...]:
    if not isinstance(points, (list, tuple)) or not points:
        raise _fail(path + ".points", f"expected a non-empty list of [size, efficiency], got {points!r}",
                    "give at least one point")
    out = []
    for i, pt in enumerate(points):
        p = f"{path}.points[{i}]"
        if not isinstance(pt, (list, tuple)) or len(pt) != 2:
            raise _fail(p, f"expected [size, efficiency], got {pt!r}", "write a pair of numbers")
        size = _positive(p + "[0]", pt[0])
        eff = _positive(p + "[1]", pt[1])
        if eff > 1:
            raise _fail(p + "[1]", f"efficiency {eff} is above 1", "efficiency is a fraction of peak in (0, 1]")
        if out and size <= out[-1][0]:
            raise _fail(p + "[0]", f"size {size:g} is not above the previous point's {out[-1][0]:g}",
                        "list points with strictly ascending sizes")
        out.append((size, eff))
    return tuple(out)


@dataclass(frozen=True, slots=True, kw_only=True)
class LinkProfile:
    """One kind of point-to-point link: ``latency`` (s) and one-direction ``bandwidth`` (bytes/s)."""

    latency: float
    bandwidth: float

    def __post_init__(self) -> None:
        _positive("latency", self.latency, allow_zero=True)
        _positive("bandwidth", self.bandwidth)

    def transfer_time(self, num_bytes: float) -> float:
        return self.latency + num_bytes / self.bandwidth


@dataclass(frozen=True, slots=True, kw_only=True)
class DeviceProfile:
    """One device: peaks, memory, launch overhead and per-op-class efficiency curves.

    ``peak_flops``: dense FLOP/s per dtype name (``"bfloat16"``, ``"float32"``, ...).
    ``memory_bandwidth``: bytes/s; ``memory_capacity``: bytes; ``launch_overhead``: seconds per
    kernel. ``efficiency``: one :class:`EfficiencyCurve` per class of :data:`OP_CLASSES`.
    ``source``: where the numbers come from (a datasheet, or ``measured on <host>``).

    Calibration knobs (:mod:`dipc.semu.calibrate` fits them; 0/False in the GPU presets, which
    keeps the plain roofline): ``op_overhead``: seconds per ATen op a layer dispatches (the
    symbolic trace counts them; on CPU eager dispatch, not FLOPs, dominates small layers);
    ``instruction_overhead``: seconds per compute instruction (the interpreter and the stage's
    glue between layers, which the cost model does not count); ``dense_masked_attention``: a
    masked attention over packed sequences costs the dense ``(ΣL)²`` pairs (CPU SDPA's math path)
    rather than the attended ``ΣL²`` (a varlen flash kernel). ``op_overheads``: seconds per
    instruction of the named op (``FWD``, ``BWD``, ``BWD_I``, ``BWD_W``, ``LOAD``, ``SEND_ACT``,
    ``RECV_ACT``, ...), in place of ``instruction_overhead`` for those ops; the interpreter's work
    around a backward (gathering gradients, delivering input grads) differs from a forward's, and
    sends and receives pack and copy their tensors on the rank's CPU. ``probs_fwd_byte_time`` /
    ``probs_bwd_byte_time``: seconds per byte of the dense softmax probabilities a materialising
    masked-attention kernel writes (``LayerCost.attn_probs_bytes``; with ``dense_masked_attention``):
    the mask and softmax passes over ``H·ΣL²`` elements that the FLOP count does not see.
    ``kind_op_overheads``: seconds per ATen op by compute instruction kind (``FWD``, ``BWD``,
    ``BWD_I``, ``BWD_W``), charged per instruction on the ops its stage dispatches, in place of
    ``op_overhead`` for those kinds: a split backward's BWD_I also walks the autograd graph in
    Python (:mod:`dipc.runtime.split_backward`), so its cost per op is not a forward's.
    ``bytes_mode``: how a layer's memory-traffic time combines with its compute time, the
    :class:`~dipc.semu.step_model.StepModel` default: ``"max"`` (the roofline; a GPU overlaps
    them) or ``"sum"`` (they add up: one CPU thread, as calibration fits them).
    ``recv_wake_latency``: seconds a rank blocked in a receive takes to run again once its message
    has arrived (the emulator's ``wake_latency``; :mod:`dipc.semu.calibrate_dist` fits it for a
    multi-process CPU executor, where a woken thread may wait for the OS or, on a virtual machine,
    for the host to resume a halted vCPU). 0 on the GPU presets.
    ``sac_op_overhead``: seconds per ATen op of a selectively checkpointed layer (``<layer>~sel``),
    in its forward and again in its re-run: torch's selective checkpointing routes every op
    through Python dispatch modes (a policy call, caching the kept outputs, handing them back).
    On one CPU thread it adds to the op (``dipc profile`` measures it: ~25 us here, more than the
    op itself on small layers, so selective loses to full recomputation there); 0 on the GPU
    presets, where it is host time that runs ahead of long kernels (not measured on a GPU yet).
    ``ckpt_op_overhead``: seconds per ATen op of a fully checkpointed layer's forward that torch's
    (non-reentrant) checkpointing adds beyond the layer's re-run: a saved-tensor hook per saved
    tensor in the forward, unpacking and re-recording the autograd graph in the backward. Charged
    once per re-run. On one CPU thread ``dipc profile`` measures ~10-20 us per op, which on small
    layers is more than the re-run itself; 0 on the GPU presets (host time under long kernels).
    ``colocated_slowdown``: how much slower a compute instruction runs while other ranks on its
    node compute at the same moment: ``1 + s x`` the overlapped fraction of its span
    (:mod:`dipc.semu.contention`; ranks sharing a CPU's caches and memory bandwidth).
    :mod:`dipc.semu.calibrate_dist` fits it for a multi-process CPU executor; 0 on the GPU presets.
    """

    name: str
    kind: str = "gpu"
    peak_flops: Mapping[str, float]
    memory_bandwidth: float
    memory_capacity: float
    launch_overhead: float
    efficiency: Mapping[str, EfficiencyCurve]
    source: str = ""
    op_overhead: float = 0.0
    instruction_overhead: float = 0.0
    dense_masked_attention: bool = False
    op_overheads: Mapping[str, float] = field(default_factory=dict)
    probs_fwd_byte_time: float = 0.0
    probs_bwd_byte_time: float = 0.0
    kind_op_overheads: Mapping[str, float] = field(default_factory=dict)
    bytes_mode: str = "max"
    recv_wake_latency: float = 0.0
    sac_op_overhead: float = 0.0
    ckpt_op_overhead: float = 0.0
    colocated_slowdown: float = 0.0

    def __post_init__(self) -> None:
        _string("device.name", self.name)
        if self.bytes_mode not in ("max", "sum"):
            raise _fail("device.bytes_mode", f"expected 'max' or 'sum', got {self.bytes_mode!r}",
                        "use max (compute and memory traffic overlap) or sum (they add up)")
        for op, v in self.kind_op_overheads.items():
            if op not in _KIND_OPS:
                raise _fail(f"device.kind_op_overheads.{op}", "unknown instruction kind", f"use {', '.join(_KIND_OPS)}")
            _positive(f"device.kind_op_overheads.{op}", v, allow_zero=True)
        for op, v in self.op_overheads.items():
            _positive(f"device.op_overheads.{op}", v, allow_zero=True)
        _positive("device.probs_fwd_byte_time", self.probs_fwd_byte_time, allow_zero=True)
        _positive("device.probs_bwd_byte_time", self.probs_bwd_byte_time, allow_zero=True)
        _positive("device.op_overhead", self.op_overhead, allow_zero=True)
        _positive("device.instruction_overhead", self.instruction_overhead, allow_zero=True)
        _positive("device.recv_wake_latency", self.recv_wake_latency, allow_zero=True)
        _positive("device.sac_op_overhead", self.sac_op_overhead, allow_zero=True)
        _positive("device.ckpt_op_overhead", self.ckpt_op_overhead, allow_zero=True)
        _positive("device.colocated_slowdown", self.colocated_slowdown, allow_zero=True)
        if not isinstance(self.dense_masked_attention, bool):
            raise _fail("device.dense_masked_attention", f"expected true or false, got {self.dense_masked_attention!r}",
                        "write a JSON boolean")
        if self.kind not in ("gpu", "cpu"):
            raise _fail("device.kind", f"expected 'gpu' or 'cpu', got {self.kind!r}", "use gpu or cpu")
        if not self.peak_flops:
            raise _fail("device.peak_flops", "empty", "give at least one dtype's peak FLOP/s")
        for dtype, value in self.peak_flops.items():
            if dtype not in DTYPE_BYTES:
                raise _fail(f"device.peak_flops.{dtype}", "unknown dtype",
                            f"use torch dtype names: {', '.join(DTYPE_BYTES)}")
            _positive(f"device.peak_flops.{dtype}", value)
        _positive("device.memory_bandwidth", self.memory_bandwidth)
        _positive("device.memory_capacity", self.memory_capacity)
        _positive("device.launch_overhead", self.launch_overhead, allow_zero=True)
        missing = [c for c in OP_CLASSES if c not in self.efficiency]
        if missing:
            raise _fail(f"device.efficiency.{missing[0]}", "missing",
                        f"give a curve for every op class: {', '.join(OP_CLASSES)}")
        unknown = sorted(set(self.efficiency) - set(OP_CLASSES))
        if unknown:
            raise _fail(f"device.efficiency.{unknown[0]}", "unknown op class",
                        f"use one of {', '.join(OP_CLASSES)}")

    def peak(self, dtype: str) -> float:
        """Peak FLOP/s for ``dtype``; an unknown dtype raises with the known ones."""
        try:
            return self.peak_flops[dtype]
        except KeyError:
            raise ProfileError(f"device {self.name!r} has no peak FLOP/s for dtype {dtype!r}. "
                               f"Fix: use one of {', '.join(self.peak_flops)} or add it to the "
                               f"profile's peak_flops.") from None

    def op_time(self, op_class: str, *, flops: float = 0.0, bytes_moved: float = 0.0,
                dtype: str = "bfloat16", num_kernels: int = 1) -> float:
        """Roofline time of one op: ``max(flops / (peak * eff), bytes / (bw * eff)) + launches``.

        A compute class (matmul, attention, conv) applies its curve to the FLOP term (x = FLOPs)
        and takes the bandwidth term at full bandwidth; a memory class (elementwise, reduction)
        applies its curve to the bandwidth term (x = bytes).
        """
        try:
            unit = OP_CLASSES[op_class]
        except KeyError:
            raise ProfileError(f"unknown op class {op_class!r}. Fix: use one of "
                               f"{', '.join(OP_CLASSES)}.") from None
        curve = self.efficiency[op_class]
        if unit == "flops":
            t_compute = flops / (self.peak(dtype) * curve(flops)) if flops > 0 else 0.0
            t_memory = bytes_moved / self.memory_bandwidth
        else:
            t_compute = flops / self.peak(dtype) if flops > 0 else 0.0
            t_memory = bytes_moved / (self.memory_bandwidth * curve(bytes_moved)) if bytes_moved > 0 else 0.0
        return max(t_compute, t_memory) + num_kernels * self.launch_overhead


@dataclass(frozen=True, slots=True, kw_only=True)
class ClusterProfile:
    """Devices and their wiring. Global GPU ``g`` sits on node ``g // gpus_per_node``.

    A pipeline rank may span several GPUs (tensor parallelism): ``node_of(rank, gpus_per_rank)``
    places rank ``r`` on GPUs ``r * gpus_per_rank ...``, so transfers between ranks on the same
    node use ``intra_node`` and the others ``inter_node``.
    """

    name: str
    device: DeviceProfile
    gpus_per_node: int
    intra_node: LinkProfile
    inter_node: LinkProfile
    source: str = ""
    # how the runtime this profile describes moves a message: the emulator's ``p2p`` mode and the
    # compute instructions a receive is posted ahead (:func:`dipc.ir.posting.receives_ahead`), the
    # defaults of StepModel.simulate. Presets: "eager", 0 (an ideal runtime); a profile fitted to
    # dipc's gloo executor (calibrate_distributed): "handshake" and the runtime's look-ahead.
    p2p: str = "eager"
    recv_lookahead: int = 0

    def __post_init__(self) -> None:
        _string("name", self.name)
        _integer("gpus_per_node", self.gpus_per_node)
        _p2p("p2p", self.p2p)
        _count("recv_lookahead", self.recv_lookahead)

    def node_of(self, rank: int, gpus_per_rank: int = 1) -> int:
        return (rank * gpus_per_rank) // self.gpus_per_node

    def link(self, src: int, dst: int, gpus_per_rank: int = 1) -> LinkProfile:
        same = self.node_of(src, gpus_per_rank) == self.node_of(dst, gpus_per_rank)
        return self.intra_node if same else self.inter_node

    def transfer_time(self, src: int, dst: int, num_bytes: float, gpus_per_rank: int = 1) -> float:
        """Seconds to move ``num_bytes`` from rank ``src`` to rank ``dst`` (latency + bytes / bw)."""
        return self.link(src, dst, gpus_per_rank).transfer_time(num_bytes)


# ------------------------------------------------------------------------------------------------
# JSON


def _curve_to_json(c: EfficiencyCurve) -> list[list[float]]:
    return [[s, e] for s, e in c.points]


def profile_to_json(profile: ClusterProfile | DeviceProfile) -> dict[str, Any]:
    """A ``json.dumps``-ready dict; :func:`profile_from_json` is its inverse."""
    if isinstance(profile, DeviceProfile):
        return {"format": PROFILE_FORMAT, "version": PROFILE_VERSION, "device": _device_to_json(profile)}
    return {
        "format": PROFILE_FORMAT, "version": PROFILE_VERSION, "name": profile.name,
        "source": profile.source, "gpus_per_node": profile.gpus_per_node,
        "intra_node": {"latency": profile.intra_node.latency, "bandwidth": profile.intra_node.bandwidth},
        "inter_node": {"latency": profile.inter_node.latency, "bandwidth": profile.inter_node.bandwidth},
        **({"p2p": profile.p2p} if profile.p2p != "eager" else {}),
        **({"recv_lookahead": profile.recv_lookahead} if profile.recv_lookahead else {}),
        "device": _device_to_json(profile.device),
    }


def _device_to_json(d: DeviceProfile) -> dict[str, Any]:
    return {"name": d.name, "kind": d.kind, "source": d.source, "peak_flops": dict(d.peak_flops),
            "memory_bandwidth": d.memory_bandwidth, "memory_capacity": d.memory_capacity,
            "launch_overhead": d.launch_overhead,
            "efficiency": {k: _curve_to_json(v) for k, v in d.efficiency.items()},
            **({"op_overhead": d.op_overhead} if d.op_overhead else {}),
            **({"instruction_overhead": d.instruction_overhead} if d.instruction_overhead else {}),
            **({"dense_masked_attention": True} if d.dense_masked_attention else {}),
            **({"op_overheads": dict(d.op_overheads)} if d.op_overheads else {}),
            **({"probs_fwd_byte_time": d.probs_fwd_byte_time} if d.probs_fwd_byte_time else {}),
            **({"probs_bwd_byte_time": d.probs_bwd_byte_time} if d.probs_bwd_byte_time else {}),
            **({"kind_op_overheads": dict(d.kind_op_overheads)} if d.kind_op_overheads else {}),
            **({"bytes_mode": d.bytes_mode} if d.bytes_mode != "max" else {}),
            **({"recv_wake_latency": d.recv_wake_latency} if d.recv_wake_latency else {}),
            **({"sac_op_overhead": d.sac_op_overhead} if d.sac_op_overhead else {}),
            **({"ckpt_op_overhead": d.ckpt_op_overhead} if d.ckpt_op_overhead else {}),
            **({"colocated_slowdown": d.colocated_slowdown} if d.colocated_slowdown else {})}


def _device_from_json(path: str, obj: Any) -> DeviceProfile:
    d = _object(path, obj, ("name", "peak_flops", "memory_bandwidth", "memory_capacity",
                            "launch_overhead", "efficiency"),
                ("kind", "source", "op_overhead", "instruction_overhead", "dense_masked_attention", "op_overheads",
                 "probs_fwd_byte_time", "probs_bwd_byte_time", "kind_op_overheads", "bytes_mode",
                 "recv_wake_latency", "sac_op_overhead", "ckpt_op_overhead", "colocated_slowdown"))
    peaks = d["peak_flops"]
    if not isinstance(peaks, Mapping):
        raise _fail(f"{path}.peak_flops", f"expected an object of dtype -> FLOP/s, got {peaks!r}",
                    'write e.g. {"bfloat16": 989.4e12}')
    for k, v in peaks.items():
        _positive(f"{path}.peak_flops.{k}", v)
    eff = _object(f"{path}.efficiency", d["efficiency"], (), tuple(OP_CLASSES))
    curves = {k: EfficiencyCurve(points=_check_curve(f"{path}.efficiency.{k}", v)) for k, v in eff.items()}
    return DeviceProfile(
        name=_string(f"{path}.name", d["name"]), kind=d.get("kind", "gpu"),
        source=str(d.get("source", "")),
        peak_flops={k: float(v) for k, v in peaks.items()},
        memory_bandwidth=_positive(f"{path}.memory_bandwidth", d["memory_bandwidth"]),
        memory_capacity=_positive(f"{path}.memory_capacity", d["memory_capacity"]),
        launch_overhead=_positive(f"{path}.launch_overhead", d["launch_overhead"], allow_zero=True),
        efficiency=curves,
        op_overhead=_positive(f"{path}.op_overhead", d.get("op_overhead", 0.0), allow_zero=True),
        instruction_overhead=_positive(f"{path}.instruction_overhead", d.get("instruction_overhead", 0.0),
                                       allow_zero=True),
        dense_masked_attention=d.get("dense_masked_attention", False),
        op_overheads={str(k): _positive(f"{path}.op_overheads.{k}", v, allow_zero=True)
                      for k, v in _object(f"{path}.op_overheads", d.get("op_overheads", {}), (), _OP_NAMES).items()},
        probs_fwd_byte_time=_positive(f"{path}.probs_fwd_byte_time", d.get("probs_fwd_byte_time", 0.0),
                                      allow_zero=True),
        probs_bwd_byte_time=_positive(f"{path}.probs_bwd_byte_time", d.get("probs_bwd_byte_time", 0.0),
                                      allow_zero=True),
        kind_op_overheads={str(k): _positive(f"{path}.kind_op_overheads.{k}", v, allow_zero=True)
                           for k, v in _object(f"{path}.kind_op_overheads", d.get("kind_op_overheads", {}), (),
                                               _KIND_OPS).items()},
        bytes_mode=d.get("bytes_mode", "max"),
        recv_wake_latency=_positive(f"{path}.recv_wake_latency", d.get("recv_wake_latency", 0.0), allow_zero=True),
        sac_op_overhead=_positive(f"{path}.sac_op_overhead", d.get("sac_op_overhead", 0.0), allow_zero=True),
        ckpt_op_overhead=_positive(f"{path}.ckpt_op_overhead", d.get("ckpt_op_overhead", 0.0), allow_zero=True),
        colocated_slowdown=_positive(f"{path}.colocated_slowdown", d.get("colocated_slowdown", 0.0), allow_zero=True),
    )


def _link_from_json(path: str, obj: Any) -> LinkProfile:
    d = _object(path, obj, ("latency", "bandwidth"))
    return LinkProfile(latency=_positive(f"{path}.latency", d["latency"], allow_zero=True),
                       bandwidth=_positive(f"{path}.bandwidth", d["bandwidth"]))


def _check_header(obj: Any) -> None:
    if not isinstance(obj, Mapping):
        raise _fail("<root>", f"expected an object, got {type(obj).__name__}", "write a JSON object")
    if obj.get("format") != PROFILE_FORMAT:
        raise _fail("format", f"expected {PROFILE_FORMAT!r}, got {obj.get('format')!r}",
                    f'start the file with "format": "{PROFILE_FORMAT}"')
    if obj.get("version") != PROFILE_VERSION:
        raise _fail("version", f"expected {PROFILE_VERSION}, got {obj.get('version')!r}",
                    f"write version {PROFILE_VERSION} (the only one this dipc reads)")


def profile_from_json(obj: Any) -> ClusterProfile | DeviceProfile:
    """Parse a profile dict: a cluster (with ``gpus_per_node``) or a bare device (``device`` only)."""
    _check_header(obj)
    if set(obj) <= {"format", "version", "device"}:
        d = _object("", obj, ("format", "version", "device"))
        return _device_from_json("device", d["device"])
    d = _object("", obj, ("format", "version", "name", "gpus_per_node", "intra_node", "inter_node",
                          "device"), ("source", "p2p", "recv_lookahead"))
    return ClusterProfile(
        name=_string("name", d["name"]), source=str(d.get("source", "")),
        gpus_per_node=_integer("gpus_per_node", d["gpus_per_node"]),
        intra_node=_link_from_json("intra_node", d["intra_node"]),
        inter_node=_link_from_json("inter_node", d["inter_node"]),
        device=_device_from_json("device", d["device"]),
        p2p=_p2p("p2p", d.get("p2p", "eager")),
        recv_lookahead=_count("recv_lookahead", d.get("recv_lookahead", 0)),
    )


def save_profile(profile: ClusterProfile | DeviceProfile, path: str | Path) -> Path:
    path = Path(path)
    path.write_text(json.dumps(profile_to_json(profile), indent=2) + "\n")
    return path


def list_presets() -> list[str]:
    """Names of the bundled presets (``dipc/semu/presets/<name>.json``)."""
    return sorted(p.stem for p in PRESET_DIR.glob("*.json"))


def load_preset(name: str) -> ClusterProfile:
    """The bundled cluster preset ``name`` (case-insensitive; ``-`` and ``_`` are the same)."""
    key = name.lower().replace("-", "_").replace(" ", "_")
    path = PRESET_DIR / f"{key}.json"
    if not path.is_file():
        raise ProfileError(f"unknown device preset {name!r}. Fix: use one of "
                           f"{', '.join(list_presets())}, or pass a path to a profile JSON "
                           f"(write one with `dipc profile`).")
    profile = load_profile(path)
    if not isinstance(profile, ClusterProfile):
        raise ProfileError(f"preset {path} holds a bare device, not a cluster. Fix: add "
                           "gpus_per_node, intra_node and inter_node to it.")
    return profile


def load_profile(path_or_name: str | Path) -> ClusterProfile | DeviceProfile:
    """Read a profile JSON file, or a preset by name when no such file exists."""
    path = Path(path_or_name)
    if not path.is_file():
        if isinstance(path_or_name, str) and "/" not in path_or_name and not path_or_name.endswith(".json"):
            return load_preset(path_or_name)
        raise ProfileError(f"no profile file at {str(path)!r}. Fix: pass an existing JSON file or a "
                           f"preset name ({', '.join(list_presets())}).")
    try:
        obj = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ProfileError(f"{path}: not valid JSON ({e}). Fix: repair the file or re-measure it "
                           "with `dipc profile`.") from e
    try:
        return profile_from_json(obj)
    except ProfileError as e:
        raise ProfileError(f"{path}: {e}") from None
