"""Phase 3 by branch and bound (dipc.semu.candidate_select): the same winner as fitting every
candidate, with fewer fits, on random candidates whose fitted time is at least their plain time."""
import random
from types import SimpleNamespace

import pytest

from dipc.errors import InfeasibleMemoryError
from dipc.semu.candidate_select import pick_fastest


def _candidates(seed: int, n: int):
    rng = random.Random(seed)
    out = []
    for i in range(n):
        plain = rng.uniform(1, 2)
        peak = rng.uniform(50, 150)
        fitted = None if rng.random() < 0.1 else plain * rng.uniform(1.0, 1.4)
        out.append((f"c{i}", plain, peak, fitted))
    return out


def _run(cands, capacity=100.0, max_fits=None, deadline=None):
    calls = []

    def build(c):
        return lambda: (c, None)

    def simulate(c, _):
        return SimpleNamespace(step_time=c[1], peak_memory=[c[2]])

    def fit(c, _):
        calls.append(c[0])
        if c[3] is None:
            raise InfeasibleMemoryError("no fit", {0: c[2] - capacity})
        return c, SimpleNamespace(step_time=c[3], peak_memory=[capacity])

    choice = pick_fastest([(c[0], build(c)) for c in cands], simulate, capacity, fit, 1, max_fits=max_fits,
                          deadline=deadline)
    return choice, calls


@pytest.mark.parametrize("seed", range(30))
def test_branch_and_bound_matches_fitting_everything(seed):
    cands = _candidates(seed, 8)
    exact = {c[0]: (c[1] if c[2] <= 100 else c[3]) for c in cands}
    feasible = {k: v for k, v in exact.items() if v is not None}
    choice, calls = _run(cands)
    assert choice.result.step_time == min(feasible.values())
    assert len(calls) == choice.fitted <= sum(c[2] > 100 for c in cands)


def test_max_fits_caps_phase3_runs():
    cands = [(f"c{i}", 1.0 + i / 10, 200.0, 2.0 + i / 10) for i in range(5)]   # all over memory
    choice, calls = _run(cands, max_fits=2)
    assert calls == ["c0", "c1"] and choice.label == "c0"


@pytest.mark.parametrize("seed", range(30))
def test_a_search_out_of_time_keeps_the_best_fitted_so_far(seed):
    """Past its deadline the search starts no further phase-3 run: one fit at most (the first one
    always runs when nothing fits as it is), and the winner is the fastest exact time it saw."""
    cands = _candidates(seed, 8)
    full, _ = _run(cands)
    choice, calls = _run(cands, deadline=0.0)
    fits_as_is = [c[1] for c in cands if c[2] <= 100]
    assert len(calls) <= (1 if not fits_as_is else 0) + sum(c[3] is None for c in cands)
    assert choice.result.step_time >= full.result.step_time
    if fits_as_is and min(fits_as_is) <= min(c[1] for c in cands if c[2] > 100):
        assert choice.result.step_time == full.result.step_time   # nothing needed fitting to find it


def test_nothing_fits_raises_the_closest():
    cands = [("a", 1.0, 300.0, None), ("b", 1.2, 120.0, None)]
    with pytest.raises(InfeasibleMemoryError) as e:
        _run(cands)
    assert e.value.excess == pytest.approx(20.0)


@pytest.mark.parametrize("seed", range(30))
def test_cheap_bounds_keep_the_winner_and_skip_simulations(seed):
    cands = _candidates(seed, 8)
    rng = random.Random(seed + 1)
    plain, _ = _run(cands)
    built = []

    def build(c):
        def run():
            built.append(c[0])
            return c, None
        return run

    def simulate(c, _):
        return SimpleNamespace(step_time=c[1], peak_memory=[c[2]])

    def fit(c, _):
        if c[3] is None:
            raise InfeasibleMemoryError("no fit", {0: c[2] - 100.0})
        return c, SimpleNamespace(step_time=c[3], peak_memory=[100.0])

    bounded = [(c[0], build(c), lambda c=c, f=rng.uniform(0.9, 1.0): c[1] * f) for c in cands]
    choice = pick_fastest(bounded, simulate, 100.0, fit, 1)
    assert choice.result.step_time == plain.result.step_time
    assert choice.simulated == len(built) <= len(cands)
    assert all(choice.bounds[c[0]] <= (c[1] if c[2] <= 100 or c[3] is None else c[3]) for c in cands)


