"""Calibration recovers the parameters that generated its timings, writes a profile that loads
like a preset, and bad inputs fail with errors that say what to do."""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from dipc.ir import Instruction, Op
from dipc.semu.calibrate import (CalibrationError, CalibrationSample, CalibrationSet, fit_link, fit_profile,
                                 stage_ops)
from dipc.semu.profiles import EfficiencyCurve, LinkProfile, ProfileError, load_preset, load_profile, save_profile
from dipc.semu.step_model import StepModel, pipeline_length_stats


def _cpu_like():
    """A CPU-ish profile with flat efficiency curves (so the roofline scales exactly)."""
    h = load_preset("h800")
    flat = {k: EfficiencyCurve(points=((1.0, 0.5),)) for k in h.device.efficiency}
    dev = dataclasses.replace(h.device, peak_flops={"float32": 50e9}, memory_bandwidth=10e9, efficiency=flat,
                              launch_overhead=0.0)
    return dataclasses.replace(h, device=dev)


def _truth_timings(ex, pipe, cm, truth, ops=(Op.FWD, Op.BWD_I, Op.BWD_W), **model_kwargs):
    """One batch of 3 microbatches timed by the step model on ``truth``: (its stats, per-instruction
    timings of ``ops`` on both stages), what calibration is fitted to."""
    layers = [s.layers for s in sorted(pipe.stages, key=lambda s: s.id)]
    mbs = ex.data.microbatches(3, 2)
    stats = [pipeline_length_stats(pipe, mb) for mb in mbs]
    sm = StepModel(cm, truth, layers, stats, dtype="float32", **model_kwargs)
    return stats, [(op.value, s, m, sm.compute_time(Instruction(op=op, stage=s, mb=m)))
                   for s in range(2) for m in range(3) for op in ops]


def test_fit_recovers_the_generating_parameters(vlm_2stage):
    ex, pipe, cm = vlm_2stage
    base = _cpu_like()
    # FLOP-bound truth (the fit separates compute and memory traffic; the step model takes their max)
    base = dataclasses.replace(base, device=dataclasses.replace(base.device, memory_bandwidth=1e16))
    truth = dataclasses.replace(base, device=dataclasses.replace(
        base.device, peak_flops={"float32": 25e9}, memory_bandwidth=5e15, op_overhead=2e-6,
        instruction_overhead=300e-6, dense_masked_attention=True))
    layers = [s.layers for s in sorted(pipe.stages, key=lambda s: s.id)]
    samples = [CalibrationSample(stats=stats, timings=timings)
               for stats, timings in (_truth_timings(ex, pipe, cm, truth, wgrad_recomputes=True) for _ in range(3))]
    result = fit_profile(base, [CalibrationSet(stage_layers=layers, cost_model=cm, samples=samples,
                                               wgrad_recomputes=True)], regularization="cv")
    assert result.dense_masked_attention
    assert result.scale == pytest.approx(2.0, rel=1e-6)
    assert result.op_overhead == pytest.approx(2e-6, rel=1e-6)
    assert result.instruction_overhead == pytest.approx(300e-6, rel=1e-5)   # the mean of four fitted kinds
    assert result.median_rel_error < 1e-6
    assert result.profile.device.peak_flops["float32"] == pytest.approx(25e9)


def test_a_descheduled_instruction_does_not_steer_the_fit(vlm_2stage):
    """One instruction that took 30 ms longer (the thread was descheduled, a GC pause) is left
    out, and the generating parameters come back as if it were not there."""
    ex, pipe, cm = vlm_2stage
    base = _cpu_like()
    base = dataclasses.replace(base, device=dataclasses.replace(base.device, memory_bandwidth=1e16))
    truth = dataclasses.replace(base, device=dataclasses.replace(
        base.device, peak_flops={"float32": 25e9}, memory_bandwidth=5e15, instruction_overhead=300e-6))
    layers = [s.layers for s in sorted(pipe.stages, key=lambda s: s.id)]
    samples = []
    for k in range(4):
        stats, timings = _truth_timings(ex, pipe, cm, truth, wgrad_recomputes=True)
        if k == 1:
            op, s, m, t = timings[4]
            timings[4] = (op, s, m, t + 0.03)
        samples.append(CalibrationSample(stats=stats, timings=timings))
    result = fit_profile(base, [CalibrationSet(stage_layers=layers, cost_model=cm, samples=samples,
                                               wgrad_recomputes=True)], regularization="cv")
    assert result.num_outliers == 1
    assert result.scale == pytest.approx(2.0, rel=1e-3)
    assert result.instruction_overhead == pytest.approx(300e-6, rel=1e-3)


