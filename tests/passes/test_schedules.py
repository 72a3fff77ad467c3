"""Baseline schedules and their lowering: textbook orders by hand, every schedule validated by property."""
from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dipc.errors import ScheduleError
from dipc.ir.instructions import Instruction, Op, TensorSpec
from dipc.ir.program import StageInfo
from dipc.ir.validate import validate
from dipc.passes.codegen import build_program, fix_recv_order, lower
from dipc.passes.schedules import (
    SCHEDULES,
    ComputeAction,
    format_compute_orders,
    get_schedule,
    gpipe,
    interleaved_1f1b,
    one_f_one_b,
    zero_bubble_h1,
)


def chain(num_ranks: int, num_chunks: int = 1, skips: dict[int, bool] | None = None,
          loads: frozenset[int] = frozenset({0})) -> list[StageInfo]:
    """Stage s on rank s % P reading s - 1; ``skips[s] = with_grad`` adds an edge s - 2 -> s."""
    skips = skips or {}
    num_stages = num_ranks * num_chunks
    stages = []
    for s in range(num_stages):
        producers: tuple[int, ...] = (s - 1,) if s else ()
        grad_producers = producers
        if s in skips and s >= 2:
            producers += (s - 2,)
            grad_producers += (s - 2,) if skips[s] else ()
        stages.append(StageInfo(id=s, rank=s % num_ranks, producers=producers,
                                grad_producers=grad_producers,
                                loads=("input_ids",) if s in loads else (),
                                has_loss=s == num_stages - 1))
    return stages


def text(order: list[ComputeAction]) -> str:
    return " ".join(map(str, order))


def fake_specs(kind: str, mb: int, producer: int, consumer: int, sub: int = -1) -> tuple[TensorSpec, ...]:
    dtype = "f32" if kind == "act" else "bf16"
    return (TensorSpec(dtype=dtype, shape=(mb + 1, producer, consumer)), TensorSpec(kind="int"))


# ---------------------------------------------------------------- textbook orders, checked by hand


def test_1f1b_matches_textbook_p4_m8() -> None:
    orders = one_f_one_b(chain(4), 4, 8)
    assert text(orders[0]) == "F0.0 F0.1 F0.2 F0.3 B0.0 F0.4 B0.1 F0.5 B0.2 F0.6 B0.3 F0.7 B0.4 B0.5 B0.6 B0.7"
    assert text(orders[1]) == "F1.0 F1.1 F1.2 B1.0 F1.3 B1.1 F1.4 B1.2 F1.5 B1.3 F1.6 B1.4 F1.7 B1.5 B1.6 B1.7"
    assert text(orders[3]) == " ".join(f"F3.{m} B3.{m}" for m in range(8))


def test_1f1b_fewer_microbatches_than_ranks_is_all_warmup() -> None:
    assert text(one_f_one_b(chain(4), 4, 2)[0]) == "F0.0 F0.1 B0.0 B0.1"


def test_gpipe_all_forwards_then_all_backwards() -> None:
    assert [text(o) for o in gpipe(chain(2), 2, 3)] == [
        "F0.0 F0.1 F0.2 B0.0 B0.1 B0.2",
        "F1.0 F1.1 F1.2 B1.0 B1.1 B1.2",
    ]
    # several stages per rank: forwards by ascending stage, backwards by descending stage
    assert text(gpipe(chain(2, 2), 2, 2)[0]) == "F0.0 F0.1 F2.0 F2.1 B2.0 B2.1 B0.0 B0.1"


def test_interleaved_matches_megatron_p2_v2_m4() -> None:
    # Megatron: forward k -> chunk (k // P) % V, warmup (P - r - 1) * 2 + (V - 1) * P.
    orders = interleaved_1f1b(chain(2, 2), 2, 4)
    assert text(orders[0]) == ("F0.0 F0.1 F2.0 F2.1 "                      # warmup 4
                               "F0.2 B2.0 F0.3 B2.1 F2.2 B0.0 F2.3 B0.1 "  # steady
                               "B2.2 B2.3 B0.2 B0.3")                      # cooldown
    assert text(orders[1]) == ("F1.0 F1.1 "
                               "F3.0 B3.0 F3.1 B3.1 F1.2 B1.0 F1.3 B1.1 F3.2 B3.2 F3.3 B3.3 "
                               "B1.2 B1.3")


