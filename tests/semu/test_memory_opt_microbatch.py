"""Per-microbatch recomputation in SEMU and phase 3: stash, workspace and re-run seconds follow
each microbatch's own choice; the ILP over (stage, microbatch) reaches the brute-force optimum and
recomputes only the microbatch that needs it."""
import itertools
import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dipc.errors import InfeasibleMemoryError
from dipc.ir import Op
from dipc.ir.recompute import recompute_plan, with_recompute
from dipc.semu.memory_opt import OutOfTimeError, optimize_memory, refine_per_microbatch, stage_candidates
from dipc.semu.recompute_costs import Footprint, recompute_compute_time, recompute_memory_model
from tests.semu.test_memory_opt import MiB, RandomCosts, added_seconds, chain, random_costs


def test_stash_workspace_and_seconds_follow_each_microbatch():
    program = chain(2, 1, 3, "1f1b")
    costs = random_costs(5, 2, 2, 3)
    plan = {(1, 2): ("s1.l0",), 0: ("s0.l1",)}
    memory = recompute_memory_model(costs, program, plan)
    time = recompute_compute_time(lambda ins: 0.0, costs, program, plan)
    for rank in (0, 1):
        for ins in program.streams[rank]:
            if ins.stage < 0 or ins.op not in (Op.FWD, Op.BWD):
                continue
            mine = {"s0.l1"} if ins.stage == 0 else ({"s1.l0"} if ins.mb == 2 else set())
            fps = {p: costs.table[(ins.stage, ins.mb, p)] for p in costs.stage_layers[ins.stage]}
            if ins.op is Op.FWD:
                want = sum(f.in_bytes if p in mine else f.act_bytes for p, f in fps.items())
                assert memory.activations(ins) == pytest.approx(want)
            if ins.op is Op.BWD:
                assert time(ins) == pytest.approx(sum(fps[p].fwd_seconds for p in mine))
                want = max((max(fps[p].saved_bytes, 0.0) for p in mine), default=0.0)
                assert memory.workspace(ins) == pytest.approx(want)
    # the peak: recomputing the long microbatch alone lowers it
    costs = _one_long_microbatch(3, 2)
    layers = costs.stage_layers[0]   # rank 0: two microbatches in flight under 1F1B
    whole = costs.simulate(with_recompute(program, {0: layers})).peak_memory[0]
    some = costs.simulate(with_recompute(program, {(0, 2): layers})).peak_memory[0]
    none = costs.simulate(program).peak_memory[0]
    assert whole <= some < none   # (here the long one's own backward workspace sets both peaks)


def _one_long_microbatch(num_microbatches: int, long_mb: int) -> RandomCosts:
    """Two ranks, two layers per stage; every microbatch stashes 20 MiB per stage, ``long_mb`` 200 MiB."""
    stage_layers = [[f"s{s}.l{i}" for i in range(2)] for s in range(2)]
    table = {}
    for s, paths in enumerate(stage_layers):
        for p in paths:
            for m in range(num_microbatches):
                k = 10.0 if m == long_mb else 1.0
                table[(s, m, p)] = Footprint(10 * MiB * k, 1 * MiB * k, 1e-3 * k)
    return RandomCosts(stage_layers, [0.0, 0.0], table)


def test_only_the_long_microbatch_recomputes():
    M, long_mb = 6, 3
    program = chain(2, 1, M, "1f1b")
    costs = _one_long_microbatch(M, long_mb)
    plain = costs.simulate(program).peak_memory
    only_long = costs.simulate(with_recompute(program, {(s, long_mb): costs.stage_layers[s] for s in (0, 1)}))
    assert max(only_long.peak_memory) < min(plain), "precondition: recomputing the long one alone helps"
    limit = max(only_long.peak_memory) + 1.0
    result = optimize_memory(program, costs, limit)
    assert result.recompute and all(isinstance(k, tuple) and k[1] == long_mb for k in result.recompute), \
        result.recompute
    assert max(result.peak_memory) <= limit
    # one choice per stage must recompute for every microbatch: slower for the same limit
    per_stage = optimize_memory(program, costs, limit, per_microbatch=False)
    assert all(isinstance(k, int) for k in per_stage.recompute)
    assert sum(per_stage.added_seconds) > 1.5 * sum(result.added_seconds)
    # too many columns for the per-microbatch ILP: the per-stage fallback
    assert optimize_memory(program, costs, limit, max_columns=4).recompute == per_stage.recompute


