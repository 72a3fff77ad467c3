"""The validator: each rule fires on a hand-broken program, with the spot named and marked."""
from __future__ import annotations

import dataclasses
import re
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dipc.errors import ScheduleError
from dipc.ir import Instruction, Op, Program, StageInfo, TensorSpec, validate

from .programs import build_program, chain_stages, two_rank_1f1b

I = Instruction
HEAD = re.compile(r"^(rank (\d+), step (\d+)|program): .*\. Fix: ", re.S)


def with_stream(p: Program, rank: int, stream) -> Program:
    streams = list(p.streams)
    streams[rank] = tuple(stream)
    return dataclasses.replace(p, streams=tuple(streams))


def find(stream, **fields) -> int:
    return next(i for i, ins in enumerate(stream) if all(getattr(ins, k) == v for k, v in fields.items()))


def swap(stream, i: int, j: int) -> list:
    out = list(stream)
    out[i], out[j] = out[j], out[i]
    return out


def fails(p: Program, pattern: str) -> ScheduleError:
    with pytest.raises(ScheduleError) as e:
        validate(p)
    msg = str(e.value)
    assert re.search(pattern, msg), msg
    assert HEAD.match(msg), msg
    if e.value.rank is not None:
        assert "<-- here" in msg
        assert msg.splitlines()[1].split()[0] == "step"  # the grid follows the first line
    return e.value


# ----------------------------------------------------------------- correct programs pass

def test_two_rank_1f1b_passes():
    validate(two_rank_1f1b())


@pytest.mark.parametrize("placement", [[0, 1], [0, 1, 2, 3], [0, 1, 0, 1], [0, 0, 1], [2, 1, 0]])
@pytest.mark.parametrize("split", [False, True])
def test_generated_chains_pass(placement, split):
    validate(build_program(chain_stages(len(placement), placement), max(placement) + 1, 3, split=split))


def test_multimodal_dag_passes():
    # vision (0 -> 1) and audio (2) encoders feed the backbone (3 -> 4); the vision encoder is frozen
    # except its projector (stage 1), so no gradient flows 1 -> 0.
    stages = (
        StageInfo(id=0, rank=0, modality="vision", loads=("pixel_values",)),
        StageInfo(id=1, rank=1, modality="vision", producers=(0,)),
        StageInfo(id=2, rank=0, modality="audio", loads=("audio",)),
        StageInfo(id=3, rank=2, producers=(1, 2), grad_producers=(1, 2), loads=("input_ids",)),
        StageInfo(id=4, rank=1, producers=(3,), grad_producers=(3,), loads=("labels",), has_loss=True),
    )
    validate(build_program(stages, 3, 4, split=True))


# ----------------------------------------------------------------- each rule fires

def test_missing_recv():
    p = two_rank_1f1b()
    r1 = [ins for ins in p.streams[1] if not (ins.op is Op.RECV_ACT and ins.mb == 1)]
    e = fails(with_stream(p, 1, r1),
              r"^rank 1, step 10: missing RECV_ACT stage=1 mb=1 peer=0 other_stage=0 "
              r"\(activation of edge 0 -> 1\)\. Fix: emit it in rank 1's stream")
    assert (e.rank, e.step) == (1, 10)
    assert re.search(r"\n\s*10\s+O\s+\[end\]\s+<-- here", str(e))


def test_missing_send():
    p = two_rank_1f1b()
    r1 = [ins for ins in p.streams[1] if not (ins.op is Op.SEND_GRAD and ins.mb == 0)]
    fails(with_stream(p, 1, r1), r"^rank 1, step 10: missing SEND_GRAD stage=1 mb=0 peer=0 other_stage=0")


def test_send_before_fwd():
    p = two_rank_1f1b()
    r0 = swap(p.streams[0], 1, 2)  # SEND_ACT mb 0 now precedes FWD mb 0
    e = fails(with_stream(p, 0, r0),
              r"^rank 0, step 1: SEND_ACT stage=0 mb=0 peer=1 other_stage=1 comes before "
              r"FWD stage=0 mb=0 \(step 2\), which produces the forward it sends")
    assert re.search(r"\n\s*1\s+\[sA0\.0>1\]\s+rA1\.0<0\s+L1\.0.*<-- here|\n\s*1\s+\[sA0\.0>1\].*<-- here", str(e))


