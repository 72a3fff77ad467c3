"""A pipeline reuses the validated program of a batch whose message shapes it has planned before,
and plans afresh when any shape differs."""
import importlib

import torch

import dipc
from dipc.ir import dump_program
from examples.data import make_example


def _pipe(seed: int = 0):
    ex = make_example("vlm", seed=seed)
    mbs = ex.data.microbatches(3, 2)
    return ex, dipc.compile(ex.model, mbs[0], num_stages=2, schedule="1f1b", loss_weight=ex.loss_weight), mbs


def test_recurring_shapes_reuse_the_program_without_validating_again(monkeypatch):
    ex, pipe, mbs = _pipe()
    first = pipe.plan(mbs)
    calls = []
    validate_module = importlib.import_module("dipc.ir.validate")   # dipc.ir.validate is also the function
    real = validate_module.validate
    monkeypatch.setattr(validate_module, "validate", lambda p, *a, **k: calls.append(p) or real(p, *a, **k))
    same_shapes = [{k: v.clone() for k, v in mb.items()} for mb in mbs]   # other tensors, same shapes
    assert pipe.plan(same_shapes) is first and not calls
    _, fresh, _ = _pipe()   # a pipeline that never saw these shapes plans the same program
    assert dump_program(fresh.plan(mbs)) == dump_program(first)


def test_other_shapes_or_schedule_plan_afresh():
    ex, pipe, mbs = _pipe()
    first = pipe.plan(mbs)
    other = pipe.plan(list(reversed(mbs)))
    assert other is not first and dump_program(other) != dump_program(first)
    assert pipe.plan(mbs, schedule="gpipe") is not first
    assert pipe.plan(mbs) is first
    result = pipe.step(mbs)   # and the cached program runs
    assert torch.isfinite(torch.tensor(result.loss))
