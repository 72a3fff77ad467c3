"""The step emulator on hand-computable pipelines, and its Chrome-trace export."""
from __future__ import annotations

import dataclasses
import json
from collections import deque

import pytest

from dipc.errors import ScheduleError
from dipc.ir import Instruction, Op, Program, StageInfo, TensorSpec, validate
from dipc.passes.codegen import build_program, lower
from dipc.passes.schedules import ComputeAction
from dipc.semu.emulator import (STREAM_COMPUTE, STREAM_RECV_WAIT, STREAM_SEND, MemoryModel, message_bytes, simulate,
                                uniform_memory)
from dipc.semu.profiles import LinkProfile, load_preset
from dipc.semu.trace import to_chrome_trace

TF, TB = 1.0, 2.0
TIMES = {Op.FWD: TF, Op.BWD: TB, Op.BWD_I: TB / 2, Op.BWD_W: TB / 2}


def cost(ins: Instruction) -> float:
    return TIMES.get(ins.op, 0.0)


def chain(num_ranks: int) -> list[StageInfo]:
    return [StageInfo(id=s, rank=s, producers=(s - 1,) if s else (),
                      grad_producers=(s - 1,) if s else (), loads=("x",) if s == 0 else (),
                      has_loss=s == num_ranks - 1) for s in range(num_ranks)]


def cluster(latency: float = 0.0, bandwidth: float = 1e30, gpus_per_node: int = 8):
    link = LinkProfile(latency=latency, bandwidth=bandwidth)
    return dataclasses.replace(load_preset("h100_sxm"), intra_node=link, inter_node=link,
                               gpus_per_node=gpus_per_node)


def program(schedule: str, P: int, M: int, specs=None) -> Program:
    p = build_program(chain(P), P, M, schedule, specs=specs)
    validate(p)
    return p


def reference_step_time(p: Program, comm: float) -> float:
    """Independent check: relax end times over the dependency graph until nothing changes."""
    # message k on pair (a, b) in send order <-> k-th receive
    sends: dict[tuple[int, int], list[tuple[int, int]]] = {}
    recvs: dict[tuple[int, int], list[tuple[int, int]]] = {}
    for r, stream in enumerate(p.streams):
        for i, ins in enumerate(stream):
            if ins.op in (Op.SEND_ACT, Op.SEND_GRAD):
                sends.setdefault((r, ins.peer), []).append((r, i))
            elif ins.op in (Op.RECV_ACT, Op.RECV_GRAD):
                recvs.setdefault((ins.peer, r), []).append((r, i))
    partner = {recv: send for pair in recvs for recv, send in zip(recvs[pair], sends[pair])}
    end = {(r, i): 0.0 for r, s in enumerate(p.streams) for i in range(len(s))}
    changed = True
    while changed:
        changed = False
        for r, stream in enumerate(p.streams):
            t = 0.0
            for i, ins in enumerate(stream):
                if (r, i) in partner:
                    t = max(t, end[partner[(r, i)]] + comm)
                t += cost(ins) if not ins.is_comm else 0.0
                if end[(r, i)] != t:
                    end[(r, i)], changed = t, True
    # a rank finishes with its last instruction and its last outgoing message's arrival
    return max(max([end[(r, len(stream) - 1)]] + [end[send] + comm for pair in sends if pair[0] == r
                                                   for send in sends[pair]])
               for r, stream in enumerate(p.streams))


@pytest.mark.parametrize("schedule", ["1f1b", "gpipe"])
@pytest.mark.parametrize("P,M", [(1, 1), (2, 2), (4, 8), (4, 4), (8, 16), (3, 5)])
def test_uniform_stages_zero_comm(schedule, P, M):
    r = simulate(program(schedule, P, M), cluster(), cost)
    assert r.step_time == pytest.approx((M + P - 1) * (TF + TB))
    assert r.bubble_fraction == pytest.approx((P - 1) / (M + P - 1))
    for rank in range(P):
        assert r.busy[rank] == pytest.approx(M * (TF + TB))
        assert r.bubble[rank] == pytest.approx((P - 1) * (TF + TB))