def test_fit_recovers_per_op_overheads_probability_traffic_and_dispatch(vlm_2stage):
    ex, pipe, cm = vlm_2stage
    base = _cpu_like()
    base = dataclasses.replace(base, device=dataclasses.replace(base.device, memory_bandwidth=1e16))
    kinds = {"FWD": 200e-6, "BWD_I": 100e-6, "BWD_W": 400e-6}
    truth = dataclasses.replace(base, device=dataclasses.replace(
        base.device, peak_flops={"float32": 25e9}, memory_bandwidth=5e15, op_overheads=kinds,
        dense_masked_attention=True, probs_fwd_byte_time=2e-9, probs_bwd_byte_time=1e-9))
    layers = [s.layers for s in sorted(pipe.stages, key=lambda s: s.id)]
    samples = []
    for i in range(3):
        stats, timings = _truth_timings(ex, pipe, cm, truth, wgrad_recomputes=True)
        samples.append(CalibrationSample(stats=stats, timings=timings, other_timings=[("SEND_ACT", 30e-6 + i * 1e-6)],
                                         untimed_seconds=10e-6 * 20, num_instructions=20))
    result = fit_profile(base, [CalibrationSet(stage_layers=layers, cost_model=cm, samples=samples,
                                               wgrad_recomputes=True)], regularization="cv")
    dev = result.profile.device
    assert result.dense_masked_attention and result.dispatch_overhead == pytest.approx(10e-6)
    # probability bytes and dense attention FLOPs both grow with H·(ΣL)²: nearly collinear columns,
    # so the split between them is recovered to a few percent while the times are exact
    assert result.median_rel_error < 1e-6
    for op, want in kinds.items():
        assert dev.op_overheads[op] == pytest.approx(want + 10e-6, rel=0.02), op
    assert dev.op_overheads["SEND_ACT"] == pytest.approx(31e-6 + 10e-6)      # mean, plus dispatch
    assert dev.op_overheads["OPTIM"] == pytest.approx(10e-6)                 # dispatch only
    assert dev.probs_fwd_byte_time == pytest.approx(2e-9, rel=0.05)
    assert dev.probs_bwd_byte_time == pytest.approx(1e-9, rel=0.05)


def test_fit_recovers_a_time_per_op_for_each_instruction_kind(vlm_2stage):
    """A split BWD_I walks the autograd graph in Python: its time per dispatched op is not a
    forward's, and the fit must tell them apart (and the step model charge them per stage)."""
    ex, pipe, cm = vlm_2stage
    base = _cpu_like()
    base = dataclasses.replace(base, device=dataclasses.replace(base.device, memory_bandwidth=1e16))
    per_op = {"FWD": 1e-6, "BWD": 3e-6, "BWD_I": 6e-6, "BWD_W": 2e-6}
    truth = dataclasses.replace(base, device=dataclasses.replace(
        base.device, peak_flops={"float32": 25e9}, kind_op_overheads=per_op, instruction_overhead=100e-6))
    layers = [s.layers for s in sorted(pipe.stages, key=lambda s: s.id)]
    samples = []
    for _ in range(3):
        mbs = ex.data.microbatches(3, 2)
        stats = [pipeline_length_stats(pipe, mb) for mb in mbs]
        sm = StepModel(cm, truth, layers, stats, dtype="float32", no_input_grads=[0])
        timings = [(op.value, s, m, sm.compute_time(Instruction(op=op, stage=s, mb=m)))
                   for s in range(2) for m in range(3) for op in (Op.FWD, Op.BWD, Op.BWD_I, Op.BWD_W)
                   if not (s == 0 and op is Op.BWD_I)]
        samples.append(CalibrationSample(stats=stats, timings=timings))
        # the per-op time is charged on the stage's op count
        i = Instruction(op=Op.BWD_I, stage=1, mb=0)
        assert sm.dispatch_time(Op.BWD_I, 1) == pytest.approx(stage_ops(cm, layers[1], "BWD_I") * 6e-6)
        assert sm.compute_time(i) == pytest.approx(sm.stage_time(1, 0).bwd_in + 100e-6 + sm.dispatch_time(Op.BWD_I, 1))
    result = fit_profile(base, [CalibrationSet(stage_layers=layers, cost_model=cm, samples=samples,
                                               no_input_grads=[0])], regularization="cv")
    assert result.median_rel_error < 1e-6
    # BWD_I runs on one stage only (stage 0 has no input grads): its op count never varies, so its
    # per-op time and its fixed time are one number; the others are seen at two op counts
    for op in ("FWD", "BWD", "BWD_W"):
        assert result.kind_op_overheads[op] == pytest.approx(per_op[op], rel=1e-3), op
    assert result.profile.device.kind_op_overheads == result.kind_op_overheads
    assert result.profile.device.op_overhead == 0.0   # replaced, not added twice


