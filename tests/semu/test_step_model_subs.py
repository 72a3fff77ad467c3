"""SEMU scores programs with modality sub-microbatches from each sub's own length statistics."""
from __future__ import annotations

import pytest
import torch

import dipc
from dipc.ir import Op
from dipc.semu.costs import layer_cost_model
from dipc.semu.profiles import load_preset
from dipc.semu.step_model import StepModel, StepModelError, batch_length_stats, sub_length_stats
from examples.data import make_example


@pytest.fixture(scope="module")
def vlm():
    ex = make_example("vlm", seed=0)
    mbs = ex.data.microbatches(3, 3)
    pipe = dipc.compile(ex.model, mbs[0], num_stages=2, loss_weight=ex.loss_weight, sub_microbatches={"vision": 1})
    return pipe, mbs, layer_cost_model(pipe.captured)


def test_sub_times_and_memory_come_from_the_subs(vlm):
    pipe, mbs, cm = vlm
    stats = [batch_length_stats(mb) for mb in mbs]
    sm = StepModel.for_pipeline(pipe, cm, load_preset("h800"), stats, sub_stats=sub_length_stats(pipe, mbs))
    counts = dict(pipe.sub_counts(mbs))["vision"]
    for m, n in enumerate(counts):
        whole_act = sm.activation_bytes(0, m)
        sub_acts = [sm.activation_bytes(0, m, j) for j in range(n)]
        # activations are linear in the per-image statistics: the subs add up to the whole
        assert sum(sub_acts) == pytest.approx(whole_act, rel=1e-9)
        if n > 1:
            assert all(sm.stage_time(0, m, j).fwd < sm.stage_time(0, m).fwd for j in range(n))
    with pytest.raises(StepModelError, match="sub_stats"):
        StepModel.for_pipeline(pipe, cm, load_preset("h800"), stats).stage_time(0, 0, 0)


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b", "dual_queue"])
def test_emulator_scores_programs_with_subs(vlm, schedule):
    pipe, mbs, cm = vlm
    stats = [batch_length_stats(mb) for mb in mbs]
    sm = StepModel.for_pipeline(pipe, cm, load_preset("h800"), stats, sub_stats=sub_length_stats(pipe, mbs))
    program = pipe.plan(mbs, schedule=schedule)
    assert any(i.sub >= 0 for s in program.streams for i in s)
    result = sm.simulate(program, record=True)
    busy = sum(sm.compute_time(i) for i in program.streams[0] if i.op in (Op.FWD, Op.BWD))
    assert result.step_time >= busy > 0
    # every sub's stash is freed by its own backward: memory returns to the static level
    for r, timeline in enumerate(result.memory_timeline):
        static = sum(sm.static_bytes(s) for s in program.stages_of_rank(r))
        assert timeline[-1][1] == pytest.approx(static, rel=1e-9)
        assert result.peak_memory[r] > static