def test_two_ranks_latency_by_hand():
    # rank 0: F0 [0,1] F1 [1,2]; rank 1: F0 [1+c, 2+c] B0 [.., 4+c] F1 B1 [.., 7+c];
    # rank 0: B0 from 4+2c to 6+2c, B1 from 7+2c to 9+2c = 3 (tf + tb) + 2c
    c = 0.25
    r = simulate(program("1f1b", 2, 2), cluster(latency=c), cost)
    assert r.step_time == pytest.approx(3 * (TF + TB) + 2 * c)


@pytest.mark.parametrize("schedule", ["1f1b", "gpipe", "zb_h1", "interleaved_1f1b"])
@pytest.mark.parametrize("P,M", [(2, 3), (4, 8), (5, 7)])
def test_latency_matches_reference(schedule, P, M):
    c = 0.1
    if schedule == "interleaved_1f1b":
        stages = [StageInfo(id=s, rank=s % P, producers=(s - 1,) if s else (),
                            grad_producers=(s - 1,) if s else ()) for s in range(2 * P)]
        p = build_program(stages, P, M, schedule)
    else:
        p = program(schedule, P, M)
    r = simulate(p, cluster(latency=c), cost)
    assert r.step_time == pytest.approx(reference_step_time(p, c))


def test_gpipe_latency_adds_two_pipeline_crossings():
    P, M, c = 4, 8, 0.1
    r = simulate(program("gpipe", P, M), cluster(latency=c), cost)
    assert r.step_time == pytest.approx((M + P - 1) * (TF + TB) + 2 * (P - 1) * c)


def test_1f1b_latency_enters_the_steady_state():
    # With latency c the steady-state period of 1F1B is tf + tb + 2c (a B on rank r waits for the
    # round trip through rank r + 1), so latency costs far more than 2 (P - 1) c.
    P, M, c = 4, 8, 0.1
    base = (M + P - 1) * (TF + TB)
    r = simulate(program("1f1b", P, M), cluster(latency=c), cost)
    assert r.step_time > base + 2 * (P - 1) * c + 1e-9
    assert sum(r.recv_wait) > 0


def test_bandwidth_uses_receive_specs_and_node_placement():
    spec = (TensorSpec(kind="tensor", dtype="bfloat16", shape=(1000, 500)),)  # 1 MB
    assert message_bytes(spec) == 1_000_000
    p = program("gpipe", 2, 1, specs=lambda *a: spec)
    base = load_preset("h100_sxm")
    same = simulate(p, base, cost)
    apart = simulate(p, base, cost, gpus_per_rank=8)  # each rank fills a node: inter-node link
    one_way_intra = base.intra_node.latency + 1e6 / base.intra_node.bandwidth
    one_way_inter = base.inter_node.latency + 1e6 / base.inter_node.bandwidth
    assert same.step_time == pytest.approx(2 * (TF + TB) + 2 * one_way_intra)
    assert apart.step_time == pytest.approx(2 * (TF + TB) + 2 * one_way_inter)


def test_rendezvous_exposes_transfers_posted_late():
    spec = (TensorSpec(kind="tensor", dtype="float32", shape=(1000,)),)
    p = program("1f1b", 4, 8, specs=lambda *a: spec)
    c = cluster(latency=0.0, bandwidth=4000.0)  # 1 s per message
    eager = simulate(p, c, cost, p2p="eager")
    rdv = simulate(p, c, cost, p2p="rendezvous")
    assert rdv.step_time >= eager.step_time


def test_handshake_adds_the_receive_notice_when_the_receive_is_posted_late():
    spec = (TensorSpec(kind="tensor", dtype="float32", shape=(1000,)),)
    p = program("1f1b", 4, 8, specs=lambda *a: spec)
    c = cluster(latency=0.25, bandwidth=4000.0)
    rdv = simulate(p, c, cost, p2p="rendezvous")
    hs = simulate(p, c, cost, p2p="handshake")
    assert hs.step_time > rdv.step_time
    assert simulate(p, cluster(bandwidth=4000.0), cost, p2p="handshake").step_time == pytest.approx(
        simulate(p, cluster(bandwidth=4000.0), cost, p2p="rendezvous").step_time)   # no latency: no notice