def test_fwd_before_its_recv_and_load():
    p = two_rank_1f1b()
    fails(with_stream(p, 1, swap(p.streams[1], 0, 2)),
          r"^rank 1, step 0: FWD stage=1 mb=0 comes before LOAD stage=1 mb=0 \(step 1\), which produces "
          r"its input batch")
    r1 = list(p.streams[1])
    r1.insert(7, r1.pop(5))  # LOAD, FWD, RECV_ACT for mb 1
    fails(with_stream(p, 1, r1),
          r"^rank 1, step 6: FWD stage=1 mb=1 comes before RECV_ACT stage=1 mb=1 .* \(step 7\), which "
          r"produces the output of stage 0")


def test_bwd_before_its_grad():
    p = two_rank_1f1b()
    fails(with_stream(p, 0, swap(p.streams[0], 6, 7)),
          r"^rank 0, step 6: BWD stage=0 mb=0 comes before RECV_GRAD stage=0 mb=0 .* \(step 7\)")


def test_fifo_mismatch():
    p = two_rank_1f1b()
    r1 = list(p.streams[1])
    recv1 = r1.pop(find(r1, op=Op.RECV_ACT, mb=1))
    r1.insert(0, recv1)  # rank 1 receives mb 1 first, rank 0 sends mb 0 first
    fails(with_stream(p, 1, r1),
          r"^rank 1, step 0: RECV_ACT stage=1 mb=1 .* is the 1st receive from rank 0, but rank 0's 1st "
          r"send to rank 1 is SEND_ACT stage=0 mb=0 peer=1 other_stage=1 \(step 2\); .*NCCL ignores tags")


def test_deadlock_both_ranks_receive_first():
    p = two_rank_1f1b()
    r0 = list(p.streams[0])
    rg = r0.pop(find(r0, op=Op.RECV_GRAD, mb=0))
    r0.insert(2, rg)  # rank 0 waits for mb 0's gradient before sending mb 0's activation
    e = fails(with_stream(p, 0, r0),
              r"^rank 0, step 2: deadlock: no rank can progress \(rank 0, step 2 waits in RECV_GRAD "
              r"stage=0 mb=0 peer=1 other_stage=1 specs=f32\[196,64\] for rank 1; rank 1, step 0 waits in RECV_ACT stage=1 "
              r"mb=0 peer=0 other_stage=0 specs=f32\[196,64\] for rank 0\); wait cycle rank 0 -> rank 1 "
              r"-> rank 0")
    assert (e.rank, e.step) == (0, 2)


def test_three_rank_deadlock_names_the_cycle_and_all_waiters():
    p = build_program(chain_stages(3, [0, 1, 2]), 3, 1)
    # rank 0 waits for its gradient before sending its activation; rank 1 (and rank 2 behind it)
    # wait for that activation. Only ranks 0 and 1 form the cycle.
    r0 = list(p.streams[0])
    rg = r0.pop(find(r0, op=Op.RECV_GRAD))
    r0.insert(find(r0, op=Op.SEND_ACT), rg)
    fails(with_stream(p, 0, r0), r"deadlock: .*rank 2, step 0 waits in RECV_ACT stage=2 .* for rank 1\); "
                                 r"wait cycle rank 0 -> rank 1 -> rank 0")


def test_bwd_w_before_bwd_i():
    p = build_program(chain_stages(2, [0, 1]), 2, 2, split=True)
    r0 = p.streams[0]
    i, w = find(r0, op=Op.BWD_I, mb=0), find(r0, op=Op.BWD_W, mb=0)
    fails(with_stream(p, 0, swap(r0, i, w)),
          rf"^rank 0, step {i}: BWD_W stage=0 mb=0 comes before BWD_I stage=0 mb=0 \(step {w}\)")


def test_split_backward_completeness():
    p = build_program(chain_stages(2, [0, 1]), 2, 2, split=True)
    r0 = p.streams[0]
    fails(with_stream(p, 0, [x for x in r0 if not (x.op is Op.BWD_W and x.mb == 1)]),
          r"^rank 0, step \d+: missing BWD_W stage=0 mb=1 \(a BWD_I needs its BWD_W\)")
    fails(with_stream(p, 0, [x for x in r0 if not (x.op is Op.BWD_I and x.mb == 1)]),
          r"^rank 0, step \d+: BWD_W stage=0 mb=1 has no BWD_I")
    extra = list(r0)
    extra.insert(find(r0, op=Op.OPTIM), I(op=Op.BWD, stage=0, mb=1))
    fails(with_stream(p, 0, extra), r"stage 0 mb 1 has both BWD and a split BWD_I/BWD_W")
    fails(with_stream(p, 0, [x for x in r0 if not (x.op is Op.BWD_I or x.op is Op.BWD_W) or x.mb != 0]),
          r"missing BWD stage=0 mb=0 \(or BWD_I \+ BWD_W\)")


