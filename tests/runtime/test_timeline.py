"""Measured timelines: every executed instruction gets one sane wall-clock span, on the local
executor and on a 2-rank gloo run, and the spans convert to SEMU's plotting / trace shape."""
import pytest
import torch

from dipc.ir import Op
from dipc.runtime.launch import spawn
from dipc.runtime.timeline import MeasuredTimeline
from dipc.semu.emulator import STREAM_COMPUTE, STREAM_RECV_WAIT, STREAM_SEND
from tests.runtime.helpers import build


def _assert_sane(timeline: MeasuredTimeline, horizon: float) -> None:
    """One span per instruction, fields matching the program, ordered and non-overlapping per rank."""
    program = timeline.program
    assert [(s[0], s[1]) for s in timeline.spans] == [
        (r, pc) for r in range(program.num_ranks) for pc in range(len(program.streams[r]))]
    for rank in range(program.num_ranks):
        prev_end = 0.0
        for _, pc, op, stage, mb, start, end in timeline.rank_spans(rank):
            instr = program.streams[rank][pc]
            assert (op, stage, mb) == (instr.op, instr.stage, instr.mb)
            assert prev_end <= start <= end <= horizon, f"rank {rank} pc {pc}: {prev_end} {start} {end}"
            prev_end = end


def test_local_step_records_every_instruction():
    ex, pipe, mbs = build("vlm", torch.float32, 2, "1f1b", 1)
    result = pipe.step(mbs, record_timeline=True)
    timeline = result.timeline
    assert timeline is not None and timeline.executor == "local"
    _assert_sane(timeline, horizon=result.seconds)
    # the local executor runs one instruction at a time, so no two spans overlap across ranks either
    ordered = sorted(timeline.spans, key=lambda s: s[5])
    assert all(a[6] <= b[5] for a, b in zip(ordered, ordered[1:]))
    assert pipe.step(mbs).timeline is None   # opt-in


def test_measured_timeline_converts_for_gantt_and_chrome_trace():
    ex, pipe, mbs = build("vlm", torch.float32, 2, "1f1b", 1)
    timeline = pipe.step(mbs, record_timeline=True).timeline
    res = timeline.as_sim_result()
    assert res.step_time == timeline.step_time > 0
    streams = {(r, pc): stream for r, stream, pc, *_ in res.raw_spans}
    for r, stream in enumerate(timeline.program.streams):
        for pc, instr in enumerate(stream):
            want = {Op.RECV_ACT: STREAM_RECV_WAIT, Op.RECV_GRAD: STREAM_RECV_WAIT, Op.SEND_ACT: STREAM_SEND,
                    Op.SEND_GRAD: STREAM_SEND}.get(instr.op, STREAM_COMPUTE)
            assert streams[(r, pc)] == want
    comm = (Op.SEND_ACT, Op.SEND_GRAD, Op.RECV_ACT, Op.RECV_GRAD)
    compute = [sum(s[6] - s[5] for s in timeline.rank_spans(r) if s[2] not in comm) for r in range(2)]
    assert res.busy == pytest.approx(compute) and all(c > 0 for c in compute)
    assert res.bubble == pytest.approx([res.step_time - c for c in compute])
    trace = timeline.to_chrome_trace()
    assert trace["otherData"]["source"] == "measured"
    assert len([e for e in trace["traceEvents"] if e["ph"] == "X"]) == len(timeline.spans)


def _timed_gloo_step(rank: int, world: int) -> tuple[MeasuredTimeline, float]:
    from dipc.runtime.distributed import run_step_distributed

    ex, pipe, mbs = build("vlm", torch.float32, world, "1f1b", 1)
    result = run_step_distributed(pipe, mbs, timeout_s=60, record_timeline=True)
    return result.timeline, result.seconds


@pytest.mark.dist
@pytest.mark.timeout(180)
def test_gloo_step_records_every_rank_with_aligned_clocks():
    (t0, sec0), (t1, sec1) = spawn(_timed_gloo_step, 2, timeout_s=120)
    assert t0.spans == t1.spans and t0.executor == "distributed"   # gathered onto every rank
    _assert_sane(t0, horizon=max(sec0, sec1))
    # causality across processes: a message is received no earlier than its send began (up to the
    # barrier's alignment skew) -- fails if a rank's clock were not shifted to the common origin
    sends = {(s[2], s[3], s[4], t0.program.streams[s[0]][s[1]].other_stage): s for s in t0.spans
             if s[2] in (Op.SEND_ACT, Op.SEND_GRAD)}
    pair = {Op.RECV_ACT: Op.SEND_ACT, Op.RECV_GRAD: Op.SEND_GRAD}
    recvs = [s for s in t0.spans if s[2] in pair]
    assert recvs and len(recvs) == len(sends)
    for r, pc, op, stage, mb, start, end in recvs:
        send = sends[(pair[op], t0.program.streams[r][pc].other_stage, mb, stage)]
        assert end >= send[5] - 0.05, f"rank {r} pc {pc} {op} ended before its send began"