def test_calibrated_profile_predicts_the_steps_it_was_fitted_on(vlm_2stage):
    """On a CPU compute and memory traffic add up, and calibration fits them as a sum: the profile
    it writes must make the step model add them too, or every prediction runs low (by the smaller
    of the two per layer). Truth here has both terms large, so max and sum differ a lot."""
    ex, pipe, cm = vlm_2stage
    base = _cpu_like()
    truth = dataclasses.replace(base, device=dataclasses.replace(
        base.device, peak_flops={"float32": 25e9}, memory_bandwidth=0.5e9, instruction_overhead=100e-6,
        bytes_mode="sum"))
    layers = [s.layers for s in sorted(pipe.stages, key=lambda s: s.id)]
    samples, programs = [], []
    for _ in range(3):
        mbs = ex.data.microbatches(3, 2)
        stats = [pipeline_length_stats(pipe, mb) for mb in mbs]
        sm = StepModel(cm, truth, layers, stats, dtype="float32", no_input_grads=[0])
        timings = [(op.value, s, m, sm.compute_time(Instruction(op=op, stage=s, mb=m)))
                   for s in range(2) for m in range(3) for op in (Op.FWD, Op.BWD)]
        samples.append(CalibrationSample(stats=stats, timings=timings))
        programs.append((stats, sum(t for *_, t in timings)))
    sum_only = StepModel(cm, truth, layers, programs[0][0], dtype="float32", no_input_grads=[0])
    max_only = StepModel(cm, truth, layers, programs[0][0], dtype="float32", no_input_grads=[0], bytes_mode="max")
    fwd = Instruction(op=Op.FWD, stage=1, mb=0)
    assert max_only.compute_time(fwd) < 0.9 * sum_only.compute_time(fwd)   # the two rules really differ here
    result = fit_profile(base, [CalibrationSet(stage_layers=layers, cost_model=cm, samples=samples,
                                               no_input_grads=[0])], regularization="cv")
    assert result.profile.device.bytes_mode == "sum"
    for stats, total in programs:
        sm = StepModel(cm, result.profile, layers, stats, dtype="float32", no_input_grads=[0])
        got = sum(sm.compute_time(Instruction(op=op, stage=s, mb=m))
                  for s in range(2) for m in range(3) for op in (Op.FWD, Op.BWD))
        assert got == pytest.approx(total, rel=1e-3)


