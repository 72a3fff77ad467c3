"""Co-located ranks slowing each other (dipc.semu.contention): only compute that overlaps another
rank's compute on the same node is stretched, by 1 + s x the overlapped fraction."""
import dataclasses

import pytest

from dipc.ir import Op
from dipc.semu.contention import colocated_overlaps
from dipc.semu.profiles import load_preset, profile_from_json, profile_to_json
from dipc.semu.step_model import StepModel, pipeline_length_stats


@pytest.fixture(scope="module")
def vlm(vlm_2stage):
    """conftest's 2-stage VLM with 4 microbatches from a data source of its own (same seed), so the
    shared example's draws are left as other tests expect them."""
    ex, pipe, cm = vlm_2stage
    return pipe, type(ex.data)(ex.config, seed=0).microbatches(4, 2), cm


def _model(pipe, mbs, cm, slowdown: float, gpus_per_node: int = 8):
    h = load_preset("h800")
    cluster = dataclasses.replace(h, gpus_per_node=gpus_per_node,
                                  device=dataclasses.replace(h.device, colocated_slowdown=slowdown))
    stats = [pipeline_length_stats(pipe, mb) for mb in mbs]
    return StepModel.for_pipeline(pipe, cm, cluster, stats)


def test_overlaps_are_fractions_of_each_compute_span(vlm):
    pipe, mbs, cm = vlm
    model = _model(pipe, mbs, cm, 0.0)
    program = pipe.plan(mbs, schedule="1f1b")
    res = model.simulate(program, memory=False)
    over = colocated_overlaps(res, model.cluster)
    compute = {i for s in program.streams for i in s if i.op in (Op.FWD, Op.BWD)}
    assert set(over) == compute
    assert all(0.0 <= o <= 1.0 + 1e-9 for o in over.values())
    assert any(o > 0.05 for o in over.values())   # 1F1B's steady state overlaps the two ranks
    # the first rank's first forward runs before the second rank has anything to do
    first = program.streams[0][[i.op for i in program.streams[0]].index(Op.FWD)]
    assert over[first] == 0.0


def test_slowdown_stretches_overlapping_compute_and_only_on_one_node(vlm):
    pipe, mbs, cm = vlm
    program = pipe.plan(mbs, schedule="1f1b")
    plain = _model(pipe, mbs, cm, 0.0).simulate(program, memory=False).step_time
    slowed = _model(pipe, mbs, cm, 1.0).simulate(program, memory=False, record=False)
    assert slowed.raw_spans == ()                  # record=False is honoured after the refining rounds
    assert plain < slowed.step_time < 2.0 * plain   # only the overlapped part of each span doubles
    apart = _model(pipe, mbs, cm, 1.0, gpus_per_node=1).simulate(program, memory=False).step_time
    alone = _model(pipe, mbs, cm, 0.0, gpus_per_node=1).simulate(program, memory=False).step_time
    assert apart == pytest.approx(alone)           # ranks on different nodes share no cores


def test_profile_json_keeps_the_slowdown():
    h = load_preset("h800")
    prof = dataclasses.replace(h, device=dataclasses.replace(h.device, colocated_slowdown=0.4))
    assert profile_from_json(profile_to_json(prof)).device.colocated_slowdown == 0.4
    assert "colocated_slowdown" not in profile_to_json(h)["device"]
