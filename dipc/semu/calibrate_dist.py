"""Calibrate a profile, already fitted to the local executor, to a multi-process executor (gloo).

:mod:`dipc.semu.calibrate` fits compute on the local executor, which runs ranks one after another
on one thread. Ranks in processes of their own differ in two ways that the local fit cannot see:

1. **P2P posting.** A gloo send packs its message and posts a work object on the rank's CPU, a
   receive waits on one and unpacks: times that the local executor's in-memory copies do not have.
   They are read off measured timelines of the calibration steps (``record_timeline=True``): the
   median span of each SEND_* op and the 10th-percentile span of each RECV_* op become those ops'
   ``op_overheads`` entries (plus the dispatch share calibration adds to every op). A receive's
   span also holds any wait for its data, and in a pipeline most receives of some ranks wait (the
   first rank's gradient receives wait for the whole backward of the ranks after it); the low
   percentile keeps the receives that found their data already there.
2. **Co-located ranks.** Ranks on one host share its cores, caches and memory bandwidth with
   each other and with the transport's threads, so the same instruction takes longer than when it
   runs alone. One factor ``f`` on every compute time (peak FLOP/s and bandwidth divided by ``f``,
   per-instruction and per-op times multiplied by it) is fitted to the calibration steps' measured
   step times: ``f`` minimises the summed absolute log ratio of predicted (emulated, with the
   executor's fixed per-step work added) to measured step times, by SciPy's bounded scalar search.
   Absolute, not squared: a few steps slowed by another process on a shared machine would pull a
   least-squares factor up (seen: a run whose fit took its own calibration steps' median error from
   9.9% to 22.4%); the absolute loss follows the typical step, like the median it is judged by.

Not modelled: contention that depends on what the other rank runs at the same moment (``f`` is an
average), and per-step variation of the operating system's scheduling (the caller takes medians).
On GPUs, ranks own their devices, so ``f`` should come out near 1 there.
"""
from __future__ import annotations

import dataclasses
import math
import statistics
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import scipy.optimize

from dipc.errors import DipcError
from dipc.semu.profiles import _KIND_OPS as _COMPUTE_OPS, ClusterProfile, DeviceProfile

__all__ = ["DistributedCalibration", "DistributedCalibrationError", "DistributedSample", "fit_distributed",
           "p2p_overheads", "scale_compute"]

_P2P_OPS = ("SEND_ACT", "SEND_GRAD", "RECV_ACT", "RECV_GRAD")


class DistributedCalibrationError(DipcError, ValueError):
    """Too little or malformed data to calibrate a multi-process executor."""


@dataclass(frozen=True, kw_only=True)
class DistributedSample:
    """One measured calibration step: ``predict(profile)`` gives its emulated step time (seconds,
    without the executor's fixed per-step work) on a profile, ``measured_s`` its measured one."""

    predict: Callable[[ClusterProfile], float]
    measured_s: float


@dataclass(frozen=True, kw_only=True)
class DistributedCalibration:
    """The profile for the multi-process executor, the fitted compute factor, the measured P2P
    times per op, and the median |predicted / measured - 1| on the calibration steps before and
    after the fit."""

    profile: ClusterProfile
    compute_factor: float
    p2p_overheads: dict[str, float]
    step_overhead: float
    median_rel_error_before: float
    median_rel_error: float


def p2p_overheads(spans: Iterable[tuple[str, float]], dispatch: float = 0.0) -> dict[str, float]:
    """Seconds per SEND_* op (median) and RECV_* op (10th percentile: receives that did not wait)
    from ``(op, seconds)`` spans of measured timelines, plus ``dispatch`` (the interpreter's
    per-instruction share, as calibration adds it)."""
    by_op: dict[str, list[float]] = {}
    for op, t in spans:
        if op in _P2P_OPS:
            by_op.setdefault(op, []).append(t)
    out = {}
    for op, ts in by_op.items():
        ts = sorted(ts)
        out[op] = (statistics.median(ts) if op.startswith("SEND") else ts[int(0.1 * (len(ts) - 1))]) + dispatch
    return out


def scale_compute(profile: ClusterProfile, factor: float) -> ClusterProfile:
    """``profile`` with every compute instruction ``factor`` times slower: peaks and bandwidth
    divided by it, per-op and per-instruction compute overheads multiplied (links unchanged)."""
    if not factor > 0:
        raise DistributedCalibrationError(f"compute factor {factor!r}. Fix: pass a positive number.")
    d: DeviceProfile = profile.device
    dev = dataclasses.replace(
        d, peak_flops={k: v / factor for k, v in d.peak_flops.items()}, memory_bandwidth=d.memory_bandwidth / factor,
        op_overhead=d.op_overhead * factor, launch_overhead=d.launch_overhead * factor,
        instruction_overhead=d.instruction_overhead * factor,
        op_overheads={k: v * factor if k in _COMPUTE_OPS else v for k, v in d.op_overheads.items()},
        kind_op_overheads={k: v * factor for k, v in d.kind_op_overheads.items()},
        probs_fwd_byte_time=d.probs_fwd_byte_time * factor, probs_bwd_byte_time=d.probs_bwd_byte_time * factor)
    return dataclasses.replace(profile, device=dev)


def _median_err(samples: Sequence[DistributedSample], profile: ClusterProfile, fixed: float) -> float:
    return statistics.median(abs((s.predict(profile) + fixed) / s.measured_s - 1) for s in samples)


def fit_distributed(profile: ClusterProfile, samples: Sequence[DistributedSample], *,
                    p2p: dict[str, float] | None = None, step_overhead: float = 0.0,
                    bounds: tuple[float, float] = (0.5, 3.0)) -> DistributedCalibration:
    """Fit the compute factor (module docstring) to ``samples`` on ``profile`` with the measured
    ``p2p`` op times (:func:`p2p_overheads`) in place of its own; ``step_overhead``: seconds per
    step the executor spends outside its instruction streams, added to every prediction."""
    if len(samples) < 2:
        raise DistributedCalibrationError(f"{len(samples)} measured steps. Fix: time at least two calibration "
                                          "steps of the multi-process executor.")
    bad = [s.measured_s for s in samples if not s.measured_s > 0]
    if bad:
        raise DistributedCalibrationError(f"measured step times {bad[:3]} are not positive. Fix: pass seconds > 0.")
    before = _median_err(samples, profile, step_overhead)
    base = dataclasses.replace(profile, device=dataclasses.replace(
        profile.device, op_overheads={**profile.device.op_overheads, **(p2p or {})}))

    def loss(factor: float) -> float:
        scaled = scale_compute(base, factor)
        return sum(abs(math.log((s.predict(scaled) + step_overhead) / s.measured_s)) for s in samples)

    res = scipy.optimize.minimize_scalar(loss, bounds=bounds, method="bounded", options={"xatol": 1e-3})
    factor = float(res.x)
    fitted = scale_compute(base, factor)
    fitted = dataclasses.replace(fitted, name=f"{profile.name}-distributed", device=dataclasses.replace(
        fitted.device, source=f"{fitted.device.source}; multi-process executor: compute x {factor:.3g} "
                              "(co-located ranks), P2P op times from measured timelines"))
    return DistributedCalibration(profile=fitted, compute_factor=factor, p2p_overheads=dict(p2p or {}),
                                  step_overhead=step_overhead, median_rel_error_before=before,
                                  median_rel_error=_median_err(samples, fitted, step_overhead))