def test_calibrated_profile_loads_like_a_preset(tmp_path):
    dev = dataclasses.replace(_cpu_like().device, op_overhead=1.5e-6, instruction_overhead=4e-4,
                              dense_masked_attention=True, op_overheads={"FWD": 1e-4, "SEND_ACT": 2e-5},
                              probs_fwd_byte_time=1e-9, probs_bwd_byte_time=5e-10,
                              kind_op_overheads={"FWD": 1e-6, "BWD_I": 4e-6}, bytes_mode="sum")
    prof = dataclasses.replace(_cpu_like(), device=dev, name="cal")
    path = save_profile(prof, tmp_path / "cal.json")
    assert load_profile(path) == prof
    # presets and old files carry none of the new keys and still load with the defaults
    obj = json.loads(path.read_text())
    for k in ("op_overhead", "instruction_overhead", "dense_masked_attention", "op_overheads", "probs_fwd_byte_time",
              "probs_bwd_byte_time", "kind_op_overheads", "bytes_mode"):
        del obj["device"][k]
    path.write_text(json.dumps(obj))
    assert load_profile(path).device.op_overhead == 0.0
    assert load_profile(path).device.bytes_mode == "max"
    obj["device"]["bytes_mode"] = "overlap"
    path.write_text(json.dumps(obj))
    with pytest.raises(ProfileError, match="device.bytes_mode.*use max"):
        load_profile(path)
    del obj["device"]["bytes_mode"]
    obj["device"]["op_overhead"] = -1
    path.write_text(json.dumps(obj))
    with pytest.raises(ProfileError, match="device.op_overhead"):
        load_profile(path)


def test_unknown_profile_names_list_the_presets(tmp_path):
    with pytest.raises(ProfileError, match=r"unknown device preset 'v100'.*a100_80gb.*h100_sxm"):
        load_profile("v100")
    with pytest.raises(ProfileError, match=r"no profile file .*h800"):
        load_profile(str(tmp_path / "missing.json"))


def test_fit_link_recovers_latency_and_bandwidth():
    link = LinkProfile(latency=80e-6, bandwidth=2e9)
    fitted = fit_link([(b, link.transfer_time(b)) for b in (4, 1 << 16, 1 << 20, 1 << 22)])
    assert fitted.latency == pytest.approx(80e-6, rel=1e-6)
    assert fitted.bandwidth == pytest.approx(2e9, rel=1e-6)
    with pytest.raises(CalibrationError, match="two or more message sizes"):
        fit_link([(4, 1e-4)])


def test_too_few_timings_fail_clearly(vlm_2stage):
    ex, pipe, cm = vlm_2stage
    layers = [s.layers for s in pipe.stages]
    sample = CalibrationSample(stats=[pipeline_length_stats(pipe, ex.data.microbatches(1, 2)[0])],
                               timings=[("FWD", 0, 0, 1e-3)])
    with pytest.raises(CalibrationError, match="Fix: time at least"):
        fit_profile(_cpu_like(), [CalibrationSet(stage_layers=layers, cost_model=cm, samples=[sample])])
    with pytest.raises(CalibrationError, match="weighting"):
        fit_profile(_cpu_like(), [], weighting="cubic")


def test_op_counts_split_the_backward(vlm_2stage):
    ex, pipe, cm = vlm_2stage
    layers = pipe.stages[1].layers
    f, bi, b = (stage_ops(cm, layers, op) for op in ("FWD", "BWD_I", "BWD"))
    assert 0 < f < b and 0 < bi < b
    assert stage_ops(cm, layers, "BWD_W") == b - bi
    assert stage_ops(cm, layers, "BWD_W", wgrad_recomputes=True) == b
    assert stage_ops(cm, layers, "BWD_I", input_grads=False) == 0