def test_refining_a_per_stage_winner_keeps_the_faster_plan():
    """Planners fit candidates per stage and refit the winner per microbatch: the refit must win
    where only one microbatch needs it, and a winner that recomputes nothing comes back as it is."""
    M, long_mb = 6, 3
    program = chain(2, 1, M, "1f1b")
    costs = _one_long_microbatch(M, long_mb)
    only_long = costs.simulate(with_recompute(program, {(s, long_mb): costs.stage_layers[s] for s in (0, 1)}))
    limit = max(only_long.peak_memory) + 1.0
    per_stage = optimize_memory(program, costs, limit, per_microbatch=False)
    fine, result = refine_per_microbatch(per_stage.program, per_stage.result, costs, limit)
    assert result.step_time <= per_stage.result.step_time
    assert recompute_plan(fine) and all(isinstance(k, tuple) and k[1] == long_mb for k in recompute_plan(fine))
    def total(prog):
        return sum(added_seconds(costs, prog, r, recompute_plan(prog)) for r in range(prog.num_ranks))
    assert total(fine) < total(per_stage.program)
    assert max(result.peak_memory) <= limit
    plain = costs.simulate(program)
    assert refine_per_microbatch(program, plain, costs, limit) == (program, plain)
    # a spent planning budget still descends from the per-stage plan (no ILP): dropping the short
    # microbatches' recomputation one by one reaches the optimum here; an ample one refits as before
    spent = refine_per_microbatch(per_stage.program, per_stage.result, costs, limit, time_budget=0.001)
    assert spent[0] is not per_stage.program and max(spent[1].peak_memory) <= limit
    assert spent[1].step_time == pytest.approx(result.step_time)
    ample = refine_per_microbatch(per_stage.program, per_stage.result, costs, limit, time_budget=5.0)
    assert ample[1].step_time == result.step_time
    # a fit out of time with nothing to descend from says so, rather than calling the limit infeasible
    with pytest.raises(OutOfTimeError, match="no time left"):
        optimize_memory(program, costs, limit, deadline=0.0)
    late = optimize_memory(program, costs, limit, warm=recompute_plan(per_stage.program), deadline=0.0)
    assert max(late.peak_memory) <= limit and late.result.step_time == pytest.approx(result.step_time)


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 10**6), sched=st.sampled_from([("1f1b", 1), ("zb_h1", 1), ("interleaved_1f1b", 2)]),
       mbs=st.integers(2, 3), tight=st.floats(-0.2, 1.1))
def test_per_microbatch_ilp_reaches_the_brute_force_optimum(seed, sched, mbs, tight):
    schedule, chunks = sched
    ranks = 2
    program = chain(ranks, chunks, mbs, schedule)
    costs = random_costs(seed, ranks * chunks, 1, mbs)
    cands = {s: stage_candidates(costs, s, mbs) for s in range(ranks * chunks)}
    base = costs.simulate(program).peak_memory
    frugal = costs.simulate(with_recompute(program, {s: c[-1] for s, c in cands.items()})).peak_memory
    limits = [f + tight * (b - f) + 1.0 for b, f in zip(base, frugal)]
    best: list[float] = []
    per_stage_best: list[float] = []
    for r in range(ranks):
        units = [(s, m) for s in program.stages_of_rank(r) for m in range(mbs)]
        feasible, uniform = [], []
        for combo in itertools.product(*(cands[s] for s, _ in units)):
            plan = {u: c for u, c in zip(units, combo) if c}
            if costs.simulate(with_recompute(program, plan)).peak_memory[r] <= limits[r]:
                feasible.append(added_seconds(costs, program, r, plan))
                if all(len({c for (s2, _), c in zip(units, combo) if s2 == s}) == 1 for s, _ in units):
                    uniform.append(feasible[-1])
        best.append(min(feasible, default=math.inf))
        per_stage_best.append(min(uniform, default=math.inf))
    if any(math.isinf(b) for b in best):
        with pytest.raises(InfeasibleMemoryError):
            optimize_memory(program, costs, limits)
        return
    result = optimize_memory(program, costs, limits)
    assert all(p <= l * (1 + 1e-9) + 1 for p, l in zip(result.peak_memory, limits))
    for r in range(ranks):
        got = added_seconds(costs, program, r, result.recompute)
        assert got == pytest.approx(best[r], rel=1e-6, abs=1e-12), f"rank {r}: not the cheapest feasible choice"
        assert got <= per_stage_best[r] * (1 + 1e-9) + 1e-12
        assert result.added_seconds[r] == pytest.approx(got, rel=1e-9, abs=1e-12)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 10**6), sched=st.sampled_from([("1f1b", 1), ("zb_h1", 1), ("interleaved_1f1b", 2)]),
       mbs=st.integers(2, 4), tight=st.floats(0.0, 1.0))
def test_descent_from_the_per_stage_plan_fits_and_never_costs_more(seed, sched, mbs, tight):
    """The refit's descent (no ILP): within every rank's limit, no slower than the per-stage plan it
    starts from, and no faster than the per-microbatch ILP's optimum."""
    schedule, chunks = sched
    program = chain(2, chunks, mbs, schedule)
    costs = random_costs(seed, 2 * chunks, 1, mbs)
    cands = {s: stage_candidates(costs, s, mbs) for s in range(2 * chunks)}
    base = costs.simulate(program).peak_memory
    frugal = costs.simulate(with_recompute(program, {s: c[-1] for s, c in cands.items()})).peak_memory
    limits = [f + tight * (b - f) + 1.0 for b, f in zip(base, frugal)]
    try:
        per_stage = optimize_memory(program, costs, limits, per_microbatch=False)
    except InfeasibleMemoryError:
        return
    try:
        descended = optimize_memory(program, costs, limits, warm=recompute_plan(per_stage.program), ilp=False)
    except InfeasibleMemoryError:   # the emulator tightened a budget below the warm plan: no descent
        return
    optimum = optimize_memory(program, costs, limits)
    assert all(p <= l * (1 + 1e-9) + 1 for p, l in zip(descended.peak_memory, limits))
    for r in range(2):
        assert descended.added_seconds[r] <= per_stage.added_seconds[r] * (1 + 1e-9) + 1e-12
        assert descended.added_seconds[r] >= optimum.added_seconds[r] * (1 - 1e-9) - 1e-12
