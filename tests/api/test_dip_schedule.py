"""``dipc.compile(..., schedule="dip")``: every batch planned by DIP's SEMU-scored search, which
is valid, never slower on SEMU than any static schedule of the layout, fits the compiled memory
limit, and trains with gradients equal to the single-process reference — every encoder
look-ahead order included."""
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import dipc
from dipc.errors import ScheduleError
from dipc.ir.recompute import recompute_plan
from dipc.ir.validate import validate
from dipc.semu.compare import encoder_ahead_candidates, plan_dip, searched_order, step_model
from examples.data import make_example
from tests.runtime.helpers import float64_batch, float64_example, step_matches_reference

def _example(name: str):
    return float64_example(name, seed=5)


_batch = float64_batch


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(name=st.sampled_from(["vlm", "audio_llm", "t2v"]), segments=st.sampled_from(["cost", "spread"]),
       sizes=st.lists(st.integers(1, 3), min_size=2, max_size=5), seed=st.integers(0, 10_000))
def test_dip_schedule_beats_or_ties_every_static_schedule_and_trains_exactly(name, segments, sizes, seed):
    ex = _example(name)
    mbs = _batch(ex, seed, sizes)
    pipe = dipc.compile(ex.model, mbs[0], num_stages=2, schedule="dip", loss_weight=ex.loss_weight,
                        segments=segments, profile="h800")
    program = pipe.plan(mbs)
    validate(program)
    assert program.schedule == "dip" or program.schedule in pipe.static_schedules()
    assert pipe.plan(mbs) is program, "a batch of the same shapes reuses its plan"
    model = step_model(pipe, mbs, "h800")
    dip = model.simulate(program).step_time
    assert pipe.static_schedules(), "some static schedule runs on every layout (gpipe)"
    for base in pipe.static_schedules():
        assert dip <= model.simulate(pipe.plan(mbs, schedule=base)).step_time * (1 + 1e-12), base
    step_matches_reference(ex, pipe, mbs, program, where=f"{name}/{segments}/dip")


@pytest.mark.parametrize("subs", [None, {"vision": 1}])
def test_every_encoder_look_ahead_order_trains_exactly(subs):
    ex = _example("vlm")
    mbs = _batch(ex, 7, [3, 1, 2, 2])
    # spread: vision and backbone each one stage per rank, so the backbone runs 1F1B or ZB-H1
    pipe = dipc.compile(ex.model, mbs[0], num_stages=2, schedule="dip", loss_weight=ex.loss_weight,
                        segments="spread", sub_microbatches=subs, profile="h800")
    candidates = encoder_ahead_candidates(pipe, len(mbs), pipe.sub_counts(mbs))
    assert {"encoder-first, 1f1b backbone", "encoder-first, zb_h1 backbone"} <= set(candidates)
    assert len(candidates) >= 6
    for label, orders in candidates.items():
        program = pipe.plan(mbs, schedule="dip", compute_orders=orders)
        step_matches_reference(ex, pipe, mbs, program, where=f"vlm/{label}/subs={subs}")


def test_phase_one_search_is_a_candidate_and_its_orders_train_exactly():
    ex = _example("audio_llm")
    mbs = _batch(ex, 9, [3, 1, 2, 1])
    pipe = dipc.compile(ex.model, mbs[0], num_stages=2, schedule="dip", loss_weight=ex.loss_weight,
                        segments="spread", sub_microbatches={"audio": 1}, profile="h800")
    model = step_model(pipe, mbs, "h800")
    orders, found = searched_order(pipe, mbs, model, budget_s=60, max_evaluations=16)
    assert found.evaluations == 16 or found.exhausted
    assert list(found.history) == sorted(found.history, reverse=True) and found.score == found.history[-1]
    program = pipe.plan(mbs, schedule="dip", compute_orders=orders)
    assert model.simulate(program).step_time == pytest.approx(found.score, rel=1e-12)
    label, _, result = plan_dip(pipe, mbs, model, search_evaluations=16)
    assert result.step_time <= found.score * (1 + 1e-12), label
    step_matches_reference(ex, pipe, mbs, program, where="audio_llm/mcts")


def test_the_compiled_memory_limit_is_fitted():
    ex = _example("vlm")
    mbs = _batch(ex, 3, [3, 2, 3, 1])
    free = dipc.compile(ex.model, mbs[0], num_stages=2, schedule="dip", loss_weight=ex.loss_weight, profile="h800")
    model = step_model(free, mbs, "h800")
    peak = max(model.simulate(free.plan(mbs)).peak_memory)
    static = max(sum(model.static_bytes(s.id) for s in free.stages if s.rank == r) for r in range(2))
    limit = static + 0.6 * (peak - static)
    pipe = dipc.compile(ex.model, mbs[0], num_stages=2, schedule="dip", loss_weight=ex.loss_weight, profile="h800",
                        memory_limit=limit)
    program = pipe.plan(mbs)
    assert recompute_plan(program), "a limit below every plan's peak needs recomputation"
    assert max(model.simulate(program).peak_memory) <= limit * (1 + 1e-9)
    assert pipe.plan(mbs, memory_limit=None) is program, "None means the compiled limit"
    step_matches_reference(ex, pipe, mbs, program, where="vlm/dip/limit")
    # out of time from the start: the first fitted candidate wins (its refit descends only), valid
    # and within the limit
    hasty = dipc.compile(ex.model, mbs[0], num_stages=2, schedule="dip", loss_weight=ex.loss_weight, profile="h800",
                         memory_limit=limit, plan_budget_s=0.0)
    rushed = hasty.plan(mbs)
    validate(rushed)
    assert max(model.simulate(rushed).peak_memory) <= limit * (1 + 1e-9)


def test_unknown_schedule_names_dip_among_the_choices():
    ex = make_example("vlm")
    with pytest.raises(ScheduleError, match=r"unknown schedule 'dipp'.*dip"):
        dipc.compile(ex.model, ex.data.microbatches(1, 2)[0], schedule="dipp")


@pytest.mark.dist
@pytest.mark.timeout(300)
def test_demo_trains_with_dip_plans_on_two_gloo_ranks(capsys):
    """Rank 0 plans (on the CPU profile it measured) and broadcasts: no plan mismatch across ranks."""
    from dipc.demo import DemoConfig, run_demo

    losses = run_demo(DemoConfig(schedule="dip", steps=3, executor="gloo", async_plan=False, timeout_s=120))
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    assert "schedule dip" in capsys.readouterr().out


def test_a_dip_plan_is_dumped_once_not_once_per_candidate(monkeypatch, tmp_path):
    monkeypatch.setenv("DIPC_DUMP_DIR", str(tmp_path))
    ex = _example("vlm")
    mbs = _batch(ex, 4, [2, 1, 2])
    pipe = dipc.compile(ex.model, mbs[0], num_stages=2, schedule="dip", loss_weight=ex.loss_weight, profile="h800")
    program = pipe.plan(mbs)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step0"]
    assert pipe.history[-1][:2] == ("plan", program)