def test_two_ranks_handshake_by_hand():
    # rank 1 posts its receive at 0; rank 0 sends at TF, after the notice (L) arrived: data at TF + L.
    # rank 0 posts RECV_GRAD at TF; rank 1 sends at TF + L + TF + TB: data one L later.
    L = 0.1
    p = program("gpipe", 2, 1)
    res = simulate(p, cluster(latency=L), cost, p2p="handshake")
    assert res.step_time == pytest.approx(TF + L + TF + TB + L + TB)


def _fwd_start(res, rank: int, mb: int, p: Program) -> float:
    return next(s.start for s in res.spans if s.rank == rank and s.stream == STREAM_COMPUTE
                and p.streams[rank][s.step].op is Op.FWD and p.streams[rank][s.step].mb == mb)


def test_handshake_with_receives_posted_ahead_by_hand():
    # GPipe, 2 ranks, 2 microbatches. Rank 1 gets mb 0 at TF + L (its receive was posted at 0).
    # Posted when reached (after its FWD 0, at 2TF + L), mb 1's receive notice reaches rank 0 at
    # 2TF + 2L and the data arrives at 2TF + 3L; posted one compute ahead (when FWD 0 starts, at
    # TF + L), the notice is there before rank 0 sends at 2TF: data at 2TF + L, as FWD 0 ends.
    L = 0.1
    p = program("gpipe", 2, 2)
    late = simulate(p, cluster(latency=L), cost, p2p="handshake")
    early = simulate(p, cluster(latency=L), cost, p2p="handshake", recv_lookahead=1)
    assert _fwd_start(late, 1, 1, p) == pytest.approx(2 * TF + 3 * L)
    assert _fwd_start(early, 1, 1, p) == pytest.approx(2 * TF + L)
    assert early.step_time < late.step_time
    assert simulate(p, cluster(latency=L), cost, p2p="handshake", recv_lookahead=0).step_time == late.step_time


@pytest.mark.parametrize("schedule,chunks", [("1f1b", 1), ("zb_h1", 1), ("interleaved_1f1b", 2)])
def test_posting_receives_earlier_never_delays_a_step(schedule, chunks):
    spec = (TensorSpec(kind="tensor", dtype="float32", shape=(1000,)),)
    P, M = 4, 8
    stages = [StageInfo(id=s, rank=s % P, producers=(s - 1,) if s else (), grad_producers=(s - 1,) if s else (),
                        loads=("x",) if s == 0 else (), has_loss=s == P * chunks - 1) for s in range(P * chunks)]
    p = build_program(stages, P, M, schedule, specs=lambda *a: spec)
    validate(p)
    c = cluster(latency=0.2, bandwidth=4000.0)
    for p2p in ("rendezvous", "handshake"):
        times = [simulate(p, c, cost, p2p=p2p, recv_lookahead=k, record=False).step_time for k in (0, 1, 2, 3, 8)]
        assert all(a >= b - 1e-12 for a, b in zip(times, times[1:])), (p2p, times)
        ordered = simulate(p, c, cost, p2p=p2p, recv_lookahead=3, peer_ordered_posts=True, record=False).step_time
        assert times[3] - 1e-12 <= ordered <= times[0] + 1e-12
    # eager transfers do not wait for the receive: the look-ahead changes nothing
    assert simulate(p, c, cost, recv_lookahead=3).step_time == simulate(p, c, cost).step_time


def test_comm_overhead_occupies_the_rank():
    p = program("1f1b", 2, 3)
    plain = simulate(p, cluster(), cost)
    charged = simulate(p, cluster(), cost, comm_overhead=lambda ins: 0.125)
    for r, stream in enumerate(p.streams):
        msgs = sum(1 for ins in stream if ins.op in (Op.SEND_ACT, Op.SEND_GRAD, Op.RECV_ACT, Op.RECV_GRAD))
        assert charged.busy[r] == pytest.approx(plain.busy[r] + 0.125 * msgs)
    assert charged.step_time > plain.step_time


