"""DIP phase 3: the per-rank recompute ILP keeps the emulator's peak within the limit, finds the
cheapest per-stage choice (checked against brute force on random costs), and says by how much a
request that cannot fit is over."""
import itertools
import math
import random
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dipc.errors import InfeasibleMemoryError
from dipc.ir import Op, Program, StageInfo
from dipc.ir.recompute import layers_of, recompute_plan, with_recompute
from dipc.passes.codegen import build_program
from dipc.semu.emulator import simulate
from dipc.semu.memory_opt import optimize_memory, stage_candidates
from dipc.semu.profiles import load_preset
from dipc.semu.recompute_costs import Footprint, recompute_memory_model

MiB = 2.0**20
CLUSTER = load_preset("h800")


@dataclass
class RandomCosts:
    """Per-(stage, mb, layer) footprints and per-stage static bytes drawn from a seed."""

    stage_layers: list[list[str]]
    static: list[float]
    table: dict[tuple[int, int, str], Footprint]

    def static_bytes(self, stage: int) -> float:
        return self.static[stage]

    def layer_footprint(self, stage: int, mb: int, path: str, sub: int = -1) -> Footprint:
        return self.table[(stage, mb, path)]

    def simulate(self, program: Program):
        plan = recompute_plan(program)
        return simulate(program, CLUSTER, lambda ins: 1e-3 if ins.op in (Op.FWD, Op.BWD, Op.BWD_I, Op.BWD_W) else 0,
                        memory=recompute_memory_model(self, program, plan))


def random_costs(seed: int, num_stages: int, layers: int, num_microbatches: int) -> RandomCosts:
    rng = random.Random(seed)
    stage_layers = [[f"s{s}.l{i}" for i in range(layers)] for s in range(num_stages)]
    table = {}
    for s, paths in enumerate(stage_layers):
        for p in paths:
            act = rng.uniform(1, 100) * MiB
            inp = act * rng.uniform(0.05, 1.2)        # some layers save nothing when recomputed
            secs = rng.uniform(1e-4, 1e-2)
            for m in range(num_microbatches):
                scale = rng.uniform(0.5, 2.0)           # microbatches differ in length
                table[(s, m, p)] = Footprint(act * scale, inp * scale, secs * scale)
    return RandomCosts(stage_layers, [rng.uniform(0, 500) * MiB for _ in range(num_stages)], table)


def chain(num_ranks: int, chunks: int, num_microbatches: int, schedule: str) -> Program:
    S = num_ranks * chunks
    stages = [StageInfo(id=s, rank=s % num_ranks, producers=(s - 1,) if s else (),
                        grad_producers=(s - 1,) if s else (), loads=("x",) if s == 0 else (), has_loss=s == S - 1)
              for s in range(S)]
    return build_program(stages, num_ranks, num_microbatches, schedule)


def added_seconds(costs: RandomCosts, program: Program, rank: int, plan: dict) -> float:
    """Re-run seconds a plan adds on ``rank``, counted independently of the planner: one re-run
    per BWD / BWD_W, and per BWD_I of a stage that receives input gradients."""
    total = 0.0
    for ins in program.streams[rank]:
        reruns = ins.op in (Op.BWD, Op.BWD_W) or (ins.op is Op.BWD_I and ins.stage > 0)
        if reruns:
            total += sum(costs.table[(ins.stage, ins.mb, p)].fwd_seconds for p in layers_of(plan, ins.stage, ins.mb))
    return total


SCHEDULES = [("1f1b", 1), ("zb_h1", 1), ("gpipe", 1), ("interleaved_1f1b", 2)]


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 10**6), ranks=st.integers(2, 3), sched=st.sampled_from(SCHEDULES),
       layers=st.integers(1, 3), mbs=st.integers(2, 5), tight=st.floats(-0.2, 1.1))
