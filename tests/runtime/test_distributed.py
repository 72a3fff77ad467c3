"""The distributed executor (gloo, one process per rank) gives the same gradients as the
single-process reference, and a rank that never answers produces a timeout error, not a hang."""
import re
import time

import pytest
import torch

from dipc.errors import DipcError
from dipc.runtime.launch import spawn
from examples.data import EXAMPLE_NAMES
from tests.runtime.helpers import SCHEDULES, assert_grads_equal, build, independent_weights, reference_grads

pytestmark = pytest.mark.dist


def _all_cases(rank: int, world: int) -> dict:
    from dipc.runtime.distributed import run_step_distributed

    out = {}
    for name in EXAMPLE_NAMES:
        for schedule, chunks in SCHEDULES:
            ex, pipe, mbs = build(name, torch.float64, world, schedule, chunks)
            result = run_step_distributed(pipe, mbs, timeout_s=60)
            owned = {id(p) for p in pipe.rank_parameters(rank)}
            grads = {n: p.grad for n, p in ex.model.named_parameters() if id(p) in owned and p.grad is not None}
            out[(name, schedule)] = (result.loss, grads)
    return out


@pytest.mark.timeout(600)
@pytest.mark.parametrize("world", [2, 4])
def test_distributed_gradients_equal_reference(world):
    per_rank = spawn(_all_cases, world, timeout_s=500)
    for name in EXAMPLE_NAMES:
        for schedule, chunks in SCHEDULES:
            ex, pipe, mbs = build(name, torch.float64, world, schedule, chunks)
            weights = independent_weights(ex, mbs)
            want = reference_grads(ex.model, mbs, weights)
            with torch.no_grad():
                ref_loss = sum(w * float(ex.model(**mb)) for w, mb in zip(weights, mbs))
            got = {}
            for r in range(world):
                loss, grads = per_rank[r][(name, schedule)]
                got.update(grads)
                assert loss == pytest.approx(ref_loss, rel=1e-12), f"rank {r} loss"
            assert_grads_equal(got, want, rtol=1e-9, atol=1e-12, where=f"{name}/{schedule}/{world} ranks")


def _silent_rank(rank: int, world: int) -> None:
    from dipc.runtime.data_parallel import topology
    from dipc.runtime.distributed import check_same_program, run_step_distributed

    ex, pipe, mbs = build("vlm", torch.float32, world, "1f1b", 1)
    if rank == 1:   # joins the plan check, then never runs its stream: rank 0 must time out, not hang
        check_same_program(pipe.plan(mbs), topology(world), torch.device("cpu"))
        time.sleep(8)
        return None
    run_step_distributed(pipe, mbs, timeout_s=3)


def _silent_before_start(rank: int, world: int) -> None:
    from dipc.runtime.distributed import run_step_distributed

    ex, pipe, mbs = build("vlm", torch.float32, world, "1f1b", 1)
    if rank == 1:
        time.sleep(3)   # exits without ever joining: rank 0's plan check fails cleanly
        return None
    run_step_distributed(pipe, mbs, timeout_s=3)


@pytest.mark.timeout(120)
def test_rank_missing_from_the_start_is_a_clear_error():
    with pytest.raises(DipcError) as info:
        spawn(_silent_before_start, 2, timeout_s=60)
    msg = str(info.value)
    assert "rank 0: the plan check collective failed" in msg and "Fix:" in msg, msg


@pytest.mark.timeout(120)
def test_silent_rank_times_out_with_a_clear_error():
    t0 = time.monotonic()
    with pytest.raises(DipcError) as info:
        spawn(_silent_rank, 2, timeout_s=60)
    msg = str(info.value)
    assert "rank 0, step" in msg and "RECV_" in msg and "no answer from rank 1" in msg, msg
    assert time.monotonic() - t0 < 60


def _pp_dp_case(rank: int, world: int, schedule: str, chunks: int) -> tuple:
    from dipc.runtime.distributed import replica_microbatches, run_step_distributed

    ex, pipe, mbs = build("vlm", torch.float64, 2, schedule, chunks)
    mine = replica_microbatches(mbs, pipe.num_ranks)
    result = run_step_distributed(pipe, mine, timeout_s=60)
    owned = {id(p) for p in pipe.rank_parameters(rank % 2)}
    return result.loss, {n: p.grad for n, p in ex.model.named_parameters() if id(p) in owned and p.grad is not None}