def test_runtime_options_and_dense_attention(vlm_2stage):
    """StepModel follows dipc's interpreter when asked: the first stage's BWD_I is empty and its
    BWD_W costs a whole backward, while a later stage's BWD_W runs only the weight gradients (the
    split backward does not walk twice); dense masked attention costs more only for packed streams."""
    ex, pipe, cm = vlm_2stage
    mbs = ex.data.microbatches(2, 2)
    stats = [pipeline_length_stats(pipe, mb) for mb in mbs]
    prof = _cpu_like()
    dev = dataclasses.replace(prof.device, instruction_overhead=1e-3)
    prof = dataclasses.replace(prof, device=dev)
    opts = StepModel.runtime_options(pipe)
    assert opts["no_input_grads"] == [0] and not opts["wgrad_recomputes"]   # the split backward walks once
    ideal = StepModel.for_pipeline(pipe, cm, prof, stats)
    real = StepModel.for_pipeline(pipe, cm, prof, stats, **opts)
    t = lambda sm, op, s: sm.compute_time(Instruction(op=op, stage=s, mb=0))
    assert t(real, Op.BWD_I, 0) == 0.0 and t(ideal, Op.BWD_I, 0) > 1e-3
    assert t(real, Op.BWD_W, 0) == pytest.approx(t(real, Op.BWD, 0)) and t(real, Op.BWD_W, 0) > t(ideal, Op.BWD_W, 0)
    assert t(real, Op.BWD_W, 1) == pytest.approx(t(ideal, Op.BWD_W, 1))
    assert t(real, Op.BWD_W, 1) < t(real, Op.BWD, 1)
    rewalk = StepModel.for_pipeline(pipe, cm, prof, stats, **{**opts, "wgrad_recomputes": True})
    assert t(rewalk, Op.BWD_W, 1) == pytest.approx(t(rewalk, Op.BWD, 1))
    assert t(real, Op.FWD, 1) == pytest.approx(t(ideal, Op.FWD, 1))
    from dipc.semu.step_model import _dense_attention

    vision = [p for p in pipe.stages[0].layers if ".blocks." in p][0]   # packed, block-diagonal mask
    lm = [p for p in pipe.stages[1].layers if ".layers." in p][0]        # padded, causal
    st = stats[0]["vision"]
    sparse = cm.cost(vision, st)
    dense = _dense_attention(cm, vision, st, sparse)
    assert dense.attn_fwd_flops == pytest.approx(sparse.attn_fwd_flops * st.tokens ** 2 / st.sum_sq)
    assert dense.bwd_in_flops - sparse.bwd_in_flops == pytest.approx(2 * (dense.attn_fwd_flops - sparse.attn_fwd_flops))
    lm_cost = cm.cost(lm, stats[0]["language_model"])
    assert lm_cost.attn_fwd_flops > 0 and _dense_attention(cm, lm, stats[0]["language_model"], lm_cost) == lm_cost


def test_compute_multiplier_is_bounded_below_by_the_roofline():
    """Nearly collinear columns (compute seconds ~ a per-instruction constant, as on tiny models):
    plain NNLS trades compute for the constant and reports compute faster than the measured
    roofline; the bounded fit keeps the multiplier at >= 1 and still explains the times."""
    from dipc.semu.calibrate import _nnls

    rng = np.random.default_rng(0)
    compute = 1e-3 * (1 + 0.01 * rng.standard_normal(200))          # almost constant
    x = np.stack([compute, np.ones(200)], axis=1)
    y = 0.2 * compute + 0.9e-3 + 1e-6 * rng.standard_normal(200)     # a "fast" compute plus a constant
    free = _nnls(x, y)
    bounded = _nnls(x, y, np.array([1.0, 0.0]))
    assert free[0] < 1.0 <= bounded[0] + 1e-12
    assert np.median(np.abs(x @ bounded / y - 1)) < 0.02


# -- regularisation (ridge toward the physical prior, strength by cross-validation over steps) ----


def _timed_steps(ex, pipe, cm, truth, *, seed: int, steps: int, repeats: int = 1, noise: float = 0.0,
                 no_input_grads=(0,)):
    """``steps`` batches of 3 microbatches from a fresh data stream (``seed``: independent of the
    other tests' draws), each timed ``repeats`` times by the step model on ``truth``, every
    instruction's time scaled by ``1 + noise * N(0, 1)`` (as the local executor's calibration
    steps run each batch several times)."""
    data = type(ex.data)(ex.config, ex.data.dc, seed=seed)
    rng = np.random.default_rng(seed)
    layers = [s.layers for s in sorted(pipe.stages, key=lambda s: s.id)]
    out = []
    for _ in range(steps):
        stats = [pipeline_length_stats(pipe, mb) for mb in data.microbatches(3, 2)]
        sm = StepModel(cm, truth, layers, stats, dtype="float32", no_input_grads=list(no_input_grads))
        exact = [(op.value, s, m, sm.compute_time(Instruction(op=op, stage=s, mb=m)))
                 for s in range(2) for m in range(3) for op in (Op.FWD, Op.BWD, Op.BWD_I, Op.BWD_W)
                 if not (s in no_input_grads and op is Op.BWD_I)]
        for _ in range(repeats):
            out.append(CalibrationSample(stats=stats, timings=[(o, s, m, t * (1 + noise * rng.standard_normal()))
                                                               for o, s, m, t in exact]))
    return layers, out