def test_interleaved_matches_narayanan_figure_p4_v2_m8_rank0() -> None:
    # Narayanan et al. 2021, Fig. 4 (bottom), device 1: 1 2 3 4 | 1 2 3 4 (chunk 2) | 5 6, then 1F1B.
    order = interleaved_1f1b(chain(4, 2), 4, 8)[0]
    assert text(order) == ("F0.0 F0.1 F0.2 F0.3 F4.0 F4.1 F4.2 F4.3 F0.4 F0.5 "
                           "F0.6 B4.0 F0.7 B4.1 F4.4 B4.2 F4.5 B4.3 F4.6 B0.0 F4.7 B0.1 "
                           "B0.2 B0.3 B4.4 B4.5 B4.6 B4.7 B0.4 B0.5 B0.6 B0.7")


def test_interleaved_with_one_chunk_is_1f1b() -> None:
    assert interleaved_1f1b(chain(3), 3, 5) == one_f_one_b(chain(3), 3, 5)


def test_zb_h1_order_p4_m8() -> None:
    # Qi et al. 2024, Fig. 3 (ZB-H1): 1F1B's warmup and F/B alternation with B = BWD_I, and rank r
    # starting its W passes r microbatches late. By hand, with tf = tb_i = tb_w = 1: F3.0 runs at
    # t=3, the first gradient reaches rank 0 at t=7 (three BWD_I back), so rank 0 idles 3 after
    # its 4 forwards and then never again (it holds 4 stashes, its 1F1B count, so it runs each W
    # right after its I); rank 3 runs F I F I F I F I without waiting and starts paying back
    # W3.0.. from the fourth pair on, the last three W filling the tail while I2.7, I1.7, I0.7
    # travel back. Every rank idles 3 = (P - 1)(tf + tb_i - tb_w): step 24 + 3 = 27 vs 33.
    orders = zero_bubble_h1(chain(4), 4, 8)
    assert text(orders[0]) == ("F0.0 F0.1 F0.2 F0.3 I0.0 W0.0 F0.4 I0.1 W0.1 F0.5 I0.2 W0.2 F0.6 "
                               "I0.3 W0.3 F0.7 I0.4 W0.4 I0.5 W0.5 I0.6 W0.6 I0.7 W0.7")
    assert text(orders[1]) == ("F1.0 F1.1 F1.2 I1.0 F1.3 I1.1 W1.0 F1.4 I1.2 W1.1 F1.5 I1.3 W1.2 "
                               "F1.6 I1.4 W1.3 F1.7 I1.5 W1.4 I1.6 W1.5 I1.7 W1.6 W1.7")
    assert text(orders[3]) == ("F3.0 I3.0 F3.1 I3.1 F3.2 I3.2 F3.3 I3.3 W3.0 F3.4 I3.4 W3.1 F3.5 "
                               "I3.5 W3.2 F3.6 I3.6 W3.3 F3.7 I3.7 W3.4 W3.5 W3.6 W3.7")
    # with fewer microbatches than the deferral, everything is deferred to the end
    assert text(zero_bubble_h1(chain(4), 4, 2)[3]) == "F3.0 I3.0 F3.1 I3.1 W3.0 W3.1"


@pytest.mark.parametrize(("num_ranks", "num_microbatches"), [(1, 1), (2, 1), (3, 7), (4, 8), (4, 3), (8, 5)])
def test_zb_h1_pairs_and_memory_bound(num_ranks: int, num_microbatches: int) -> None:
    orders = zero_bubble_h1(chain(num_ranks), num_ranks, num_microbatches)
    one = one_f_one_b(chain(num_ranks), num_ranks, num_microbatches)
    for rank, order in enumerate(orders):
        assert {a.op for a in order} == {Op.FWD, Op.BWD_I, Op.BWD_W}
        assert len(order) == 3 * num_microbatches
        for m in range(num_microbatches):
            assert order.index(ComputeAction(Op.BWD_I, rank, m)) < order.index(ComputeAction(Op.BWD_W, rank, m))
        # the FWD / BWD_I order is 1F1B's with BWD_I for BWD
        assert [(a.op, a.mb) for a in order if a.op is not Op.BWD_W] == [
            (Op.BWD_I if a.op is Op.BWD else a.op, a.mb) for a in one[rank]]
        until_i = until_w = deferred = 0
        for action in order:
            until_i += {Op.FWD: 1, Op.BWD_I: -1}.get(action.op, 0)
            until_w += {Op.FWD: 1, Op.BWD_W: -1}.get(action.op, 0)
            deferred += {Op.BWD_I: 1, Op.BWD_W: -1}.get(action.op, 0)
            assert until_i <= min(num_ranks - rank, num_microbatches)  # full stashes: 1F1B's count
            assert until_w <= min(num_ranks, num_microbatches)         # until BWD_W: 1F1B's peak (rank 0)
            if action.op is Op.FWD:
                assert deferred <= rank                                # W starts r microbatches late


