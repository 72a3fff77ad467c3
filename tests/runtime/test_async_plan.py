"""The online loop: plans made ahead on a forked CPU worker equal synchronous plans, late or
failing plans fall back to the last valid schedule (re-lowered for the new shapes), every
returned program validates, and under torch.distributed one rank plans and broadcasts."""
import time

import pytest
import torch

import dipc
from dipc.errors import DipcError
from dipc.ir import dump_program
from dipc.runtime.async_plan import AsyncPlanner, compute_orders_of
from examples.data import make_example

pytestmark = pytest.mark.timeout(300)


def _pipe(schedule="1f1b"):
    ex = make_example("vlm", seed=0)
    example = ex.data.microbatches(1, 2)[0]
    pipe = dipc.compile(ex.model, example, num_stages=2, schedule=schedule, loss_weight=ex.loss_weight,
                        optimizer=lambda ps: torch.optim.SGD(ps, lr=1e-2))
    return ex, pipe


def test_worker_plans_equal_synchronous_plans_and_train():
    ex, pipe = _pipe()
    batches = [ex.data.microbatches(3, 2) for _ in range(3)]
    with AsyncPlanner(pipe, workers=1) as planner:
        planner.submit(0, batches[0])
        for i, mbs in enumerate(batches):
            if i + 1 < len(batches):
                planner.submit(i + 1, batches[i + 1])
            out = planner.get(i, mbs)
            assert out.source == "worker", out.reason
            assert dump_program(out.program) == dump_program(pipe.plan(mbs))
            assert torch.isfinite(torch.tensor(pipe.step(mbs, out.program).loss))
        assert planner.stats["worker"] == 3


def _slow_plan(pipe, mbs):
    time.sleep(30)
    return pipe.plan(mbs)


def _failing_plan(pipe, mbs):
    raise RuntimeError("planner bug")


def test_late_plan_falls_back_to_the_last_schedule_relowered_for_new_shapes():
    ex, pipe = _pipe("dual_queue")
    first, second = ex.data.microbatches(4, 2), ex.data.microbatches(4, 2)
    with AsyncPlanner(pipe, workers=1) as fast:
        fast.submit(0, first)
        good = fast.get(0, first)
    with AsyncPlanner(pipe, _slow_plan, workers=1, deadline_s=0.5) as slow:
        slow._last = good.program
        slow.submit(1, second)
        t0 = time.perf_counter()
        out = slow.get(1, second)
        assert time.perf_counter() - t0 < 10
    assert out.source == "fallback" and "not ready" in out.reason
    assert compute_orders_of(out.program) == compute_orders_of(good.program)   # same order, new shapes
    assert dump_program(out.program) == dump_program(pipe.plan(second, schedule="dual_queue",
                                                                compute_orders=compute_orders_of(good.program)))
    pipe.step(second, out.program)


def test_failing_planner_and_missing_plan_fall_back_with_the_reason():
    ex, pipe = _pipe()
    mbs = ex.data.microbatches(2, 2)
    with AsyncPlanner(pipe, _failing_plan, workers=1) as planner:
        planner.submit("a", mbs)
        out = planner.get("a", mbs)
        assert out.source == "fallback" and "planner bug" in out.reason
        assert planner.get("never", mbs).reason.startswith("no plan was submitted")
        with pytest.raises(DipcError, match="already pending"):
            planner.submit("b", mbs)
            planner.submit("b", mbs)


def test_a_dip_pipeline_falls_back_to_a_static_schedule_not_to_its_search(monkeypatch):
    ex, pipe = _pipe("dip")
    mbs = ex.data.microbatches(3, 2)
    with AsyncPlanner(pipe, _failing_plan, workers=1) as planner:
        planner.submit(0, mbs)
        searched = []
        monkeypatch.setattr(type(pipe), "_plan_dip", lambda self, *a: searched.append(a))
        out = planner.get(0, mbs)
    assert out.source == "fallback" and not searched
    assert out.program.schedule == pipe.fallback_schedule() == "interleaved_1f1b"   # 2 chunks: no plain 1F1B
    assert torch.isfinite(torch.tensor(pipe.step(mbs, out.program).loss))


def test_back_pressure_bounds_pending_plans():
    ex, pipe = _pipe()
    batches = [ex.data.microbatches(2, 2) for _ in range(4)]
    with AsyncPlanner(pipe, workers=1, depth=1) as planner:
        planner.submit(0, batches[0])
        planner.submit(1, batches[1])            # waits for plan 0 to finish first
        assert planner._pending[0].done()
        assert planner.get(0, batches[0]).source == "worker"
        assert planner.get(1, batches[1]).source == "worker"


def _broadcast_rank(rank, world):
    from dipc.runtime.async_plan import broadcast_program
    from dipc.runtime.distributed import run_step_distributed

    ex, pipe = _pipe("dual_queue")
    mbs = ex.data.microbatches(3, 2)
    program = None
    if rank == 0:
        with AsyncPlanner(pipe, workers=1) as planner:
            planner.submit(0, mbs)
            program = planner.get(0, mbs).program
    program = broadcast_program(program)
    result = run_step_distributed(pipe, mbs, program, timeout_s=60)
    return dump_program(program), result.loss


def test_rank0_plans_and_broadcasts_under_gloo():
    from dipc.runtime.launch import spawn

    (text0, loss0), (text1, loss1) = spawn(_broadcast_rank, 2, timeout_s=240)
    assert text0 == text1 and loss0 == pytest.approx(loss1)


def test_demo_trains_with_async_planning_on_both_executors():
    from dipc.demo import DemoConfig, run_demo

    for executor in ("local", "gloo"):
        losses = run_demo(DemoConfig(steps=4, microbatches=2, executor=executor, async_plan=True, timeout_s=60))
        assert len(losses) == 4 and all(l == l for l in losses)
        sync = run_demo(DemoConfig(steps=4, microbatches=2, executor=executor, async_plan=False, timeout_s=60))
        assert losses == pytest.approx(sync, rel=1e-5)   # the same programs, so the same training
