"""DIP phase 2, the dual-queue stage interleaving: always valid, never slower than 1F1B on the
emulator for the costs it was given, faster when stages are unbalanced, within its memory limit."""
import dataclasses

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dipc.errors import InfeasibleMemoryError
from dipc.ir import Op, StageInfo
from dipc.ir.validate import validate
from dipc.passes.codegen import lower
from dipc.passes.dual_queue import TaskCosts, dual_queue_schedule
from dipc.passes.schedules import SCHEDULES, one_f_one_b
from dipc.semu.emulator import simulate
from dipc.semu.profiles import LinkProfile, load_preset


def chain(P, V=1, skip=()):
    S = P * V
    return [StageInfo(id=s, rank=s % P, producers=tuple(sorted({s - 1} | ({s - 2} if s in skip and s >= 2 else set())))
                      if s else (), grad_producers=(s - 1,) if s else (), loads=("x",) if s == 0 else (),
                      has_loss=s == S - 1) for s in range(S)]


def zero_latency():
    link = LinkProfile(latency=0.0, bandwidth=1e30)
    return dataclasses.replace(load_preset("h100_sxm"), intra_node=link, inter_node=link)


def step_time(stages, P, M, orders, costs: TaskCosts) -> float:
    program = lower(stages, P, M, orders, schedule="x")
    validate(program)
    table = {Op.FWD: costs.fwd, Op.BWD: costs.bwd, Op.BWD_I: costs.bwd, Op.BWD_W: costs.wgrad}
    return simulate(program, zero_latency(), lambda i: table[i.op](i.stage, i.mb) if i.op in table else 0.0,
                    record=False).step_time


@settings(max_examples=60, deadline=None)
@given(P=st.integers(1, 4), V=st.integers(1, 3), M=st.integers(1, 8), split=st.booleans(),
       skip=st.sets(st.integers(2, 11)), seed=st.integers(0, 100))
def test_every_dual_queue_program_validates(P, V, M, split, skip, seed):
    stages = chain(P, V, skip)
    costs = TaskCosts(fwd=lambda s, m: 1 + (s * 7 + m * 3 + seed) % 5, bwd=lambda s, m: 1 + (s + m + seed) % 4,
                      wgrad=(lambda s, m: 1.0) if split else None)
    orders = dual_queue_schedule(stages, P, M, costs, split_backward=split)
    validate(lower(stages, P, M, orders, schedule="dual_queue"))


@pytest.mark.parametrize("P,M", [(2, 4), (4, 8), (4, 16), (8, 16)])
def test_uniform_stages_match_1f1b(P, M):
    stages, costs = chain(P), TaskCosts()
    ours = step_time(stages, P, M, dual_queue_schedule(stages, P, M, costs), costs)
    assert ours <= step_time(stages, P, M, one_f_one_b(stages, P, M), costs) + 1e-9


@pytest.mark.parametrize("P,M", [(4, 8), (4, 16), (8, 16)])
def test_unbalanced_stages_beat_1f1b(P, M):
    """A light encoder stage and microbatches of varying length: the greedy order uses the slack."""
    stages = chain(P)
    costs = TaskCosts(fwd=lambda s, m: (0.3 if s == 0 else 1.0) * (1 + m % 3),
                      bwd=lambda s, m: (0.6 if s == 0 else 2.0) * (1 + m % 3))
    ours = step_time(stages, P, M, dual_queue_schedule(stages, P, M, costs), costs)
    base = step_time(stages, P, M, one_f_one_b(stages, P, M), costs)
    assert ours < base


def test_split_backward_beats_plain():
    P, M = 4, 8
    stages = chain(P)
    plain = TaskCosts(fwd=lambda s, m: 1.0, bwd=lambda s, m: 2.0)
    split = TaskCosts(fwd=lambda s, m: 1.0, bwd=lambda s, m: 1.0, wgrad=lambda s, m: 1.0)
    t_plain = step_time(stages, P, M, dual_queue_schedule(stages, P, M, plain), plain)
    t_split = step_time(stages, P, M, dual_queue_schedule(stages, P, M, split, split_backward=True), split)
    assert t_split < t_plain


def test_memory_limit_caps_stashed_microbatches():
    P, M = 4, 12
    stages = chain(P)
    orders = dual_queue_schedule(stages, P, M, memory_limit=2)
    for order in orders:
        live = peak = 0
        for a in order:
            live += 1 if a.op is Op.FWD else -1
            peak = max(peak, live)
        assert peak <= 2
    with pytest.raises(InfeasibleMemoryError, match="Fix:"):
        dual_queue_schedule(stages, P, M, memory_limit=0.5)


def test_registered_as_a_schedule():
    assert "dual_queue" in SCHEDULES
