"""Property test: over random batch shapes, stage counts and schedules, every plan validates,
round-trips through text and JSON, carries the exact shapes the runtime then receives, and the
pipelined gradients equal the reference."""
import copy

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import dipc
from dipc.ir import Op, RECV_OPS, dump_program, parse_program, program_from_json, program_to_json
from examples.data import make_example
from tests.runtime.helpers import reference_grads

_PIPES: dict = {}


def _pipe(name: str, stages: int, schedule: str, chunks: int):
    key = (name, stages, schedule, chunks)
    if key not in _PIPES:
        ex = make_example(name, seed=1)
        ex.model.double()
        example = ex.data.microbatches(1, 2)[0]
        example = {k: v.double() if v.is_floating_point() else v for k, v in example.items()}
        _PIPES[key] = (ex, dipc.compile(ex.model, example, num_stages=stages, chunks=chunks, schedule=schedule,
                                        loss_weight=ex.loss_weight))
    return _PIPES[key]


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(name=st.sampled_from(["vlm", "audio_llm", "t2v"]),
       stages=st.integers(1, 4),
       sched=st.sampled_from([("gpipe", 1), ("1f1b", 1), ("interleaved_1f1b", 2), ("zb_h1", 1), ("gpipe", 2)]),
       sizes=st.lists(st.integers(1, 3), min_size=1, max_size=5),
       seed=st.integers(0, 10_000))
def test_random_batches_plan_validate_and_match_reference(name, stages, sched, sizes, seed):
    schedule, chunks = sched
    ex, pipe = _pipe(name, stages, schedule, chunks)
    data = type(ex.data)(ex.config, ex.data.dc, seed=seed)
    mbs = [data.microbatches(1, n)[0] for n in sizes]
    mbs = [{k: v.double() if v.is_floating_point() else v for k, v in mb.items()} for mb in mbs]
    program = pipe.plan(mbs)   # validates
    assert parse_program(dump_program(program)) == program
    assert program_from_json(program_to_json(program)) == program
    recvs = [i for s in program.streams for i in s if i.op in RECV_OPS]
    assert all(i.specs for i in recvs if i.op == Op.RECV_ACT)
    ex.model.zero_grad(set_to_none=True)
    want = reference_grads(ex.model, mbs, pipe.loss_weights(mbs))
    pipe.step(mbs, program)   # the local transport checks every received shape against the plan
    got = {n: p.grad for n, p in ex.model.named_parameters() if p.grad is not None}
    assert set(got) == set(want)
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=1e-9, atol=1e-12)
    ex.model.zero_grad(set_to_none=True)
