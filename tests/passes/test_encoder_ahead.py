"""Encoder look-ahead orders: by hand on a small layout, and by property on random encoder +
backbone layouts (every order either lowers to a valid program or is refused as a wait cycle)."""
from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dipc.errors import ScheduleError
from dipc.ir.instructions import Op
from dipc.ir.program import StageInfo
from dipc.ir.validate import validate
from dipc.passes.codegen import lower
from dipc.passes.encoder_ahead import backbone_schedules, check_no_wait_cycle, encoder_ahead_orders
from dipc.passes.schedules import ComputeAction


def layout(num_ranks: int, enc_stages: int, chunks: int, enc_ranks: list[int] | None = None) -> list[StageInfo]:
    """``enc_stages`` encoder stages (a chain, on ``enc_ranks``) feeding a backbone chain of
    ``num_ranks * chunks`` stages placed round-robin; the backbone's first stage loads the text."""
    enc_ranks = enc_ranks or [e % num_ranks for e in range(enc_stages)]
    stages = []
    for e in range(enc_stages):
        stages.append(StageInfo(id=e, rank=enc_ranks[e], modality="vision", producers=(e - 1,) if e else (),
                                grad_producers=(e - 1,) if e else (), loads=("pixels",) if e == 0 else ()))
    for b in range(num_ranks * chunks):
        s = enc_stages + b
        prev = (s - 1,)
        stages.append(StageInfo(id=s, rank=b % num_ranks, modality="backbone", producers=prev, grad_producers=prev,
                                loads=("input_ids",) if b == 0 else (), has_loss=b == num_ranks * chunks - 1))
    return stages


def text(order: list[ComputeAction]) -> str:
    return " ".join(map(str, order))


def test_coarse_order_runs_every_encoder_forward_first_and_backward_last() -> None:
    stages = layout(2, 1, 1)      # vision s0 on rank 0; backbone s1 on rank 0, s2 on rank 1
    orders = encoder_ahead_orders(stages, 2, 3)
    assert text(orders[0]) == "F0.0 F0.1 F0.2 F1.0 F1.1 B1.0 F1.2 B1.1 B1.2 B0.0 B0.1 B0.2"
    assert text(orders[1]) == "F2.0 B2.0 F2.1 B2.1 F2.2 B2.2"


def test_look_ahead_interleaves_encoder_work_with_the_backbone() -> None:
    stages = layout(2, 1, 1)
    orders = encoder_ahead_orders(stages, 2, 4, ahead=1, lag=1)
    # encoder forwards of m + 1 before the backbone's first forward of m; encoder backward of m
    # once the backbone's backward of m + 1 is out
    assert text(orders[0]) == "F0.0 F0.1 F1.0 F0.2 F1.1 B1.0 F0.3 F1.2 B1.1 B0.0 F1.3 B1.2 B0.1 B1.3 B0.2 B0.3"


def test_backbone_schedules_follow_the_placement() -> None:
    assert backbone_schedules(layout(2, 1, 1), 2) == ["1f1b", "zb_h1"]
    assert backbone_schedules(layout(2, 2, 2), 2) == ["interleaved_1f1b"]
    uneven = layout(2, 1, 1)[:2] + [StageInfo(id=2, rank=0, modality="backbone", producers=(1,), grad_producers=(1,),
                                              has_loss=True)]
    assert backbone_schedules(uneven, 2) == ["gpipe"]


def test_layouts_without_an_encoder_ahead_of_the_backbone_are_refused() -> None:
    text_only = [StageInfo(id=s, rank=s, modality="backbone", producers=(s - 1,) if s else (),
                           grad_producers=(s - 1,) if s else ()) for s in range(2)]
    with pytest.raises(ScheduleError, match="no encoder"):
        encoder_ahead_orders(text_only, 2, 2)
    late = [StageInfo(id=0, rank=0, modality="backbone", loads=("input_ids",)),
            StageInfo(id=1, rank=1, modality="vision", producers=(0,), grad_producers=(0,)),
            StageInfo(id=2, rank=1, modality="backbone", producers=(1,), grad_producers=(1,), has_loss=True)]
    with pytest.raises(ScheduleError, match="before the backbone"):
        encoder_ahead_orders(late, 2, 2)


def test_a_wait_cycle_is_refused() -> None:
    stages = layout(2, 1, 1)
    # rank 1 wants the backbone's backward before its forward: nothing can start it
    orders = [[ComputeAction(Op.FWD, 0, 0), ComputeAction(Op.FWD, 1, 0), ComputeAction(Op.BWD, 1, 0),
               ComputeAction(Op.BWD, 0, 0)],
              [ComputeAction(Op.BWD, 2, 0), ComputeAction(Op.FWD, 2, 0)]]
    with pytest.raises(ScheduleError, match="deadlock"):
        check_no_wait_cycle(stages, orders)


@settings(max_examples=120, deadline=None)
@given(P=st.integers(1, 4), enc=st.integers(1, 3), chunks=st.integers(1, 3), M=st.integers(1, 9),
       ahead=st.sampled_from([None, 0, 1, 2, 3, 4]), lag=st.integers(0, 4), zb=st.booleans(), data=st.data())
def test_every_order_lowers_to_a_valid_program_or_is_refused(P, enc, chunks, M, ahead, lag, zb, data) -> None:
    enc_ranks = data.draw(st.lists(st.integers(0, P - 1), min_size=enc, max_size=enc))
    stages = layout(P, enc, chunks, enc_ranks)
    backbone = "zb_h1" if zb and chunks == 1 else None
    try:
        orders = encoder_ahead_orders(stages, P, M, ahead=ahead, lag=lag, backbone=backbone)
    except ScheduleError as e:
        assert "deadlock" in str(e)
        assert ahead is not None, "the coarse order never waits on itself"
        return
    for r, order in enumerate(orders):
        assert all(stages[a.stage].rank == r for a in order)
        enc_fwd = [i for i, a in enumerate(order) if a.op is Op.FWD and a.stage < enc]
        enc_bwd = [i for i, a in enumerate(order) if a.op is Op.BWD and a.stage < enc]
        mine = [a for a in order if a.stage >= enc]
        if ahead is None and mine:
            assert max(enc_fwd, default=-1) < order.index(mine[0]) and min(enc_bwd, default=len(order)) > \
                order.index(mine[-1])
    program = lower(stages, P, M, orders, schedule="dip")
    validate(program)
    ran = sorted((a.op.value, a.stage, a.mb) for order in orders for a in order)
    want = {(Op.FWD.value, s.id, m) for s in stages for m in range(M)}
    assert {x for x in ran if x[0] == Op.FWD.value} == want
    assert len(ran) == len(set(ran)), "an action ran twice"