def _cpu_truth(base, **device):
    """A CPU-like truth: compute (and attention) at 2.5x the roofline, memory traffic at the
    profile's bandwidth, per-op and fixed times per kind, added up as calibration fits them."""
    return dataclasses.replace(base, device=dataclasses.replace(base.device, **{
        "peak_flops": {"float32": 20e9}, "bytes_mode": "sum",
        "kind_op_overheads": {"FWD": 4e-6, "BWD": 3e-6, "BWD_I": 5e-6, "BWD_W": 4e-6},
        "op_overheads": {"FWD": 300e-6, "BWD": 400e-6, "BWD_I": 250e-6, "BWD_W": 350e-6}, **device}))


def test_regularised_fits_of_disjoint_steps_agree(vlm_2stage):
    """Nearly collinear columns plus 10% noise: the unit-norm design's smallest singular values are
    tiny (BWD_I runs on one stage only, so its per-op and fixed times are one number, and within
    one pipeline compute varies little against the constants). Fits on two disjoint halves of the
    steps then disagree wildly on compute, attention and memory multipliers without the penalty,
    and agree closely with a strength of 0.1 (median over 5 noise draws). Cross-validation is left
    out: with 4 steps per half it often finds no penalty worth its bias, as on real runs."""
    from dipc.semu.calibrate import _design, _points

    ex, pipe, cm = vlm_2stage
    base = _cpu_like()
    truth = _cpu_truth(base)
    spreads: dict[str, list[float]] = {"none": [], 0.1: []}
    for seed in range(5):
        layers, steps = _timed_steps(ex, pipe, cm, truth, seed=seed, steps=8, repeats=3, noise=0.1)
        halves = [[CalibrationSet(stage_layers=layers, cost_model=cm, samples=part, no_input_grads=[0])]
                  for part in (steps[:12], steps[12:])]
        if seed == 0:
            x = _design(base, *_points(halves[0]), dense=False, dtype="float32")
            x = x[:, np.linalg.norm(x, axis=0) > 0]                        # (no probability columns)
            sv = np.linalg.svd(x / np.linalg.norm(x, axis=0), compute_uv=False)
            assert sv[-2] / sv[0] < 0.05 and sv[-1] / sv[0] < 1e-12      # nearly collinear, and one exact tie
        for mode, got in spreads.items():
            a, b = (fit_profile(base, half, regularization=mode) for half in halves)
            got.append(max(abs(u - v) / ((u + v) / 2) for u, v in ((a.scale, b.scale),
                                                                     (a.attention_scale, b.attention_scale),
                                                                     (a.memory_scale, b.memory_scale))))
    assert np.median(spreads["none"]) > 0.4, spreads
    assert np.median(spreads[0.1]) < 0.1, spreads