def test_a_group_of_added_candidates_keeps_its_own_phase3_budget():
    old = [(f"c{i}", 1.0 + i / 10, 200.0, 2.0 + i / 10) for i in range(3)]          # all over memory
    new = [(f"z{i}", 0.5 + i / 10, 200.0, 2.5) for i in range(3)]                   # cheaper bounds, slower fits
    calls = []

    def build(c):
        return lambda: (c, None)

    def fit(c, _):
        calls.append(c[0])
        return c, SimpleNamespace(step_time=c[3], peak_memory=[100.0])

    choice = pick_fastest([(c[0], build(c)) for c in old + new],
                          lambda c, _: SimpleNamespace(step_time=c[1], peak_memory=[c[2]]), 100.0, fit, 1,
                          max_fits={"": 2, "z": 1}, groups={c[0]: "z" for c in new})
    assert choice.label == "c0" and sorted(calls) == ["c0", "c1", "z0"]


@pytest.mark.parametrize("seed", range(20))
def test_an_incumbent_prunes_what_cannot_beat_it(seed):
    """With a step time to beat, the winner is the same as without it when it beats it, None
    otherwise, and no candidate whose bound is not below the incumbent is ever built."""
    cands = _candidates(seed, 8)
    plain, _ = _run(cands)
    rng = random.Random(seed + 100)
    incumbent = plain.result.step_time * rng.uniform(0.9, 1.1)
    built = []

    def simulate(c, _):
        built.append(c[0])
        return SimpleNamespace(step_time=c[1], peak_memory=[c[2]])

    def fit(c, _):
        if c[3] is None:
            raise InfeasibleMemoryError("no fit", {0: c[2] - 100.0})
        return c, SimpleNamespace(step_time=c[3], peak_memory=[100.0])

    choice = pick_fastest([(c[0], lambda c=c: (c, None), lambda c=c: c[1]) for c in cands], simulate, 100.0,
                          fit, 1, incumbent=incumbent)
    if plain.result.step_time < incumbent:
        assert choice is not None and choice.result.step_time == plain.result.step_time
    else:
        assert choice is None
    assert all(c[1] < incumbent for c in cands if c[0] in built)


def test_a_failed_candidate_that_keeps_its_error_is_freed_without_the_cycle_collector():
    """A planner may memoise the error a candidate's order raised and raise it again from the
    candidate's bound; the error's traceback then points at frames that refer back to the
    candidate. pick_fastest drops the traceback, so the candidate's data goes with the plan."""
    import gc
    import weakref

    from dipc.errors import ScheduleError

    class Orders:   # stands for a candidate's orders and cost model
        pass

    was = gc.isenabled()
    gc.disable()
    try:
        data = Orders()
        alive = weakref.ref(data)
        memo = [ScheduleError("wait cycle")]

        def bound(data=data):
            raise memo[0]

        def failing_build(data=data):
            raise memo[0]

        ok = lambda: ("p", None)   # noqa: E731
        sim = lambda program, model: SimpleNamespace(step_time=1.0, peak_memory=[1.0])   # noqa: E731
        choice = pick_fastest([("bad bound", lambda: ("q", None), bound), ("bad build", failing_build),
                               ("good", ok)], sim, 10.0, lambda p, m: (p, sim(p, m)), 1)
        assert choice.label == "good" and set(choice.failures) == {"bad bound", "bad build"}
        del bound, failing_build, data, choice
        assert memo[0].__traceback__ is None
        assert alive() is None
    finally:
        if was:
            gc.enable()
