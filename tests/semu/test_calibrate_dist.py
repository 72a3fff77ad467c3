"""Calibrating a profile to the multi-process executor: P2P op times from measured spans, and a
compute factor for co-located ranks recovered from step times it generated."""
from __future__ import annotations

import dataclasses

import pytest

from dipc.semu.calibrate_dist import (DistributedCalibrationError, DistributedSample, fit_distributed,
                                      p2p_overheads, scale_compute, with_wake_latency)
from dipc.semu.profiles import load_preset
from dipc.semu.step_model import StepModel, pipeline_length_stats


def _cpu_profile():
    h = load_preset("h800")
    dev = dataclasses.replace(h.device, peak_flops={"float32": 50e9, "bfloat16": 50e9}, memory_bandwidth=10e9,
                              instruction_overhead=100e-6, op_overheads={"SEND_ACT": 20e-6, "RECV_ACT": 30e-6},
                              kind_op_overheads={"FWD": 2e-6})
    return dataclasses.replace(h, device=dev)


def _sample(ex, pipe, cm, schedule, measured_on=None, fixed=0.0):
    mbs = ex.data.microbatches(4, 2)
    stats = [pipeline_length_stats(pipe, mb) for mb in mbs]
    program = pipe.plan(mbs, schedule=schedule)

    def predict(profile):
        sm = StepModel.for_pipeline(pipe, cm, profile, stats, **StepModel.runtime_options(pipe))
        return sm.simulate(program, memory=False, p2p="handshake").step_time

    measured = predict(measured_on) + fixed if measured_on is not None else 1.0
    return DistributedSample(predict=predict, measured_s=measured)


def test_scale_compute_slows_compute_only():
    prof = _cpu_profile()
    slow = scale_compute(prof, 2.0)
    assert slow.device.peak_flops["float32"] == pytest.approx(25e9)
    assert slow.device.instruction_overhead == pytest.approx(200e-6)
    assert slow.device.kind_op_overheads["FWD"] == pytest.approx(4e-6)
    assert slow.device.op_overheads["SEND_ACT"] == pytest.approx(20e-6)   # P2P is not compute
    assert slow.intra_node == prof.intra_node
    with pytest.raises(DistributedCalibrationError, match="positive"):
        scale_compute(prof, 0.0)


def test_p2p_overheads_take_sends_median_and_receives_that_did_not_wait():
    # most gradient receives of the first rank wait for the backward behind it: their spans are waits
    spans = [("SEND_ACT", 1e-4), ("SEND_ACT", 3e-4), ("SEND_ACT", 2e-4), ("FWD", 9.0)]
    spans += [("RECV_GRAD", 3e-3 + i * 1e-4) for i in range(9)] + [("RECV_GRAD", 1e-4)]
    got = p2p_overheads(spans, dispatch=1e-5)
    assert got == pytest.approx({"SEND_ACT": 2.1e-4, "RECV_GRAD": 1.1e-4})


def test_fit_recovers_the_compute_factor_that_made_the_steps(vlm_2stage):
    ex, pipe, cm = vlm_2stage
    base = _cpu_profile()
    p2p = {"SEND_ACT": 150e-6, "RECV_ACT": 90e-6, "SEND_GRAD": 150e-6, "RECV_GRAD": 90e-6}
    with_p2p = dataclasses.replace(base, device=dataclasses.replace(
        base.device, op_overheads={**base.device.op_overheads, **p2p}))
    truth = scale_compute(with_p2p, 1.3)
    samples = [_sample(ex, pipe, cm, s, measured_on=truth, fixed=1e-3) for s in ("1f1b", "zb_h1", "gpipe")]
    cal = fit_distributed(base, samples, p2p=p2p, step_overhead=1e-3)
    assert cal.compute_factor == pytest.approx(1.3, rel=1e-2)
    assert cal.median_rel_error < 1e-3 < cal.median_rel_error_before
    assert cal.profile.device.op_overheads["SEND_GRAD"] == pytest.approx(150e-6)
    assert cal.profile.device.peak_flops["float32"] == pytest.approx(50e9 / 1.3, rel=1e-2)