def test_regularised_fit_recovers_well_determined_coefficients(vlm_2stage):
    """No noise, BWD_I on both stages (every column told apart): cross-validation finds the exact
    fit best and recovers coefficients far from the prior (attention at 2x compute's multiplier,
    memory traffic at 1.5x, fixed times per kind 50 us to 1.9 ms); a strong fixed penalty would
    pull them toward the prior instead."""
    ex, pipe, cm = vlm_2stage
    base = _cpu_like()
    consts = {"FWD": 50e-6, "BWD": 600e-6, "BWD_I": 300e-6, "BWD_W": 1.9e-3}
    per_op = {"FWD": 8e-6, "BWD": 2e-6, "BWD_I": 8e-6, "BWD_W": 1e-6}
    attention = EfficiencyCurve(points=((1.0, 0.25),))    # half the matmul efficiency: b = 2a
    truth = _cpu_truth(base, memory_bandwidth=base.device.memory_bandwidth / 1.5, op_overheads=consts,
                       kind_op_overheads=per_op, efficiency={**base.device.efficiency, "attention": attention})
    layers, steps = _timed_steps(ex, pipe, cm, truth, seed=3, steps=4, no_input_grads=())
    sets = [CalibrationSet(stage_layers=layers, cost_model=cm, samples=steps)]
    result = fit_profile(base, sets, regularization="cv")
    assert result.regularization_strength <= 1e-6 and result.median_rel_error < 1e-4
    assert result.scale == pytest.approx(2.5, rel=0.02)
    assert result.attention_scale == pytest.approx(5.0, rel=0.02)
    assert result.memory_scale == pytest.approx(1.5, rel=0.02)
    for op in consts:
        assert result.op_overheads[op] == pytest.approx(consts[op], rel=0.03), op
        assert result.kind_op_overheads[op] == pytest.approx(per_op[op], rel=0.03), op
    strong = fit_profile(base, sets, regularization=1.0)
    assert strong.attention_scale / strong.scale < 1.6 and strong.median_rel_error > 0.01   # the prior: b = a


def test_regularisation_choice_is_recorded(vlm_2stage):
    from dipc.semu.calibrate import CV_FOLDS, CV_STRENGTHS, _step_folds

    ex, pipe, cm = vlm_2stage
    base = _cpu_like()
    layers, steps = _timed_steps(ex, pipe, cm, _cpu_truth(base), seed=1, steps=6, repeats=2, noise=0.1)
    sets = [CalibrationSet(stage_layers=layers, cost_model=cm, samples=steps, no_input_grads=[0])]
    default = fit_profile(base, sets)
    assert (default.regularization, default.regularization_strength) == ("none", 0.0)
    cv = fit_profile(base, sets, regularization="cv")
    assert cv.regularization == "cv" and cv.cv_folds == CV_FOLDS
    assert [s for s, _ in cv.cv_curve] == list(CV_STRENGTHS)
    assert cv.regularization_strength in CV_STRENGTHS
    assert cv.cv_error == min(e for _, e in cv.cv_curve) == dict(cv.cv_curve)[cv.regularization_strength]
    assert cv.regularization_strength > 0          # the noisy, collinear case wants a penalty
    src = cv.profile.device.source
    assert f"ridge strength {cv.regularization_strength:.3g}" in src
    assert f"{CV_FOLDS}-fold cross-validation over steps, held-out RMS error {cv.cv_error:.3g}" in src
    none = fit_profile(base, sets, regularization="none")
    assert (none.regularization, none.regularization_strength, none.cv_curve) == ("none", 0.0, ())
    assert none.cv_error is not None and none.cv_error > cv.cv_error     # held-out error at strength 0
    assert "ridge strength 0 toward the prior (given" in none.profile.device.source
    fixed = fit_profile(base, sets, regularization=0.05)
    assert (fixed.regularization, fixed.regularization_strength) == ("fixed", 0.05)
    for bad in ("ridge", -1.0, float("nan"), True):
        with pytest.raises(CalibrationError, match="regularization"):
            fit_profile(base, sets, regularization=bad)
    one = fit_profile(base, [CalibrationSet(stage_layers=layers, cost_model=cm, samples=steps[:2],
                                            no_input_grads=[0])], regularization="cv")   # two repeats: one step
    assert (one.cv_folds, one.cv_error, one.regularization_strength) == (0, None, 0.0)
    assert "ridge strength 0 toward the prior (no cross-validation: fewer than 2 steps)" in one.profile.device.source
    # repeats of one batch (equal stats) share a fold; the steps are dealt round-robin
    folds, k = _step_folds(["s0", "s0", "s1", "s2", "s1"], np.array([0, 1, 2, 3, 4, 4]))
    assert k == 3 and list(folds) == [0, 0, 1, 2, 1, 1]
    assert _step_folds(["s0", "s0"], np.array([0, 1]))[1] == 0      # one step: no cross-validation