def test_compute_action_prints_and_rejects_non_compute_ops() -> None:
    assert str(ComputeAction(Op.BWD_W, 3, 12)) == "W3.12"
    with pytest.raises(ScheduleError, match="not a compute op"):
        ComputeAction(Op.SEND_ACT, 0, 0)
    assert format_compute_orders(one_f_one_b(chain(2), 2, 1)) == "rank 0: F0.0 B0.0\nrank 1: F1.0 B1.0"


# ---------------------------------------------------------------- errors


def test_unknown_schedule_lists_valid_names() -> None:
    with pytest.raises(ScheduleError, match=r"unknown schedule 'pipedream'.*Fix: use one of 1f1b, dual_queue, gpipe, "
                                            r"interleaved_1f1b, zb_h1"):
        get_schedule("pipedream")
    with pytest.raises(ScheduleError, match="unknown schedule"):
        build_program(chain(2), 2, 2, "zb_v")


@pytest.mark.parametrize("name", ["1f1b", "zb_h1"])
def test_one_stage_per_rank_schedules_name_the_fix(name: str) -> None:
    with pytest.raises(ScheduleError, match=r"rank 0 holds 2 stage\(s\) \[0, 2\].*Fix: use interleaved_1f1b"):
        get_schedule(name)(chain(2, 2), 2, 4)


def test_interleaved_needs_equal_stage_counts() -> None:
    stages = [StageInfo(id=0, rank=0), StageInfo(id=1, rank=1, producers=(0,), grad_producers=(0,)),
              StageInfo(id=2, rank=1, producers=(1,), grad_producers=(1,))]
    with pytest.raises(ScheduleError, match=r"\[1, 2\] stages per rank.*Fix:"):
        interleaved_1f1b(stages, 2, 4)
    validate(build_program(stages, 2, 4, "gpipe"))  # gpipe takes any placement


@pytest.mark.parametrize(("stages", "num_ranks", "num_microbatches", "match"), [
    (chain(2), 2, 0, "num_microbatches=0"),
    (chain(2), 1, 2, "rank 1, outside 0..0"),
    ([StageInfo(id=1, rank=0)], 1, 1, "has id 1"),
    ([StageInfo(id=0, rank=0, producers=(0,))], 1, 1, "not an earlier stage"),
    ([StageInfo(id=0, rank=0), StageInfo(id=1, rank=0, grad_producers=(0,))], 1, 1, "subset of producers"),
])
def test_bad_inputs_raise(stages: list[StageInfo], num_ranks: int, num_microbatches: int, match: str) -> None:
    for fn in SCHEDULES.values():
        with pytest.raises(ScheduleError, match=match):
            fn(stages, num_ranks, num_microbatches)


# ---------------------------------------------------------------- lowering


def test_lower_1f1b_two_ranks() -> None:
    program = build_program(chain(2), 2, 2, "1f1b", specs=fake_specs)
    assert program.schedule == "1f1b" and program.num_microbatches == 2
    ops = [[(i.op.value, i.stage, i.mb) for i in stream] for stream in program.streams]
    assert ops[0] == [("LOAD", 0, 0), ("FWD", 0, 0), ("SEND_ACT", 0, 0), ("LOAD", 0, 1), ("FWD", 0, 1),
                      ("SEND_ACT", 0, 1), ("RECV_GRAD", 0, 0), ("BWD", 0, 0), ("RECV_GRAD", 0, 1),
                      ("BWD", 0, 1), ("REDUCE", 0, -1), ("OPTIM", -1, -1)]
    assert ops[1] == [("RECV_ACT", 1, 0), ("FWD", 1, 0), ("BWD", 1, 0), ("SEND_GRAD", 1, 0),
                      ("RECV_ACT", 1, 1), ("FWD", 1, 1), ("BWD", 1, 1), ("REDUCE", 1, -1), ("SEND_GRAD", 1, 1),
                      ("OPTIM", -1, -1)]
    recv = program.streams[1][0]
    assert (recv.peer, recv.other_stage) == (0, 0)
    assert recv.specs == fake_specs("act", 0, 0, 1)
    assert program.streams[0][6].specs == fake_specs("grad", 0, 0, 1)
    assert all(not i.specs for s in program.streams for i in s if i.op is not Op.RECV_ACT and i.op is not Op.RECV_GRAD)
    validate(program)