def test_fit_separates_the_wake_latency_from_the_compute_factor(vlm_2stage):
    """Steps made with compute x1.2 and blocked receives waking 2 ms late: the schedules wait on
    different numbers of receives, so the two parameters are told apart. (Three schedules cannot
    also pin the co-located slowdown: with it free, a third parameter fits the three steps exactly
    in more than one way, so it stays at the profile's 0 here.)"""
    ex, pipe, cm = vlm_2stage
    base = _cpu_profile()
    truth = with_wake_latency(scale_compute(base, 1.2), 2e-3)
    samples = [_sample(ex, pipe, cm, s, measured_on=truth) for s in ("1f1b", "zb_h1", "gpipe")]
    cal = fit_distributed(base, samples, fit_slowdown=False)
    assert cal.compute_factor == pytest.approx(1.2, rel=0.02)
    assert cal.wake_latency == pytest.approx(2e-3, rel=0.05)
    assert cal.profile.device.recv_wake_latency == cal.wake_latency
    assert cal.median_rel_error < 0.005
    alone = fit_distributed(base, samples, fit_wake=False, fit_slowdown=False)   # the factor alone cannot make them all fit
    assert alone.wake_latency == 0.0 and alone.median_rel_error > cal.median_rel_error


def test_fit_follows_the_typical_step_not_a_slowed_one(vlm_2stage):
    """One of five steps measured 3x slow (another process held the core) barely moves the factor."""
    ex, pipe, cm = vlm_2stage
    base = _cpu_profile()
    truth = scale_compute(base, 1.3)
    samples = [_sample(ex, pipe, cm, s, measured_on=truth) for s in ("1f1b", "zb_h1", "gpipe", "1f1b", "zb_h1")]
    samples[0] = DistributedSample(predict=samples[0].predict, measured_s=3 * samples[0].measured_s)
    cal = fit_distributed(base, samples)
    assert cal.compute_factor == pytest.approx(1.3, rel=0.02)
    assert cal.median_rel_error < 0.01


def test_too_few_or_bad_steps_fail_clearly(vlm_2stage):
    ex, pipe, cm = vlm_2stage
    with pytest.raises(DistributedCalibrationError, match="at least two"):
        fit_distributed(_cpu_profile(), [_sample(ex, pipe, cm, "1f1b")])
    bad = [DistributedSample(predict=lambda p: 1.0, measured_s=0.0)] * 2
    with pytest.raises(DistributedCalibrationError, match="not positive"):
        fit_distributed(_cpu_profile(), bad)


def test_fit_recovers_the_colocated_slowdown(vlm_2stage):
    """Steps made with compute x1.1 and each instruction 1 + 0.6 x overlap slower beside the other
    rank's compute: schedules overlap their ranks differently, so the factor and the slowdown are
    told apart."""
    ex, pipe, cm = vlm_2stage
    base = _cpu_profile()
    truth = with_wake_latency(scale_compute(base, 1.1), 0.0, 0.6)
    samples = [_sample(ex, pipe, cm, s, measured_on=truth) for s in ("1f1b", "zb_h1", "gpipe")]
    cal = fit_distributed(base, samples, fit_wake=False)
    assert cal.colocated_slowdown == pytest.approx(0.6, abs=0.05)
    assert cal.compute_factor == pytest.approx(1.1, rel=0.03)
    assert cal.profile.device.colocated_slowdown == cal.colocated_slowdown
    assert cal.median_rel_error < 0.005
    flat = fit_distributed(base, samples, fit_wake=False, fit_slowdown=False)   # one factor for all
    assert flat.colocated_slowdown == 0.0 and flat.median_rel_error > cal.median_rel_error