def test_wake_latency_delays_only_receives_that_waited():
    # gpipe on 2 ranks, 1 microbatch: rank 1 waits for the activation (TF), rank 0 for the gradient
    # (TF + TB later); each resumes W late, so the step grows by 2 W. Data already there pays nothing.
    W = 0.03
    p = program("gpipe", 2, 1)
    res = simulate(p, cluster(), cost, wake_latency=W)
    assert res.step_time == pytest.approx(TF + W + TF + TB + W + TB)
    # waits: rank 1 one W longer; rank 0 two (its gradient comes W later, and it wakes W late)
    assert sum(res.recv_wait) == pytest.approx(sum(simulate(p, cluster(), cost).recv_wait) + 3 * W)
    # rank 1 of 1F1B with 4 microbatches: only receives reached before their data arrived pay W
    p4 = program("1f1b", 2, 4)
    plain = simulate(p4, cluster(), cost, record=True)
    late = simulate(p4, cluster(), cost, wake_latency=W)
    waited = sum(1 for s in plain.spans if s.stream == STREAM_RECV_WAIT and s.end > s.start)
    assert 0 < waited < sum(1 for st in p4.streams for ins in st if ins.op in (Op.RECV_ACT, Op.RECV_GRAD))
    assert late.step_time > plain.step_time


def _zero_bubble_orders(P: int, M: int) -> list[list[ComputeAction]]:
    """1F1B with BWD split into BWD_I then BWD_W right away (weights never wait on the chain)."""
    orders = []
    for s in range(P):
        warm = min(P - 1 - s, M)
        order = [ComputeAction(Op.FWD, s, m) for m in range(warm)]
        for i in range(M - warm):
            order += [ComputeAction(Op.FWD, s, warm + i), ComputeAction(Op.BWD_I, s, i),
                      ComputeAction(Op.BWD_W, s, i)]
        for m in range(M - warm, M):
            order += [ComputeAction(Op.BWD_I, s, m), ComputeAction(Op.BWD_W, s, m)]
        orders.append(order)
    return orders


def test_split_backward_shrinks_the_bubble():
    # tf = tb_i = tb_w: the critical path crosses the pipeline with F and I only, so the bubble
    # is (P - 1)(tf + tb_i) instead of (P - 1)(tf + tb_i + tb_w); the last BWD_W on rank 0 adds tb_w
    P, M = 4, 8
    p = lower(chain(P), P, M, _zero_bubble_orders(P, M), schedule="zb")
    validate(p)
    zb = simulate(p, cluster(), cost)
    one = simulate(program("1f1b", P, M), cluster(), cost)
    assert zb.step_time == pytest.approx(M * (TF + TB) + (P - 1) * (TF + TB / 2))
    assert zb.bubble_fraction < one.bubble_fraction


def test_zb_h1_generator_beats_1f1b_with_equal_split():
    # tf = tb_i = tb_w: ZB-H1's bubble is (P - 1)(tf + tb_i - tb_w) per rank, a third of 1F1B's
    # (P - 1)(tf + tb_i + tb_w): 27 vs 33 at P=4, M=8 (30 for F-I-W without deferral, above)
    P, M = 4, 8
    zb = simulate(program("zb_h1", P, M), cluster(), cost)
    one = simulate(program("1f1b", P, M), cluster(), cost)
    assert one.step_time == pytest.approx(33.0)
    assert zb.step_time == pytest.approx(M * (TF + TB) + (P - 1) * (TF + TB / 2 - TB / 2))
    assert zb.bubble == pytest.approx((P - 1,) * P)
    assert sum(zb.bubble) == pytest.approx(sum(one.bubble) / 3)


