"""NCCL's ordered P2P streams: one stream per rank pair wedges 1F1B in the worst case (every
message waits for its partner); one stream per direction never wedges a valid program."""
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dipc.ir import Instruction, Op, Program
from dipc.ir.stream_order import stream_wait_cycle
from dipc.passes.codegen import lower
from dipc.passes.dual_queue import TaskCosts, dual_queue_schedule
from dipc.passes.schedules import SCHEDULES
from tests.ir.programs import act, chain_stages, vision_subs_stages

I = Instruction


def _chain_program(schedule: str, ranks: int, chunks: int, microbatches: int) -> Program:
    stages = chain_stages(ranks * chunks, [i % ranks for i in range(ranks * chunks)])
    return lower(stages, ranks, microbatches, SCHEDULES[schedule](stages, ranks, microbatches), schedule=schedule)


def test_one_stream_per_rank_pair_wedges_1f1b():
    """The hazard dipc's transport had on NCCL: rank 0 queues send act(m+1) before recv grad(m),
    rank 1 send grad(m) before recv act(m+1); each send waits for a receive behind the other."""
    cycle = stream_wait_cycle(_chain_program("1f1b", 2, 1, 4), lookahead=0, streams="pair")
    assert cycle is not None
    text = "\n".join(cycle)
    assert "SEND_ACT stage=0 mb=3" in text and "SEND_GRAD stage=1 mb=2" in text and "RECV_GRAD stage=0 mb=2" in text
    # the receive look-ahead the runtime had on NCCL (one compute, peer-ordered) does not help
    assert stream_wait_cycle(_chain_program("1f1b", 2, 1, 4), lookahead=1, peer_ordered=True, streams="pair")


def test_grouping_a_gap_s_messages_wedges_a_deeper_warm_up():
    """torch.distributed.pipelining's remedy, one batch_isend_irecv per gap between computes, is
    safe for 1F1B but not for a schedule that forwards further ahead (the dual queue): a group
    finishes only when all its messages have, so a send the peer takes late holds back a
    gradient needed now."""
    assert stream_wait_cycle(_chain_program("1f1b", 4, 1, 8), lookahead=0, grouped=True) is None
    assert stream_wait_cycle(_chain_program("dual_queue", 4, 1, 8), lookahead=0, grouped=True) is not None


def test_a_program_that_waits_for_itself_wedges_on_any_streams():
    stages = chain_stages(2, [0, 1])
    r0 = (I(op=Op.LOAD, stage=0, mb=0), I(op=Op.RECV_GRAD, stage=0, mb=0, peer=1, other_stage=1, specs=act(4)),
          I(op=Op.FWD, stage=0, mb=0), I(op=Op.SEND_ACT, stage=0, mb=0, peer=1, other_stage=1),
          I(op=Op.BWD, stage=0, mb=0))
    r1 = (I(op=Op.RECV_ACT, stage=1, mb=0, peer=0, other_stage=0, specs=act(4)), I(op=Op.FWD, stage=1, mb=0),
          I(op=Op.BWD, stage=1, mb=0), I(op=Op.SEND_GRAD, stage=1, mb=0, peer=0, other_stage=0))
    program = Program(schedule="bad", num_ranks=2, num_microbatches=1, stages=stages, streams=(r0, r1))
    for streams in ("rank", "pair", "direction"):
        assert stream_wait_cycle(program, lookahead=0, streams=streams) is not None


def test_bad_policies_are_refused():
    program = _chain_program("1f1b", 2, 1, 2)
    with pytest.raises(ValueError, match="streams='lane'"):
        stream_wait_cycle(program, streams="lane")
    with pytest.raises(ValueError, match="streams='rank'"):
        stream_wait_cycle(program, grouped=True, streams="direction")


@settings(max_examples=60, deadline=None)
@given(schedule=st.sampled_from(sorted(SCHEDULES)), ranks=st.integers(2, 4), chunks=st.integers(1, 2),
       microbatches=st.integers(1, 9), lookahead=st.integers(0, 4), peer_ordered=st.booleans())
def test_one_stream_per_direction_never_wedges_a_schedule(schedule, ranks, chunks, microbatches, lookahead,
                                                           peer_ordered):
    if schedule != "interleaved_1f1b":
        chunks = 1
    elif microbatches % ranks:
        microbatches = ranks * max(1, microbatches // ranks)   # Megatron's interleaving needs whole groups
    program = _chain_program(schedule, ranks, chunks, microbatches)
    assert stream_wait_cycle(program, lookahead, peer_ordered, streams="direction") is None


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 10_000), microbatches=st.integers(1, 6), split=st.booleans(),
       lookahead=st.integers(0, 3))
def test_one_stream_per_direction_never_wedges_a_dip_program(seed, microbatches, split, lookahead):
    """DIP's dual queue over sub-microbatches on a layout whose stages go back and forth between
    ranks, with random task durations (so the orders differ from case to case)."""
    rng = random.Random(seed)
    stages = vision_subs_stages()
    subs = (("vision", tuple(rng.randint(1, 3) for _ in range(microbatches))),)
    table: dict = {}

    def dur(*key):
        return table.setdefault(key, rng.uniform(0.1, 3.0))

    costs = TaskCosts(fwd=lambda *k: dur("f", *k), bwd=lambda *k: dur("b", *k), wgrad=lambda *k: dur("w", *k),
                      act=lambda *k: 1.0, comm=lambda *k: dur("c", *k) * 0.1)
    orders = dual_queue_schedule(stages, 2, microbatches, costs, split_backward=split, subs=subs)
    program = lower(stages, 2, microbatches, orders, schedule="dip", subs=subs)
    assert stream_wait_cycle(program, lookahead, streams="direction") is None
