"""Calibrating SEMU on a pipeline's own steps: it leaves the model as it was (parameters,
gradients, optimizer, RNG), fits every instruction kind's overhead, and schedule "dip" on CPU
plans with it unless a profile is named."""
import pytest
import torch

import dipc
from dipc.ir.posting import GLOO_RECV_LOOKAHEAD
from dipc.semu.self_calibrate import calibrate_pipeline
from examples.data import make_example


def _pipe(**kw):
    ex = make_example("vlm", seed=2)
    mbs = ex.data.microbatches(3, 2)
    pipe = dipc.compile(ex.model, mbs[0], num_stages=2, loss_weight=ex.loss_weight,
                        optimizer=lambda ps: torch.optim.AdamW(ps, lr=1e-2), **kw)
    return ex, pipe, mbs


def test_calibration_leaves_the_model_as_it_was_and_fits_every_kind():
    ex, pipe, mbs = _pipe(schedule="dip", sub_microbatches={"vision": 1})
    pipe.step(mbs, pipe.plan(mbs, schedule="interleaved_1f1b"))    # optimizer state and grads exist
    before = {n: p.detach().clone() for n, p in ex.model.named_parameters()}
    grads = {n: p.grad for n, p in ex.model.named_parameters()}
    some = next(n for n, g in grads.items() if g is None)
    ex.model.get_parameter(some).grad = marker = torch.ones_like(ex.model.get_parameter(some))
    rng = torch.get_rng_state()
    result = calibrate_pipeline(pipe, [mbs], runs=1)
    assert torch.equal(torch.get_rng_state(), rng)
    for n, p in ex.model.named_parameters():
        assert torch.equal(p, before[n]), f"{n} changed: calibration must not train"
        assert p.grad is (marker if n == some else grads[n]), f"{n}'s gradient was not restored"
    overheads = result.profile.device.op_overheads
    assert {"FWD", "BWD", "BWD_I", "BWD_W", "LOAD", "SEND_ACT", "RECV_ACT"} <= set(overheads)
    assert result.num_points > 0 and result.profile.name.endswith("-calibrated")


def test_dip_on_cpu_calibrates_once_unless_a_profile_is_named(monkeypatch):
    ex, pipe, mbs = _pipe(schedule="dip")
    monkeypatch.delenv("DIPC_PROFILE", raising=False)
    calls = []
    real = type(pipe).calibrate
    monkeypatch.setattr(type(pipe), "calibrate", lambda self, b, runs=2: calls.append(1) or real(self, b, runs=1))
    pipe.plan(mbs)
    pipe.plan(ex.data.microbatches(3, 2))
    assert len(calls) == 1 and pipe.profile.name.endswith("-calibrated")
    _, named, mbs = _pipe(schedule="dip", profile="h800")
    named.plan(mbs)
    assert len(calls) == 1 and named.profile == "h800"


def _distributed_calibration(rank: int, world: int):
    torch.manual_seed(0)
    ex, pipe, mbs = _pipe(schedule="dip")
    if rank == 0:
        pipe.calibrate([mbs], runs=1)
    before = {n: p.detach().clone() for n, p in ex.model.named_parameters()}
    local = pipe.profile
    got = pipe.calibrate_distributed([mbs], runs=1)
    unchanged = all(torch.equal(p, before[n]) and p.grad is None for n, p in ex.model.named_parameters())
    fit = None
    if got is not None:
        fit = (got.name, local.device.recv_wake_latency, got.device.recv_wake_latency,
               got.device.colocated_slowdown, sorted(got.device.op_overheads), pipe.profile is got,
               (got.p2p, got.recv_lookahead))
    return fit, unchanged, pipe.plan(mbs).schedule if rank == 0 else None


@pytest.mark.dist
@pytest.mark.timeout(300)
def test_distributed_calibration_fits_rank_0_on_gloo_steps_and_trains_nothing():
    """Both ranks take the gloo calibration steps; rank 0's profile gains the multi-process terms
    (P2P op times from the measured timeline, wake latency, co-located slowdown) and plans with
    it; no parameter moves and no gradient is left behind."""
    from dipc.runtime.launch import spawn

    (fit0, same0, planned), (fit1, same1, _) = spawn(_distributed_calibration, 2, timeout_s=240)
    assert fit1 is None and same0 and same1
    name, _, wake, slowdown, ops, adopted, p2p = fit0
    assert name.endswith("-calibrated-distributed") and adopted and planned is not None
    assert p2p == ("handshake", GLOO_RECV_LOOKAHEAD)   # plans on it are scored with gloo's P2P model
    assert {"SEND_ACT", "RECV_ACT", "SEND_GRAD", "RECV_GRAD"} <= set(ops) and wake >= 0 and slowdown >= 0