@pytest.mark.timeout(300)
@pytest.mark.parametrize("schedule,chunks", [("1f1b", 1), ("interleaved_1f1b", 2)])
def test_pipeline_x_data_parallel_equals_global_batch_reference(schedule, chunks):
    """PP=2 x DP=2 (4 gloo processes): each replica runs its share of the global batch; after the
    per-stage all-reduce every replica holds the gradient of the whole global batch."""
    per_rank = spawn(_pp_dp_case, 4, schedule, chunks, timeout_s=240)
    ex, pipe, mbs = build("vlm", torch.float64, 2, schedule, chunks)
    weights = independent_weights(ex, mbs)
    assert pipe.loss_weights(mbs) == pytest.approx(weights, rel=1e-15)
    want = reference_grads(ex.model, mbs, weights)
    with torch.no_grad():
        ref_loss = sum(w * float(ex.model(**mb)) for w, mb in zip(weights, mbs))
    for replica in range(2):
        got = {}
        for pp in range(2):
            loss, grads = per_rank[replica * 2 + pp]
            assert loss == pytest.approx(ref_loss, rel=1e-12)
            got.update(grads)
        assert_grads_equal(got, want, rtol=1e-9, atol=1e-12, where=f"replica {replica} {schedule}")


def _dies_mid_step(rank: int, world: int) -> None:
    import os

    from dipc.runtime.distributed import run_step_distributed
    from dipc.runtime.interpreter import RankInterpreter

    ex, pipe, mbs = build("vlm", torch.float32, world, "1f1b", 1)
    if rank == 1:
        fwd = RankInterpreter._fwd
        calls = []

        def fwd_then_die(self, instr):
            calls.append(instr)
            if len(calls) == 3:
                os._exit(17)   # the process vanishes mid-step, as a crashed or OOM-killed rank does
            return fwd(self, instr)

        RankInterpreter._fwd = fwd_then_die
    run_step_distributed(pipe, mbs, timeout_s=20)


@pytest.mark.timeout(120)
def test_rank_killed_mid_step_stops_the_others_with_a_clear_error():
    t0 = time.monotonic()
    with pytest.raises(DipcError) as info:
        spawn(_dies_mid_step, 2, timeout_s=60)
    msg = str(info.value)
    assert "rank 1: no result" in msg, msg
    assert re.search(r"rank 0: RuntimeStepError: rank 0, step \d+ \(RECV_\w+ .*peer=1.*\): TimeoutError: no answer from rank 1: it died", msg), msg
    assert time.monotonic() - t0 < 60


def _different_batches(rank: int, world: int) -> None:
    from dipc.runtime.distributed import run_step_distributed

    ex, pipe, mbs = build("vlm", torch.float32, world, "1f1b", 1)
    run_step_distributed(pipe, mbs if rank == 0 else mbs[:-1], timeout_s=20)


@pytest.mark.timeout(120)
def test_mismatched_plans_are_refused_before_any_step():
    with pytest.raises(DipcError) as info:
        spawn(_different_batches, 2, timeout_s=60)
    assert "pipeline ranks planned different programs" in str(info.value)
    assert "Fix:" in str(info.value)


def _directional_case(rank: int, world: int) -> dict:
    """Every schedule with messages split over two process groups by direction (what a GPU run
    does, :func:`dipc.runtime.transport.direction_groups`), on gloo."""
    import dipc.runtime.distributed as dd
    from dipc.runtime.transport import DistributedTransport, direction_groups

    used = set()

    class Directional(DistributedTransport):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directional=True, **kwargs)

        def _isend(self, tensor, dst):
            used.add(("send", id(self.by_direction[dst < self.me])))
            return super()._isend(tensor, dst)

        def _irecv(self, tensor, src):
            used.add(("recv", id(self.by_direction[self.me < src])))
            return super()._irecv(tensor, src)

    dd.DistributedTransport = Directional
    out = {}
    for schedule, chunks in SCHEDULES:
        ex, pipe, mbs = build("vlm", torch.float64, world, schedule, chunks)
        result = dd.run_step_distributed(pipe, mbs, timeout_s=60)
        owned = {id(p) for p in pipe.rank_parameters(rank)}
        out[schedule] = (result.loss, {n: p.grad for n, p in ex.model.named_parameters()
                                       if id(p) in owned and p.grad is not None})
    up, down = map(id, direction_groups())
    out["groups used"] = used == {("send", up), ("recv", down)} if rank == 0 else used == {("send", down), ("recv", up)}
    return out


@pytest.mark.timeout(300)
def test_messages_split_by_direction_give_the_reference_gradients():
    per_rank = spawn(_directional_case, 2, timeout_s=240)
    assert per_rank[0]["groups used"] and per_rank[1]["groups used"]
    for schedule, chunks in SCHEDULES:
        ex, pipe, mbs = build("vlm", torch.float64, 2, schedule, chunks)
        weights = independent_weights(ex, mbs)
        want = reference_grads(ex.model, mbs, weights)
        got = {}
        for r in range(2):
            got.update(per_rank[r][schedule][1])
        assert_grads_equal(got, want, rtol=1e-9, atol=1e-12, where=f"directional {schedule}")