def test_compute_on_wrong_rank():
    p = two_rank_1f1b()
    r0 = list(p.streams[0])
    r0.insert(3, I(op=Op.FWD, stage=1, mb=0))
    e = fails(with_stream(p, 0, r0),
              r"^rank 0, step 3: FWD stage=1 mb=0: stage 1 is placed on rank 1, not on rank 0\. "
              r"Fix: emit it in rank 1's stream")
    assert re.search(r"\n\s*3\s+\[F1\.0\].*<-- here", str(e))


@pytest.mark.parametrize("rank, step, ins, pattern", [
    (0, 2, I(op=Op.SEND_ACT, stage=0, mb=0, peer=0, other_stage=1), r"peer=0 but stage 1 is on rank 1"),
    (0, 2, I(op=Op.SEND_ACT, stage=0, mb=0, peer=1, other_stage=0), r"there is no edge 0 -> 0"),
    (0, 2, I(op=Op.SEND_ACT, stage=0, mb=0, peer=1, other_stage=1, specs=(TensorSpec(kind="int"),)),
     r"only receives carry specs"),
    (0, 2, I(op=Op.FWD, stage=0, mb=0), r"FWD stage=0 mb=0: appears twice \(first at rank 0, step 1\)"),
    (0, 2, I(op=Op.FWD, stage=0, mb=2), r"microbatch 2 is outside 0\.\.1"),
    (0, 2, I(op=Op.FWD, stage=7, mb=0), r"stage 7 does not exist"),
    (0, 2, I(op=Op.FWD, stage=0, mb=0, peer=1), r"FWD takes no peer or other_stage"),
    (0, 2, I(op=Op.OPTIM, stage=1), r"stage 1 is not on rank 0"),
    (0, 2, I(op=Op.OPTIM, mb=0), r"OPTIM takes only an optional stage"),
    (0, 2, I(op=Op.RECV_ACT, stage=0, mb=0, peer=1, other_stage=1), r"there is no edge 1 -> 0"),
])
def test_instruction_field_rules(rank, step, ins, pattern):
    p = two_rank_1f1b()
    stream = list(p.streams[rank])
    stream.insert(step, ins)
    fails(with_stream(p, rank, stream), rf"^rank {rank}, step {step}: .*{pattern}")


def test_same_rank_edge_needs_no_message():
    p = build_program(chain_stages(3, [0, 0, 1]), 2, 1)
    r0 = list(p.streams[0])
    r0.insert(find(r0, op=Op.FWD, stage=0) + 1, I(op=Op.SEND_ACT, stage=0, mb=0, peer=0, other_stage=1))
    fails(with_stream(p, 0, r0), r"^rank 0, step 2: SEND_ACT stage=0 mb=0 peer=0 other_stage=1: stages 0 "
                                 r"and 1 are both on rank 0\. Fix: a same-rank edge needs no message")


def test_missing_load_and_optim_order():
    p = two_rank_1f1b()
    fails(with_stream(p, 0, [x for x in p.streams[0] if not (x.op is Op.LOAD and x.mb == 1)]),
          r"^rank 0, step 10: missing LOAD stage=0 mb=1 \(stage 0 loads pixel_values\)")
    validate(with_stream(p, 1, swap(p.streams[1], 9, 10)))  # OPTIM may precede a send
    r0 = list(p.streams[0])
    r0.insert(8, I(op=Op.OPTIM))
    r0.pop()
    fails(with_stream(p, 0, r0), r"^rank 0, step 8: OPTIM comes before BWD stage=0 mb=1 \(step 10\); "
                                 r"it must follow all the rank's compute")
    r0 = list(p.streams[0])
    r0.insert(8, I(op=Op.REDUCE, stage=0))
    fails(with_stream(p, 0, r0), r"^rank 0, step 8: REDUCE stage=0 comes before BWD stage=0 mb=1 "
                                 r"\(step 10\); it must follow all the weight gradients of stage 0")