def test_lower_is_pure_and_checks_placement() -> None:
    stages = chain(2)
    orders = [list(o) for o in one_f_one_b(stages, 2, 3)]
    before = [list(o) for o in orders]
    without = lower(stages, 2, 3, orders, schedule="1f1b", add_optim=False, add_reduce=False)
    assert orders == before
    assert all(stream[-1].op is Op.BWD or stream[-1].op is Op.SEND_GRAD for stream in without.streams)
    assert all(i.op is not Op.OPTIM for s in without.streams for i in s)
    with pytest.raises(ScheduleError, match="rank 0, step 0: F1.0 runs stage 1, which lives on rank 1"):
        lower(stages, 2, 3, [orders[1], orders[0]], schedule="1f1b")
    with pytest.raises(ScheduleError, match="for 1 ranks, but num_ranks=2"):
        lower(stages, 2, 3, orders[:1], schedule="1f1b")


def _recv(mb: int) -> Instruction:
    return Instruction(op=Op.RECV_ACT, stage=1, mb=mb, other_stage=0, peer=0)


def test_fix_recv_order_pulls_earlier_messages_forward() -> None:
    sends = tuple(Instruction(op=Op.SEND_ACT, stage=0, mb=m, other_stage=1, peer=1) for m in range(3))
    fwd = [Instruction(op=Op.FWD, stage=1, mb=m) for m in range(3)]
    receiver = (_recv(2), fwd[2], _recv(0), fwd[0], _recv(1), fwd[1])
    streams = (sends, receiver)
    fixed = fix_recv_order(streams)
    assert streams == (sends, receiver)  # input untouched
    assert fixed == (sends, (_recv(0), _recv(1), _recv(2), fwd[2], fwd[0], fwd[1]))
    assert fix_recv_order(fixed) == fixed
    with pytest.raises(ScheduleError, match="has no matching send"):
        fix_recv_order(((), (_recv(0),)))
    with pytest.raises(ScheduleError, match="never receives it"):
        fix_recv_order((sends, (_recv(2),)))


@pytest.mark.parametrize(("num_ranks", "num_chunks", "num_microbatches"),
                         [(2, 2, 5), (3, 2, 4), (4, 3, 5), (4, 2, 6), (5, 3, 7), (6, 4, 9), (4, 3, 1), (3, 3, 3)])
def test_interleaved_any_microbatch_count_is_deadlock_free(num_ranks: int, num_chunks: int,
                                                           num_microbatches: int) -> None:
    # Megatron-core's smaller last group deadlocks at e.g. (4, 3, 5); the remainder joins the last group.
    validate(build_program(chain(num_ranks, num_chunks), num_ranks, num_microbatches, "interleaved_1f1b"))


@st.composite
def pipelines(draw: st.DrawFn) -> tuple[list[StageInfo], int, int]:
    num_ranks = draw(st.integers(1, 4))
    num_chunks = draw(st.integers(1, 3))
    num_microbatches = draw(st.integers(1, 9))
    num_stages = num_ranks * num_chunks
    skips = draw(st.dictionaries(st.integers(2, max(2, num_stages - 1)), st.booleans(), max_size=num_stages))
    loads = draw(st.frozensets(st.integers(0, num_stages - 1)))
    return chain(num_ranks, num_chunks, skips, loads), num_ranks, num_microbatches


@settings(max_examples=150, deadline=None)
@given(pipelines())
def test_every_schedule_lowers_to_a_valid_program(pipeline: tuple[list[StageInfo], int, int]) -> None:
    stages, num_ranks, num_microbatches = pipeline
    one_per_rank = len(stages) == num_ranks
    for name in SCHEDULES:
        if name in ("1f1b", "zb_h1") and not one_per_rank:
            with pytest.raises(ScheduleError, match="interleaved_1f1b"):
                build_program(stages, num_ranks, num_microbatches, name, specs=fake_specs)
            continue
        program = build_program(stages, num_ranks, num_microbatches, name, specs=fake_specs)
        validate(program)  # complete, ordered, FIFO-consistent, deadlock-free
        for stream in program.streams:
            for ins in stream:
                if ins.op in (Op.RECV_ACT, Op.RECV_GRAD):
                    assert ins.specs == fake_specs(*ins.message_key())
