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

3. **Late wake-ups.** A rank blocked in a receive (a futex wait in the process group) runs again
   only when the OS schedules it; on a virtual machine whose idle vCPUs halt, that waits for the
   host. On this project's 2-vCPU machine ``pg.recv``/``pg.send`` calls and waits were measured
   blocking 3-5 ms with under 0.1 ms of CPU, now and then. The cost is per *blocking* receive, not
   per message: interleaved 1F1B, whose ranks wait on each other often, was under-predicted by
   18-31% with ``f`` alone while 1F1B and GPipe (whose critical rank rarely waits) were not. So the
   fit has a second parameter, the profile's ``recv_wake_latency`` ``w`` (the emulator adds it to
   every receive that had to wait), fitted with ``f`` by Nelder-Mead on the same loss.

4. **Overlapping compute.** The same instruction ran 1.15-1.6x slower (thread CPU time) while the
   other rank computed at the same moment, ~1.0x while it waited: interleaved 1F1B, whose ranks
   compute together most of the step, stayed 16-25% under-predicted with ``f`` and ``w`` alone. The
   profile's ``colocated_slowdown`` ``s`` (:mod:`dipc.semu.contention`: ``1 + s·overlap``) is the
   third parameter, fitted with the other two.

Not modelled: contention that depends on what the other rank runs (``s`` is one number for every
op; ``w`` an expected delay, where the real one is mostly 0 and sometimes milliseconds), and
per-step variation of the operating system's scheduling (the caller takes medians). On GPUs, ranks
own their devices, so ``f`` should come out near 1 and ``w`` near 0 there.
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
           "p2p_overheads", "scale_compute", "with_wake_latency"]

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
    """The profile for the multi-process executor, the fitted compute factor and wake latency
    (seconds), the measured P2P times per op, and the median |predicted / measured - 1| on the
    calibration steps before and after the fit."""

    profile: ClusterProfile
    compute_factor: float
    wake_latency: float
    p2p_overheads: dict[str, float]
    colocated_slowdown: float = 0.0
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


def with_wake_latency(profile: ClusterProfile, seconds: float, slowdown: float | None = None) -> ClusterProfile:
    """``profile`` whose blocked receives resume ``seconds`` after their message arrives (and, given,
    whose compute runs ``1 + slowdown·overlap`` slower beside co-located ranks' compute)."""
    extra = {} if slowdown is None else {"colocated_slowdown": slowdown}
    return dataclasses.replace(profile, device=dataclasses.replace(profile.device, recv_wake_latency=seconds, **extra))


def fit_distributed(profile: ClusterProfile, samples: Sequence[DistributedSample], *,
                    p2p: dict[str, float] | None = None, step_overhead: float = 0.0,
                    bounds: tuple[float, float] = (0.5, 3.0), max_wake: float = 5e-3,
                    fit_wake: bool = True, max_slowdown: float = 2.0,
                    fit_slowdown: bool = True) -> DistributedCalibration:
    """Fit the compute factor, the wake latency and the co-located slowdown (module docstring) to
    ``samples`` on ``profile`` with the measured ``p2p`` op times (:func:`p2p_overheads`) in place
    of its own; ``step_overhead``: seconds per step the executor spends outside its instruction
    streams, added to every prediction. ``bounds``: the factor's range; ``max_wake`` /
    ``max_slowdown``: the other two's upper bounds; ``fit_wake=False`` / ``fit_slowdown=False`` keep
    the profile's value of that parameter."""
    if len(samples) < 2:
        raise DistributedCalibrationError(f"{len(samples)} measured steps. Fix: time at least two calibration "
                                          "steps of the multi-process executor.")
    bad = [s.measured_s for s in samples if not s.measured_s > 0]
    if bad:
        raise DistributedCalibrationError(f"measured step times {bad[:3]} are not positive. Fix: pass seconds > 0.")
    before = _median_err(samples, profile, step_overhead)
    base = dataclasses.replace(profile, device=dataclasses.replace(
        profile.device, op_overheads={**profile.device.op_overheads, **(p2p or {})}))

    def loss_at(factor: float, wake: float, slowdown: float) -> float:
        scaled = with_wake_latency(scale_compute(base, factor), wake, slowdown)
        return sum(abs(math.log((s.predict(scaled) + step_overhead) / s.measured_s)) for s in samples)

    def best_factor(wake: float, slowdown: float) -> tuple[float, float]:
        res = scipy.optimize.minimize_scalar(lambda f: loss_at(f, wake, slowdown), bounds=bounds, method="bounded",
                                             options={"xatol": 1e-3})
        return float(res.x), float(res.fun)

    wake, slowdown = profile.device.recv_wake_latency, profile.device.colocated_slowdown
    factor, best = best_factor(wake, slowdown)
    # the loss is piecewise smooth in the wake latency and the slowdown (which receives wait, and
    # which spans overlap, change in steps): coarse scans find the basin, then Nelder-Mead refines
    if fit_wake:
        for w in (max_wake * k / 10 for k in range(11)):
            f, v = best_factor(w, slowdown)
            if v < best:
                factor, wake, best = f, w, v
    if fit_slowdown:
        for a in (max_slowdown * k / 8 for k in range(9)):
            f, v = best_factor(wake, a)
            if v < best:
                factor, slowdown, best = f, a, v
    if fit_wake or fit_slowdown:
        def unpack(x) -> tuple[float, float, float]:
            it = iter(x[1:])
            return (float(x[0]), float(next(it)) * 1e-3 if fit_wake else wake,
                    float(next(it)) if fit_slowdown else slowdown)

        x0 = [factor] + ([wake * 1e3] if fit_wake else []) + ([slowdown] if fit_slowdown else [])
        box = [bounds] + ([(0.0, max_wake * 1e3)] if fit_wake else []) + ([(0.0, max_slowdown)] if fit_slowdown else [])
        res = scipy.optimize.minimize(lambda x: loss_at(*unpack(x)), x0, method="Nelder-Mead", bounds=box,
                                      options={"xatol": 1e-3, "fatol": 1e-6})
        if float(res.fun) < best:
            factor, wake, slowdown = unpack(res.x)
    fitted = with_wake_latency(scale_compute(base, factor), wake, slowdown)
    fitted = dataclasses.replace(fitted, name=f"{profile.name}-distributed", device=dataclasses.replace(
        fitted.device, source=f"{fitted.device.source}; multi-process executor: compute x {factor:.3g} "
                              f"(co-located ranks), x (1 + {slowdown:.2f} x overlap) beside another rank's "
                              f"compute, blocked receives wake {wake * 1e6:.0f} us late, "
                              "P2P op times from measured timelines"))
    return DistributedCalibration(profile=fitted, compute_factor=factor, wake_latency=wake,
                                  colocated_slowdown=slowdown,
                                  p2p_overheads=dict(p2p or {}), step_overhead=step_overhead,
                                  median_rel_error_before=before,
                                  median_rel_error=_median_err(samples, fitted, step_overhead))