@pytest.mark.parametrize("P", [2, 4, 8])
@pytest.mark.parametrize("factor", [1, 2, 4])
def test_zb_h1_bubble_below_1f1b_at_1f1b_memory(P, factor):
    M = factor * P
    zb_p, one_p = program("zb_h1", P, M), program("1f1b", P, M)
    zb = simulate(zb_p, cluster(), cost, uniform_memory(0.0, 1.0))
    one = simulate(one_p, cluster(), cost, uniform_memory(0.0, 1.0))
    assert zb.bubble_fraction < one.bubble_fraction - 1e-9
    assert sum(zb.bubble) == pytest.approx(sum(one.bubble) / 3)
    # counted until BWD_W, every rank holds at most 1F1B's peak (P microbatches, on rank 0); rank
    # r > 0 holds r more than its own 1F1B count (P - r), as in the paper: its W start r late.
    # (Holding rank r to P - r until BWD_W forces F-I-W on the last rank, whose chain then
    # bounds the step at M (tf + tb_i + tb_w) + (P - 1)(tf + tb_i): 2/3 of 1F1B's bubble.)
    assert max(zb.peak_memory) == pytest.approx(max(one.peak_memory))
    assert one.peak_memory == pytest.approx(tuple(float(P - r) for r in range(P)))
    # full stashes (BWD_I frees all but the weight-gradient inputs) stay at 1F1B's per rank
    full = simulate(zb_p, cluster(), cost, uniform_memory(0.0, 1.0, wgrad_fraction=0.0))
    assert full.peak_memory == pytest.approx(one.peak_memory)
    # with a residue of 1/4 of a stash per deferred BWD_W: P - r + r / 4 <= P
    quarter = simulate(zb_p, cluster(), cost, uniform_memory(0.0, 1.0, wgrad_fraction=0.25))
    assert quarter.peak_memory == pytest.approx(tuple(P - r + r / 4 for r in range(P)))


@pytest.mark.parametrize("P,M", [(4, 8), (4, 4), (8, 16)])
def test_peak_activation_memory_1f1b_vs_gpipe(P, M):
    mem = uniform_memory(10.0, 1.0)
    one = simulate(program("1f1b", P, M), cluster(), cost, mem)
    gp = simulate(program("gpipe", P, M), cluster(), cost, mem)
    assert one.peak_memory[0] == pytest.approx(10.0 + min(P, M))
    assert gp.peak_memory[0] == pytest.approx(10.0 + M)
    for rank in range(P):
        assert one.peak_memory[rank] == pytest.approx(10.0 + min(P - rank, M))
    # everything is freed by the end of the step
    assert one.memory_timeline[0][-1][1] == pytest.approx(10.0)


def test_bwd_i_keeps_what_bwd_w_needs():
    P, M = 2, 2
    p = lower(chain(P), P, M, _zero_bubble_orders(P, M), schedule="zb")
    mem = MemoryModel(static=lambda s: 0.0, activations=lambda ins: 4.0,
                      kept_for_wgrad=lambda ins: 1.0, count_messages=False)
    r = simulate(p, cluster(), cost, mem)
    values = [b for _, b in r.memory_timeline[1]]  # rank 1: F(+4) I(-3) W(-1) per microbatch
    assert values == [0.0, 4.0, 1.0, 0.0, 4.0, 1.0, 0.0]
    assert r.peak_memory == (8.0, 4.0)


def test_bwd_w_seeds_are_held_from_bwd_i_to_bwd_w():
    P, M = 2, 2
    p = lower(chain(P), P, M, _zero_bubble_orders(P, M), schedule="zb")
    mem = MemoryModel(static=lambda s: 0.0, activations=lambda ins: 4.0, kept_for_wgrad=lambda ins: 1.0,
                      seeds_for_wgrad=lambda ins: 4.0 if ins.stage == 1 else 0.0, count_messages=False)
    r = simulate(p, cluster(), cost, mem)
    values = [b for _, b in r.memory_timeline[1]]  # rank 1: F(+4) I(-3 +4) W(-1 -4) per microbatch
    assert values == [0.0, 4.0, 5.0, 0.0, 4.0, 5.0, 0.0]
    assert r.peak_memory == (8.0, 5.0)
    # a program without BWD_I never asks for seeds
    one = simulate(program("1f1b", P, M), cluster(), cost, dataclasses.replace(mem, seeds_for_wgrad=lambda ins: 1 / 0))
    assert one.peak_memory == (8.0, 4.0)


def test_received_messages_count_until_the_backward():
    spec = (TensorSpec(kind="tensor", dtype="float32", shape=(2,)),)  # 8 bytes
    p = program("gpipe", 2, 2, specs=lambda *a: spec)
    mem = uniform_memory(0.0, 100.0, count_messages=True)
    r = simulate(p, cluster(), cost, mem)
    # rank 0: 2 stashes + the first received gradient; rank 1: 2 stashes + 2 received inputs
    assert r.peak_memory == pytest.approx((208.0, 216.0))
    assert [tl[-1][1] for tl in r.memory_timeline] == [0.0, 0.0]