def test_ilp_fits_the_limit_at_the_brute_force_optimum(seed, ranks, sched, layers, mbs, tight):
    schedule, chunks = sched
    program = chain(ranks, chunks, mbs, schedule)
    costs = random_costs(seed, ranks * chunks, layers, mbs)
    cands = {s: stage_candidates(costs, s, mbs) for s in range(ranks * chunks)}
    base = costs.simulate(program).peak_memory
    frugal = costs.simulate(with_recompute(program, {s: c[-1] for s, c in cands.items()})).peak_memory
    limits = [f + tight * (b - f) + 1.0 for b, f in zip(base, frugal)]   # between the two ends (or below)
    # brute force per rank over every combination of candidates (ranks do not share memory)
    best: list[float] = []
    for r in range(ranks):
        own = list(program.stages_of_rank(r))
        feasible = []
        for combo in itertools.product(*(cands[s] for s in own)):
            plan = dict(zip(own, combo))
            # optimize_memory's own acceptance: within 1e-9 of the limit plus a byte (a plan
            # over by a fraction of a byte fits; hypothesis found tight = -1.2e-7 at that edge)
            if costs.simulate(with_recompute(program, plan)).peak_memory[r] <= limits[r] * (1 + 1e-9) + 1.0:
                feasible.append(added_seconds(costs, program, r, plan))
        best.append(min(feasible, default=math.inf))
    if any(math.isinf(b) for b in best):
        with pytest.raises(InfeasibleMemoryError, match=r"over its .* limit.*Fix:"):
            optimize_memory(program, costs, limits, per_microbatch=False)
        return
    result = optimize_memory(program, costs, limits, per_microbatch=False)
    assert all(p <= l * (1 + 1e-9) + 1 for p, l in zip(result.peak_memory, limits))
    for r in range(ranks):
        got = added_seconds(costs, program, r, result.recompute)
        assert got == pytest.approx(best[r], rel=1e-6, abs=1e-12), f"rank {r}: not the cheapest feasible choice"
        assert result.added_seconds[r] == pytest.approx(got, rel=1e-9, abs=1e-12)
    if tight >= 1.0:
        assert result.recompute == {}, "no recomputation when everything fits"


def test_candidates_go_from_fastest_to_most_frugal_best_ratio_first():
    fp = {"a": Footprint(10 * MiB, 1 * MiB, 1.0),    # 9 MiB/s
          "b": Footprint(10 * MiB, 2 * MiB, 0.1),    # 80 MiB/s: first
          "c": Footprint(1 * MiB, 2 * MiB, 0.1)}     # saves nothing: never
    costs = RandomCosts([["a", "b", "c"]], [0.0], {(0, 0, p): f for p, f in fp.items()})
    assert stage_candidates(costs, 0, 1) == [(), ("b",), ("a", "b")]


def test_infeasible_request_says_by_how_much_per_rank():
    program = chain(2, 1, 4, "1f1b")
    costs = random_costs(3, 2, 2, 4)
    costs.static = [2 * 2.0**30, 1 * MiB]
    with pytest.raises(InfeasibleMemoryError) as err:
        optimize_memory(program, costs, 1.5 * 2.0**30)
    msg = str(err.value)
    assert "rank 0: needs 2." in msg and "GiB parameters/gradients/optimizer" in msg
    assert "rank 1" not in msg.split("Fix:")[0], "only ranks over the limit are named"
    assert "more pipeline ranks" in msg and "smaller microbatches" in msg and "raise memory_limit by at least" in msg
    assert set(err.value.excess_bytes) == {0} and err.value.excess_bytes[0] > 0.5 * 2.0**30


def test_plan_naming_a_foreign_layer_is_refused_by_semu():
    from dipc.errors import ScheduleError

    program = chain(2, 1, 2, "1f1b")
    costs = random_costs(0, 2, 2, 2)
    with pytest.raises(ScheduleError, match=r"recomputes \['s1.l0'\] in stage 0.*Fix:"):
        costs.simulate(with_recompute(program, {0: ["s1.l0"]}))


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 40), st.integers(1, 6), st.integers(0, 10_000))
def test_dropping_dominated_rows_keeps_the_feasible_set(num_rows, num_cols, seed):
    """Phase 3's per-rank rows lose those another row dominates; for every 0/1 choice, the rows
    left accept exactly what all rows accept (negative workspace deltas included)."""
    import numpy as np

    from dipc.semu.memory_opt import _undominated

    rng = np.random.default_rng(seed)
    rows = rng.integers(-3, 6, size=(num_rows, num_cols + 1)).astype(float)   # coefficients, then offset
    rows = np.vstack([rows, rows[: num_rows // 2] - rng.integers(0, 2, size=(num_rows // 2, num_cols + 1))])
    kept = _undominated(rows)
    assert len(kept) <= len(rows)
    limit = float(rng.integers(0, 10))
    for x in itertools.product((0.0, 1.0), repeat=num_cols):
        xs = np.array([*x, 1.0])
        assert (rows @ xs <= limit).all() == (kept @ xs <= limit).all()