@pytest.mark.parametrize("change, pattern", [
    (dict(num_ranks=3), r"^program: 2 streams for ranks=3"),
    (dict(num_microbatches=0), r"^program: ranks=2, microbatches=0"),
    (dict(stages=(StageInfo(id=1, rank=0), StageInfo(id=0, rank=1))), r"stages\[0\] has id=1"),
    (dict(stages=(StageInfo(id=0, rank=0), StageInfo(id=1, rank=5))), r"stage 1 is placed on rank 5"),
    (dict(stages=(StageInfo(id=0, rank=0, producers=(1,)), StageInfo(id=1, rank=1, producers=(0,)))),
     r"the stage graph has a cycle through stages \[0, 1\]"),
    (dict(stages=(StageInfo(id=0, rank=0), StageInfo(id=1, rank=1, grad_producers=(0,)))),
     r"not a subset of producers"),
    (dict(stages=(StageInfo(id=0, rank=0), StageInfo(id=1, rank=1, producers=(3,)))), r"names producer 3"),
])
def test_structure_rules(change, pattern):
    e = fails(dataclasses.replace(two_rank_1f1b(), **change), pattern)
    assert e.rank is None and "<-- here" not in str(e)


# ----------------------------------------------------------------- properties

@st.composite
def valid_programs(draw):
    n = draw(st.integers(1, 6))
    num_ranks = draw(st.integers(1, 4))
    # the first `split` stages form an encoder segment run in sub-microbatches (it reads only itself)
    split = draw(st.integers(0, n - 1))
    stages = []
    for i in range(n):
        producers = tuple(sorted(draw(st.sets(st.integers(0, i - 1), max_size=2)))) if i else ()
        grad = tuple(q for q in producers if draw(st.booleans()))
        stages.append(StageInfo(id=i, rank=draw(st.integers(0, num_ranks - 1)), producers=producers,
                                grad_producers=grad, loads=("x",) if draw(st.booleans()) else (),
                                has_loss=i == n - 1, modality="vision" if i < split else "backbone"))
    M = draw(st.integers(1, 3))
    subs = (("vision", tuple(draw(st.lists(st.integers(1, 3), min_size=M, max_size=M)))),) if split else ()
    return build_program(tuple(stages), num_ranks, M, split=draw(st.booleans()),
                         reduce=draw(st.booleans()), subs=subs)


@settings(max_examples=60, deadline=None)
@given(valid_programs())
def test_generated_programs_pass(p):
    validate(p)


@settings(max_examples=120, deadline=None)
@given(valid_programs(), st.data())
def test_mutations_pass_or_raise_a_marked_schedule_error(p, data):
    r = data.draw(st.integers(0, p.num_ranks - 1))
    stream = list(p.streams[r])
    kind = data.draw(st.sampled_from(["drop", "swap", "move_rank"]))
    i = data.draw(st.integers(0, len(stream) - 1))
    if kind == "drop":
        stream.pop(i)
        q = with_stream(p, r, stream)
    elif kind == "swap":
        q = with_stream(p, r, swap(stream, i, data.draw(st.integers(0, len(stream) - 1))))
    else:
        ins = stream.pop(i)
        other = data.draw(st.integers(0, p.num_ranks - 1))
        q = with_stream(p, r, stream)
        target = list(q.streams[other])
        target.insert(data.draw(st.integers(0, len(target))), ins)
        q = with_stream(q, other, target)
    try:
        validate(q)
    except ScheduleError as e:
        msg = str(e)
        m = HEAD.match(msg)
        assert m, msg
        if e.rank is not None:
            assert (int(m.group(2)), int(m.group(3))) == (e.rank, e.step)
            assert 0 <= e.step <= len(q.streams[e.rank])
            assert msg.count("<-- here") == 1


def test_large_program_validates_fast():
    placement = [i % 8 for i in range(32)]  # interleaved: 4 virtual stages per rank
    p = build_program(chain_stages(32, placement), 8, 64, split=True)
    n = sum(len(s) for s in p.streams)
    assert n > 10_000
    t0 = time.perf_counter()
    validate(p)
    elapsed = time.perf_counter() - t0
    assert elapsed < 10.0, f"{n} instructions took {elapsed:.2f}s"   # catches quadratic blow-ups, not noise