def test_deadlock_is_reported():
    stages = chain(2)
    streams = (
        (Instruction(op=Op.RECV_GRAD, stage=0, mb=0, peer=1, other_stage=1),),
        (Instruction(op=Op.RECV_ACT, stage=1, mb=0, peer=0, other_stage=0),),
    )
    p = Program(schedule="bad", num_ranks=2, num_microbatches=1, stages=tuple(stages), streams=streams)
    with pytest.raises(ScheduleError, match="deadlocked.*rank 0 at step 0"):
        simulate(p, cluster(), cost)


def test_record_false_gives_the_same_numbers():
    p = program("zb_h1", 4, 8)
    a = simulate(p, cluster(latency=0.01), cost, uniform_memory(1.0, 1.0))
    b = simulate(p, cluster(latency=0.01), cost, uniform_memory(1.0, 1.0), record=False)
    assert (a.step_time, a.busy, a.peak_memory) == (b.step_time, b.busy, b.peak_memory)
    assert b.raw_spans == () and b.memory_timeline == ()


def test_chrome_trace_is_valid_json_with_the_expected_events():
    P, M = 3, 4
    spec = (TensorSpec(kind="tensor", dtype="float32", shape=(4, 4)),)
    p = program("1f1b", P, M, specs=lambda *a: spec)
    r = simulate(p, cluster(latency=0.01), cost, uniform_memory(1.0, 1.0))
    trace = json.loads(json.dumps(to_chrome_trace(r)))
    events = trace["traceEvents"]
    complete = [e for e in events if e["ph"] == "X"]
    for e in complete:
        assert {"name", "ph", "ts", "dur", "pid", "tid"} <= set(e)
        assert e["dur"] >= 0 and 0 <= e["pid"] < P
    compute = [e for e in complete if e["tid"] == STREAM_COMPUTE]
    assert sorted(e["name"] for e in compute if e["pid"] == 0) == sorted(
        [f"F0.{m}" for m in range(M)] + [f"B0.{m}" for m in range(M)])
    fwd = next(e for e in compute if e["name"] == "F1.0")
    assert fwd["args"] == {"instruction": "FWD stage=1 mb=0", "op": "FWD", "step": 1, "stage": 1, "mb": 0}
    sends = [e for e in complete if e["cat"] == "transfer"]
    assert len(sends) == 2 * (P - 1) * M
    assert all(e["tid"] == STREAM_SEND + e["args"]["to_rank"] for e in sends)
    names = {(e["pid"], e["args"]["name"]) for e in events if e["name"] == "process_name"}
    assert names == {(r_, f"rank {r_}") for r_ in range(P)}
    assert any(e["ph"] == "C" for e in events)
    # slices on one track never overlap (Perfetto needs proper nesting)
    tracks: dict[tuple[int, int], list[tuple[float, float]]] = {}
    for e in complete:
        tracks.setdefault((e["pid"], e["tid"]), []).append((e["ts"], e["ts"] + e["dur"]))
    for spans in tracks.values():
        spans.sort()
        assert all(a[1] <= b[0] + 1e-6 for a, b in zip(spans, spans[1:]))
    assert trace["otherData"]["step_time_ms"] == pytest.approx(r.step_time * 1e3)


def test_trace_needs_a_recorded_timeline():
    r = simulate(program("1f1b", 2, 2), cluster(), cost, record=False)
    with pytest.raises(ValueError, match="record=True"):
        to_chrome_trace(r)


def test_sixteen_stages_sixty_four_microbatches_is_fast():
    import time

    spec = (TensorSpec(kind="tensor", dtype="bfloat16", shape=(8192, 5120)),)
    p = program("1f1b", 16, 64, specs=lambda *a: spec)
    c = load_preset("h800")
    simulate(p, c, cost, record=False)
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        simulate(p, c, cost, record=False)
        best = min(best, time.perf_counter() - t0)
    assert best < 0.1  # measured ~2 ms on one core; the bound leaves room for slow CI machines
