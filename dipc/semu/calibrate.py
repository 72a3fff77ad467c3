"""Calibrate a device profile to measured runs, so SEMU's step times match the real runtime.

A measured profile (``dipc profile``) knows the machine's peak FLOP/s and bandwidth from micro-
benchmarks, but a pipeline stage on CPU is dominated by what those do not see: eager dispatch of
hundreds of small ATen ops, the interpreter, and a CPU attention kernel that computes masked
attention densely. The fit here takes per-instruction wall times of real steps (the local executor
runs ranks one after another, so each instruction's time is its own; see
:func:`dipc.runtime.measure.timed_local_step`) and models each compute instruction as

    t = a · compute(instr) + b · attention(instr) + m · memory(instr)
        + p_f · probs_fwd(instr) + p_b · probs_bwd(instr) + o_kind(instr) · ops(instr) + c_kind(instr)

where ``attention`` is the attention FLOP time, ``compute`` the other FLOP time and ``memory``
the bytes / bandwidth time :class:`~dipc.semu.step_model.StepModel` computes from the measured
profile with every overhead at 0, ``probs_*`` the bytes of dense softmax probabilities that
masked attention materialises on CPU's math path (forward; backward), ``ops`` the ATen ops the
instruction's layers dispatch (counted by the symbolic trace), and ``o_kind`` and ``c_kind`` a
time per op and a fixed time per instruction kind (FWD, BWD, BWD_I, BWD_W: the interpreter's
work around a backward is not a forward's, a split BWD_I walks the autograd graph in Python,
and one constant for all over-charges programs with many small instructions, such as
interleaved 1F1B). A non-negative least-squares fit (of seconds, or of relative errors; compute
bounded below by a = 1) gives the coefficients; it is run with masked attention counted sparsely
and densely, and the better fit decides ``dense_masked_attention``. The profile then gets peak
FLOP/s divided by ``a``, the attention curve scaled by ``a / b``, memory bandwidth divided by
``m`` (unlimited when ``m = 0``), ``launch_overhead`` 0 (``kind_op_overheads``, the ``o_kind``, replace it),
``op_overheads`` (the ``c_kind``
plus the mean measured time of each other instruction kind the samples list: LOAD, SEND_*,
RECV_*, which pack and copy tensors on the rank's CPU; every op then gets the step's time outside
its instructions, per instruction: the interpreter's dispatch loop) and ``probs_*_byte_time`` (the step
model's per-layer max(compute, memory) makes this exact only where one of the two dominates, as
it does for these layers); links come from a gloo ping-pong fit (:func:`fit_link`). The result
is an ordinary profile JSON.

Why it is regularised: on tiny models the columns are nearly collinear (within a pipeline an
instruction's op count is fixed and its compute varies little, so compute, the per-op times and
the per-kind constants can trade for one another at almost no cost in fit), and the plain fit
picks one of many near-equal solutions by noise: two quiet runs fitted compute x3.72 with a
10 us BWD_I constant and x1.00 with 5.9 ms. A ridge penalty
pulls the coefficients toward a physical prior (:func:`_prior`: attention at compute's multiplier,
memory traffic at the measured bandwidth, each kind's overheads toward the kinds' mean) on
column-normalised units, so one strength fits every column: ``regularization=0.1`` (a fixed
strength) or ``"cv"``, the one of :data:`CV_STRENGTHS` whose fits best predict held-out steps (k-fold over steps, repeats of one
batch kept in one fold, weighted as the fit is; chosen on the points the outlier trimming of the
plain fit keeps, and the variant of masked attention is chosen by the same held-out error). The
bounds still hold (the penalty is extra rows of the bounded least-squares system). The limit:
held-out steps of the same pipelines barely see the collinear directions (that is what makes
them collinear), so cross-validation often finds only a weak penalty worth its bias (0-0.03 on
this VM, no steadier than none). Measured (``benchmarks/calibration_stability.py``: fits on two
disjoint halves of the steps, 5 pairs): the share of instruction time that moves between terms
was 21% unregularised, 20% with "cv", 9% at 0.1, at about the same held-out step error (5.5%,
5.7%, 6.0%). But ``semu_accuracy.py --no-dist`` (local median / p90 / tau) gave 4.7% / 11.5% /
0.74 unregularised against 4.3% / 12.2% / 0.80 and 5.7% / 13.4% / 0.75 in two runs at 0.1, and
over-predicted interleaved 1F1B on the VLM by 12% at 0.1 (7% without): steadier coefficients, no
better predictions. So the default stays the plain fit (``"none"``).

Fit on calibration batches, evaluate on others (``benchmarks/semu_accuracy.py`` does).

Not modelled: per-op costs that vary by ATen op (one overhead for all), cache effects between
consecutive microbatches, the stage glue's dependence on the batch (a constant per instruction),
and run-to-run noise of a shared machine (medians of repeats are the caller's job).

Example::

    samples = [CalibrationSample(stats=[batch_length_stats(mb) for mb in mbs],
                                 timings=timed_local_step(pipe, mbs).compute_times())]
    sets = [CalibrationSet(stage_layers=[s.layers for s in pipe.stages], cost_model=cost_model, samples=samples)]
    result = fit_profile(measured, sets)
    save_profile(result.profile, "calibrated.json")
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import scipy.optimize

from dipc.errors import DipcError
from dipc.ir import Instruction, Op
from dipc.semu.costs import CostModel
from dipc.semu.profiles import ClusterProfile, EfficiencyCurve, LinkProfile
from dipc.semu.step_model import StatsLike, StepModel, stage_ops

__all__ = ["CalibrationError", "CalibrationResult", "CalibrationSample", "CalibrationSet", "fit_link", "fit_profile", "stage_ops"]

_COMPUTE = {"FWD": Op.FWD, "BWD": Op.BWD, "BWD_I": Op.BWD_I, "BWD_W": Op.BWD_W}


class CalibrationError(DipcError, ValueError):
    """Too few or inconsistent measurements to fit a profile."""


@dataclass(frozen=True, kw_only=True)
class CalibrationSample:
    """One measured step: the statistics of its microbatches and ``(op, stage, mb, seconds)`` of
    its compute instructions (op names ``FWD``/``BWD``/``BWD_I``/``BWD_W``)."""

    stats: Sequence[StatsLike]
    timings: Sequence[tuple[str, int, int, float]]
    # (op, seconds) of the step's other instructions (LOAD, SEND_*, RECV_*): their fixed CPU times
    other_timings: Sequence[tuple[str, float]] = ()
    # the step's time outside every instruction (the interpreter's dispatch loop) and its number of
    # instructions: spread over the instructions as a per-instruction dispatch time
    untimed_seconds: float = 0.0
    num_instructions: int = 0


@dataclass(frozen=True, kw_only=True)
class CalibrationSet:
    """Samples of one pipeline: its stages' layer paths and its cost model (one device profile can
    be fitted to several pipelines and models at once)."""

    stage_layers: Sequence[Sequence[str]]
    cost_model: CostModel
    samples: Sequence[CalibrationSample]
    no_input_grads: Sequence[int] = ()     # stages whose BWD_I is a no-op (StepModel's knob)
    wgrad_recomputes: bool = False         # True: BWD_W costs a full backward (dipc before its split backward)
    whole_wgrad_stages: Sequence[int] = ()  # stages whose split BWD_W walks whole (Pipeline.whole_wgrad_stages)


@dataclass(frozen=True, kw_only=True)
class CalibrationResult:
    """The calibrated profile and how well it fits its own samples."""

    profile: ClusterProfile
    scale: float                     # a: roofline multiplier (peaks and bandwidth were divided by it)
    attention_scale: float           # b: the same for attention FLOPs (its curve was scaled by a / b)
    memory_scale: float              # m: multiplier of bytes / bandwidth (0: bandwidth left unlimited)
    op_overhead: float               # mean of kind_op_overheads
    instruction_overhead: float
    dense_masked_attention: bool
    num_points: int
    op_overheads: dict[str, float] = field(default_factory=dict)   # fixed seconds per instruction by op
    kind_op_overheads: dict[str, float] = field(default_factory=dict)   # seconds per ATen op by compute kind
    probs_fwd_byte_time: float = 0.0
    probs_bwd_byte_time: float = 0.0
    dispatch_overhead: float = 0.0                                  # per instruction, in op_overheads
    median_rel_error: float          # per instruction, on the calibration samples
    residuals: dict[str, float] = field(default_factory=dict)   # relative RMS per attention variant
    num_outliers: int = 0            # points further than _OUTLIER_MADS robust deviations, left out of the fit
    regularization: str = "none"     # "cv" (strength chosen by cross-validation), "none" or "fixed" (given)
    regularization_strength: float = 0.0   # the ridge strength of the fit (0: none)
    # RMS held-out error of fits at that strength on the other folds' steps (weighted as the fit;
    # absolute: over the mean instruction time); None when fewer than 2 steps
    cv_error: float | None = None
    cv_folds: int = 0
    cv_curve: tuple[tuple[float, float | None], ...] = ()   # (strength, cv_error) of every candidate ("cv")


# a point whose relative error lies this many robust standard deviations (1.4826 x MAD) from the
# median is timer or scheduling noise (a descheduled thread, a GC pause), not a cost to fit
_OUTLIER_MADS = 5.0
_OUTLIER_FLOOR = 0.25   # ... but never closer than this to the median relative error

# ridge strengths cross-validation chooses among (in units of each column's own curvature after
# the columns are scaled to unit norm; 0 is the plain bounded least squares)
CV_STRENGTHS: tuple[float, ...] = (0.0,) + tuple(float(10.0 ** (e / 2)) for e in range(-14, 1))
CV_FOLDS = 5            # at most this many folds of whole steps (fewer when fewer steps)

# the design matrix's columns
_A, _B, _M, _PF, _PB = range(5)
_PER_OP = 5                       # ... then one per-ATen-op time per kind of _COMPUTE
_CONST = 5 + len(_COMPUTE)        # ... then one fixed time per kind


def _prior(x: np.ndarray, measured: ClusterProfile) -> _Prior:
    """Where the ridge penalty pulls the coefficients (columns of ``x`` that are all zero get no
    row; neither do the fixed per-kind times when ``x`` lacks them): attention at compute's
    multiplier (b = a), memory traffic at the measured bandwidth (m = 1), each kind's per-op time
    toward the measured per-op dispatch time (``launch_overhead``; toward the kinds' mean where the
    profile has none), and the fixed per-instruction times toward 0, so time is explained by the
    work (compute, ops), which carries over to schedules whose instructions are smaller. Pulling
    the fixed times toward their mean instead was tried: at 0.1 it lifted FWD's to 0.71 ms (0.33
    toward 0; 0.08 unregularised) and over-predicted interleaved 1F1B, which runs twice the
    forwards, by 12-14%. Compute itself (a) gets only its bound a >= 1: a prior a = 1 (the measured roofline)
    was tried and cost held-out accuracy, as this CPU's small matmuls run 2-4x below the measured
    peak (quiet runs fitted a = 2.3-4.4 unregularised). The probability byte times get none
    (nothing measures them; with b held near a they are no longer collinear with attention)."""
    p = x.shape[1]
    seen = np.linalg.norm(x, axis=0) > 0
    rows, targets, subject, names = [], [], [], []

    def add(name: str, coefs: dict[int, float], target: float, subj: int) -> None:
        r = np.zeros(p)
        for j, v in coefs.items():
            r[j] = v
        rows.append(r)
        targets.append(target)
        subject.append(subj)
        names.append(name)

    if seen[_B]:
        add("b=a", {_B: 1.0, _A: -1.0}, 0.0, _B)
    if seen[_M]:
        add("m=1", {_M: 1.0}, 1.0, _M)
    launch = measured.device.launch_overhead
    per_op = [_PER_OP + k for k in range(len(_COMPUTE)) if _PER_OP + k < p and seen[_PER_OP + k]]
    for j in per_op:   # each kind's per-op time toward the measured dispatch time, else their mean
        name = list(_COMPUTE)[j - _PER_OP]
        if launch > 0:
            add(f"per-op {name}=launch_overhead", {j: 1.0}, launch, j)
        elif len(per_op) > 1:
            add(f"per-op {name}=mean", {i: (1.0 if i == j else 0.0) - 1.0 / len(per_op) for i in per_op}, 0.0, j)
    for k, name in enumerate(_COMPUTE):   # fixed times toward 0: explain time by work where it can be
        j = _CONST + k
        if j < p and seen[j]:
            add(f"const {name}=0", {j: 1.0}, 0.0, j)
    if not rows:
        return _Prior(rows=np.zeros((0, p)), targets=np.zeros(0), subject=np.zeros(0, dtype=int))
    return _Prior(rows=np.array(rows), targets=np.array(targets), subject=np.array(subject, dtype=int),
                  names=tuple(names))


def _step_folds(keys: Sequence[object], point_samples: np.ndarray) -> tuple[np.ndarray, int]:
    """Cross-validation fold of every point, by step: samples with the same key (repeats of one
    batch on one pipeline: their instructions are the same but for noise) share a fold, and the
    distinct steps are dealt round-robin into at most ``CV_FOLDS`` folds. Returns the folds and
    their number (0: fewer than two steps, no cross-validation)."""
    order: dict[object, int] = {}
    for k in keys:
        order.setdefault(k, len(order))
    k = min(CV_FOLDS, len(order))
    if k < 2:
        return np.zeros(len(point_samples), dtype=int), 0
    step_fold = np.array([order[key] % k for key in keys])
    return step_fold[point_samples], k


def _bare(profile: ClusterProfile, dense: bool) -> ClusterProfile:
    dev = dataclasses.replace(profile.device, launch_overhead=0.0, op_overhead=0.0, instruction_overhead=0.0,
                              kind_op_overheads={},
                              dense_masked_attention=dense)
    return dataclasses.replace(profile, device=dev)


@dataclass(frozen=True)
class _Prior:
    """Ridge rows ``rows @ coef ~ targets`` (seconds-free physical units, one row per penalty),
    each measured in the units of its ``subject`` column: after the columns are scaled to unit
    norm, row ``i`` is weighted by ``norm[subject[i]]``, so one strength means the same for every
    column (a fraction of that column's own curvature)."""

    rows: np.ndarray        # (k, p)
    targets: np.ndarray     # (k,)
    subject: np.ndarray     # (k,) int
    names: tuple[str, ...] = ()


def _nnls(x: np.ndarray, y: np.ndarray, lower: np.ndarray | None = None, prior: _Prior | None = None,
          strength: float = 0.0) -> np.ndarray:
    """Least squares with every coefficient >= ``lower`` (default 0), columns scaled to unit norm
    first (seconds, bytes and op counts differ by 10^12): SciPy's active-set NNLS, or its bounded
    variable least squares where a bound is above 0. With a ``prior`` and ``strength`` > 0, a ridge
    penalty ``strength · Σ_i (norm[subject_i] · (rows_i @ coef - targets_i))²`` is added (as extra
    rows of the system, so the bounds still hold)."""
    norms = np.linalg.norm(x, axis=0)
    norms[norms == 0] = 1.0
    a, b = x / norms, y
    if prior is not None and strength > 0 and len(prior.targets):
        ns = norms[prior.subject][:, None]
        r = math.sqrt(strength)
        a = np.concatenate([a, r * prior.rows * ns / norms[None, :]])
        b = np.concatenate([y, r * prior.targets * ns[:, 0]])
    if lower is None or not np.any(lower > 0):
        coef, _ = scipy.optimize.nnls(a, b, maxiter=50 * x.shape[1])
    else:
        # (BVLS can end a hair outside its bounds: -1e-33 would fail the profile's checks)
        coef = np.maximum(scipy.optimize.lsq_linear(a, b, bounds=(lower * norms, np.inf), method="bvls").x,
                          lower * norms)
    return coef / norms


def _attention_seconds(sm: StepModel, ins: Instruction) -> float:
    """The attention part of ``sm.compute_time(ins)`` (masked attention dense when the profile says so)."""
    from dipc.semu.step_model import _dense_attention, stats_for_layer

    dev, stage = sm.cluster.device, ins.stage
    whole = sm.wgrad_is_whole(stage)
    mult = {Op.FWD: 1, Op.BWD: 2, Op.BWD_I: 0 if stage in sm.no_input_grads else 2,
            Op.BWD_W: 2 if whole else 0}.get(ins.op, 0)
    if mult == 0:
        return 0.0
    stats = sm.microbatch_stats[ins.mb]
    total = 0.0
    for p in sm.stage_layers[stage]:
        st = stats_for_layer(stats, p)
        c = sm.cost_model.cost(p, st)
        if c.attn_fwd_flops > 0 and dev.dense_masked_attention:
            c = _dense_attention(sm.cost_model, p, st, c)
        if c.attn_fwd_flops > 0:
            total += dev.op_time("attention", flops=mult * c.attn_fwd_flops, dtype=sm.layer_dtype(p), num_kernels=0)
    return total


def _probs_bytes(sm: StepModel, ins: Instruction) -> tuple[float, float]:
    """``(forward, backward)`` bytes of dense masked-attention probabilities ``ins`` passes over
    (``LayerCost.attn_probs_bytes`` of the stage's layers; BWD_W only when it re-runs the backward)."""
    stage = ins.stage
    whole = sm.wgrad_is_whole(stage)
    if ins.op is Op.FWD:
        at = (1.0, 0.0)
    elif ins.op is Op.BWD or (ins.op is Op.BWD_I and stage not in sm.no_input_grads) or (ins.op is Op.BWD_W and whole):
        at = (0.0, 1.0)
    else:
        return 0.0, 0.0
    from dipc.semu.step_model import stats_for_layer

    stats = sm.microbatch_stats[ins.mb]
    # as the step model charges it: only a positive excess over what a fused kernel would stash
    total = sum(max(sm.cost_model.cost(p, stats_for_layer(stats, p)).attn_probs_bytes, 0.0)
                for p in sm.stage_layers[stage])
    return at[0] * total, at[1] * total


def _points(sets: Sequence[CalibrationSet]) -> tuple[list[tuple[CalibrationSet, CalibrationSample]],
                                                      list[tuple[int, str, int, int, float]], np.ndarray]:
    """Every sample with its set, the timed compute instructions the fit uses ``(sample index, op,
    stage, mb, seconds)`` (a BWD_I of a stage without input grads is empty), and their ATen op counts."""
    samples = [(cs, s) for cs in sets for s in cs.samples]
    points = [(si, op, stage, mb, t) for si, (cs, s) in enumerate(samples) for op, stage, mb, t in s.timings
              if op in _COMPUTE and t > 0 and not (op == "BWD_I" and stage in cs.no_input_grads)]
    ops = np.array([stage_ops(samples[si][0].cost_model, samples[si][0].stage_layers[stage], op,
                              stage not in samples[si][0].no_input_grads,
                              samples[si][0].wgrad_recomputes or stage in samples[si][0].whole_wgrad_stages)
                    for si, op, stage, _, _ in points], dtype=float)
    return samples, points, ops


def _design(measured: ClusterProfile, samples: Sequence[tuple[CalibrationSet, CalibrationSample]],
            points: Sequence[tuple[int, str, int, int, float]], ops: np.ndarray, dense: bool,
            dtype: str) -> np.ndarray:
    """The fit's design matrix: one row per timed instruction ``(sample index, op, stage, mb,
    seconds)`` of ``points``, the columns of the module docstring's model (compute, attention,
    memory, probability bytes fwd / bwd, ATen ops of each kind, 1 for each kind), with masked
    attention counted densely or not."""
    bare = _bare(measured, dense)
    # compute alone (bandwidth taken as unlimited) and the memory traffic apart: on a CPU the two
    # add up rather than overlap, so they get their own multipliers
    nomem = dataclasses.replace(bare, device=dataclasses.replace(bare.device, memory_bandwidth=1e30))
    kw = {"dtype": dtype, "bytes_mode": "sum"}
    models = [StepModel(cs.cost_model, nomem, cs.stage_layers, s.stats, no_input_grads=cs.no_input_grads,
                        wgrad_recomputes=cs.wgrad_recomputes,
                        whole_wgrad_stages=cs.whole_wgrad_stages, **kw) for cs, s in samples]
    with_mem = [StepModel(cs.cost_model, bare, cs.stage_layers, s.stats, no_input_grads=cs.no_input_grads,
                          wgrad_recomputes=cs.wgrad_recomputes,
                          whole_wgrad_stages=cs.whole_wgrad_stages, **kw) for cs, s in samples]
    ins = [(si, Instruction(op=_COMPUTE[op], stage=stage, mb=mb)) for si, op, stage, mb, _ in points]
    compute = np.array([models[si].compute_time(i) for si, i in ins])
    attn = np.array([_attention_seconds(models[si], i) for si, i in ins])
    mem = np.array([with_mem[si].compute_time(i) for si, i in ins]) - compute
    probs = np.array([_probs_bytes(models[si], i) if dense else (0.0, 0.0) for si, i in ins]).reshape(-1, 2)
    # one fixed time per instruction kind, and one time per ATen op per kind: the interpreter's
    # work around a backward (gathering output grads, delivering input grads) is not a
    # forward's, and a split BWD_I also walks the autograd graph in Python
    kinds = np.array([[1.0 if op == k else 0.0 for k in _COMPUTE] for _, op, *_ in points])
    x = np.concatenate([np.stack([np.maximum(compute - attn, 0.0), attn, np.maximum(mem, 0.0)], axis=1),
                        probs, ops[:, None] * kinds, kinds], axis=1)
    return x


def fit_profile(measured: ClusterProfile, sets: Sequence[CalibrationSet], *, link: LinkProfile | None = None,
                name: str | None = None, dtype: str = "float32", weighting: str = "absolute",
                instruction_overhead: float | None = None,
                regularization: str | float = "none") -> CalibrationResult:
    """Fit ``measured``'s throughput scale and overheads to the samples (see module docstring).
    ``dtype``: the layers' compute dtype (its peak must be in the profile). ``weighting``:
    ``"absolute"`` minimises squared seconds (long instructions dominate, as they dominate step
    times), ``"relative"`` squared relative errors (every instruction alike).
    ``instruction_overhead``: a directly measured per-instruction overhead to hold fixed (else fitted).
    ``regularization``: ``"none"`` (default) the plain bounded fit; a number: a ridge penalty of
    that strength toward the physical prior (:func:`_prior`; 0.1 steadies the coefficients, see
    the module docstring); ``"cv"`` the strength of :data:`CV_STRENGTHS` with the least
    cross-validated error over whole steps."""
    if weighting not in ("absolute", "relative"):
        raise CalibrationError(f"weighting={weighting!r}. Fix: use 'absolute' or 'relative'.")
    if isinstance(regularization, str):
        if regularization not in ("cv", "none"):
            raise CalibrationError(f"regularization={regularization!r}. Fix: use 'cv', 'none' or a strength >= 0.")
    elif isinstance(regularization, bool) or not (isinstance(regularization, (int, float))
                                                  and math.isfinite(regularization) and regularization >= 0):
        raise CalibrationError(f"regularization={regularization!r}. Fix: use 'cv', 'none' or a strength >= 0.")
    fixed_strength = 0.0 if regularization == "none" else None if regularization == "cv" else float(regularization)
    samples, points, ops = _points(sets)
    if len(points) < 4:
        raise CalibrationError(f"{len(points)} timed compute instructions. Fix: time at least a few steps "
                               "with several microbatches each (timed_local_step).")
    # repeats of one batch on one pipeline are one step for cross-validation
    step_keys = [(i, repr(list(s.stats))) for i, cs in enumerate(sets) for s in cs.samples]
    y = np.array([t for *_, t in points])
    folds, num_folds = _step_folds(step_keys, np.array([si for si, *_ in points]))
    fits, trimmed, chosen = {}, {}, {}
    for dense in (False, True):
        x = _design(measured, samples, points, ops, dense, dtype)
        # relative: the floor keeps a few near-empty instructions (timer noise) from steering the fit
        w = 1.0 / np.maximum(y, 0.1 * float(np.median(y))) if weighting == "relative" else np.ones_like(y)
        keep = np.ones_like(y, dtype=bool)
        # compute time is never below the roofline at the measured matmul throughput (the profile's
        # best-of timings): the compute multiplier is bounded below by 1. Without the bound, compute
        # and the per-instruction constants are nearly collinear on tiny models, and one quiet run
        # put compute at x0.25 with a 6 ms constant on every BWD_I, another at x2.76 with 10 us.
        lower = np.zeros(x.shape[1])
        lower[0] = 1.0
        # a directly measured per-instruction overhead is held fixed: the fit explains the rest
        xf, yf = (x, y) if instruction_overhead is None else (x[:, :_CONST], y - instruction_overhead)
        # the columns are nearly collinear on tiny models (compute, the per-kind constants and the
        # per-op times all grow little within a model): a ridge penalty toward the physical prior
        # picks one of the many near-equal fits, at the strength whose fits predict held-out steps best
        prior = _prior(xf, measured)

        def solve(rows: np.ndarray, strength: float) -> np.ndarray:
            coef = _nnls(xf[rows] * w[rows, None], yf[rows] * w[rows], lower[:xf.shape[1]], prior, strength)
            return coef if instruction_overhead is None else np.append(coef, [instruction_overhead] * len(_COMPUTE))

        def held_out(rows: np.ndarray, strength: float) -> np.ndarray | None:
            """Squared held-out residual of every point of ``rows`` (weighted as the fit is; 0
            elsewhere), each predicted by the fit on the other folds' steps."""
            if num_folds < 2:
                return None
            sq = np.zeros_like(y)
            for f in range(num_folds):
                train, test = rows & (folds != f), rows & (folds == f)
                if train.any() and test.any():
                    sq[test] = ((x[test] @ solve(train, strength) - y[test]) * w[test]) ** 2
            return sq

        def rms(sq: np.ndarray, rows: np.ndarray) -> float:
            """RMS of ``sq`` over ``rows``, relative (absolute weighting: over the mean time)."""
            r = math.sqrt(float(sq[rows].sum()) / int(rows.sum()))
            return r if weighting == "relative" else r / float(np.mean(y[rows]))

        # fit, drop the outliers (an instruction descheduled or hit by a GC pause), refit: on the
        # plain fit, whose residuals the collinear directions barely move (and whose held-out
        # errors an outlier would dominate before it is dropped)
        for _ in range(4):
            coef = solve(keep, 0.0)
            fit_keep = keep
            rel = (x @ coef - y) / y
            dev = np.abs(rel - np.median(rel))
            kept = dev <= max(_OUTLIER_MADS * 1.4826 * float(np.median(dev)), _OUTLIER_FLOOR)
            if (kept == keep).all():
                break
            keep = kept
        keep = fit_keep
        # then the penalty's strength, chosen on the points kept (every candidate sees the same)
        strength, curve, cv = fixed_strength or 0.0, None, None
        if fixed_strength is None and num_folds >= 2:
            sqs = [held_out(keep, lam) for lam in CV_STRENGTHS]
            curve = tuple((lam, rms(sq, keep)) for lam, sq in zip(CV_STRENGTHS, sqs))
            best = int(np.argmin([float(sq[keep].sum()) for sq in sqs]))
            strength, cv = curve[best]
        elif num_folds >= 2:
            cv = rms(held_out(keep, strength), keep)
        if strength > 0:
            coef = solve(keep, strength)
            rel = (x @ coef - y) / y
        chosen[dense] = (strength, cv, curve or ())
        trimmed[dense] = int((~keep).sum())
        resid = rel if weighting == "relative" else (x @ coef - y) / float(np.mean(y))
        fits[dense] = (float(np.sqrt(np.mean(resid ** 2))), coef, rel)
    if fixed_strength is None and chosen[True][1] is not None and chosen[False][1] is not None:
        dense = chosen[True][1] < chosen[False][1]    # the variant that predicts held-out steps better
    else:
        dense = fits[True][0] < fits[False][0]
    _, coef, rel = fits[dense]
    strength, cv, curve = chosen[dense]
    a, b, m, pf, pb = (float(v) for v in coef[:5])
    seen = {op for _, op, *_ in points}
    per_op = {k: float(v) for k, v in zip(_COMPUTE, coef[5:5 + len(_COMPUTE)]) if k in seen}
    oo = float(np.mean(list(per_op.values())))    # for compute kinds the samples did not show
    kind_oo = {k: per_op.get(k, oo) for k in _COMPUTE}
    per_kind = {k: float(v) for k, v in zip(_COMPUTE, coef[5 + len(_COMPUTE):]) if k in seen}
    c = float(np.mean(list(per_kind.values())))   # for compute kinds the samples did not show
    others: dict[str, list[float]] = {}
    for _, sample in samples:
        for op, t in sample.other_timings:
            others.setdefault(op, []).append(t)
    op_overheads = {**per_kind, **{op: float(np.mean(ts)) for op, ts in others.items()}}   # sums add means
    counted = sum(sample.num_instructions for _, sample in samples)
    dispatch = max(0.0, sum(sample.untimed_seconds for _, sample in samples) / counted) if counted else 0.0
    if dispatch > 0:   # every instruction pays the dispatch loop, REDUCE and OPTIM included
        op_overheads = {op.value: op_overheads.get(op.value, 0.0) + dispatch for op in Op}
    if a <= 0:
        a = 1.0   # the roofline explains nothing: keep the measured throughput (overheads carry the fit)
    held = f"held-out RMS error {cv:.3g}" if cv is not None else None
    if fixed_strength is not None:
        how = "given" + (f", {held}" if held else "")
    else:
        how = f"chosen by {num_folds}-fold cross-validation over steps, {held}" if held else \
            "no cross-validation: fewer than 2 steps"
    dev = measured.device
    # attention runs at its own multiplier b: its curve is scaled by a / b (clamped to 1: an attention
    # faster than the measured matmul peak cannot be expressed; 1 is the closest). Memory traffic at
    # multiplier m: bandwidth / m (the step model takes max(compute, memory) per layer, so this is exact
    # only where memory dominates); m = 0 (traffic explains nothing) leaves the bandwidth unlimited.
    ratio = a / b if b > 0 else float("inf")
    att = EfficiencyCurve(points=tuple((x, min(1.0, e * ratio)) for x, e in dev.efficiency["attention"].points))
    bandwidth = dev.memory_bandwidth / m if m > 0 else dev.memory_bandwidth * 1e6
    cal_dev = dataclasses.replace(
        dev, peak_flops={k: v / a for k, v in dev.peak_flops.items()}, memory_bandwidth=bandwidth,
        efficiency={**dev.efficiency, "attention": att},
        launch_overhead=0.0, op_overhead=0.0, instruction_overhead=float(c), dense_masked_attention=dense,
        op_overheads=op_overheads, probs_fwd_byte_time=pf, probs_bwd_byte_time=pb, kind_op_overheads=kind_oo,
        bytes_mode="sum",   # the fit adds compute and memory-traffic time; predictions must too
        source=(f"{dev.source}; calibrated on {len(points)} timed instructions of {len(samples)} steps: "
                f"compute time x {a:.3g}, attention x {b:.3g}, memory traffic x {m:.3g}, per ATen op "
                + ", ".join(f"{k} {v * 1e6:.3g} us" for k, v in kind_oo.items()) + ", per instruction "
                + ", ".join(f"{k} {v * 1e6:.0f} us" for k, v in per_kind.items())
                + f", masked attention {'dense' if dense else 'sparse'}"
                + (f" ({pf * 1e9:.3g} / {pb * 1e9:.3g} ns per probability byte fwd / bwd)" if dense else "")
                + f"; ridge strength {strength:.3g} toward the prior ({how})"))
    links = {}
    if link is not None:
        links = {"intra_node": link, "inter_node": link}
    profile = dataclasses.replace(measured, name=name or f"{measured.name}-calibrated", device=cal_dev,
                                  source=measured.source + ("; links fitted by gloo ping-pong" if link else ""),
                                  **links)
    return CalibrationResult(profile=profile, scale=float(a), attention_scale=float(b), memory_scale=float(m),
                             op_overhead=float(oo), kind_op_overheads=kind_oo, instruction_overhead=float(c),
                             dense_masked_attention=dense, num_points=len(points), op_overheads=op_overheads,
                             probs_fwd_byte_time=pf, probs_bwd_byte_time=pb, dispatch_overhead=dispatch,
                             median_rel_error=float(np.median(np.abs(rel))), num_outliers=trimmed[dense],
                             residuals={"sparse": fits[False][0], "dense": fits[True][0]},
                             regularization=str(regularization) if isinstance(regularization, str) else "fixed",
                             regularization_strength=float(strength), cv_error=cv, cv_folds=num_folds,
                             cv_curve=curve)


def fit_link(one_way: Sequence[tuple[float, float]]) -> LinkProfile:
    """``latency + bytes / bandwidth`` fitted to ``(bytes, one-way seconds)`` measurements."""
    if len(one_way) < 2 or len({b for b, _ in one_way}) < 2:
        raise CalibrationError("a link fit needs times at two or more message sizes. Fix: measure more sizes.")
    b = np.array([x for x, _ in one_way], dtype=float)
    t = np.array([y for _, y in one_way], dtype=float)
    coef = _nnls(np.stack([np.ones_like(b), b], axis=1), t)
    latency, per_byte = float(coef[0]), float(coef[1])
    bandwidth = 1.0 / per_byte if per_byte > 0 else 1e12
    if not math.isfinite(bandwidth):
        bandwidth = 1e12
    return LinkProfile(latency=latency, bandwidth=bandwidth)
