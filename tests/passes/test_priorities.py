"""Phase 2's queue priorities: the critical-path rule against its recursive definition."""
import gc
import random
import weakref
from functools import cache

import pytest

from dipc.ir import Op, StageInfo
from dipc.passes.priorities import critical_path_priority


def _random_dag(rng: random.Random, n: int) -> list[StageInfo]:
    """Stages 0..n-1, each fed by a few earlier ones (an encoder branch or two into a chain)."""
    stages = []
    for s in range(n):
        producers = tuple(sorted(rng.sample(range(s), k=rng.randint(1, min(2, s))))) if s else ()
        grads = tuple(p for p in producers if rng.random() < 0.7)
        stages.append(StageInfo(id=s, rank=s % 3, producers=producers, grad_producers=grads,
                                loads=("x",) if not producers else (), has_loss=s == n - 1))
    return stages


@pytest.mark.parametrize("seed", range(20))
def test_critical_path_matches_the_recursive_definition(seed):
    rng = random.Random(seed)
    stages = _random_dag(rng, rng.randint(1, 9))
    M = rng.randint(1, 5)
    f = {(s.id, m): rng.uniform(0.1, 2.0) for s in stages for m in range(M)}
    b = {(s.id, m): rng.uniform(0.1, 4.0) for s in stages for m in range(M)}
    consumers = {s.id: [c.id for c in stages if s.id in c.producers] for s in stages}

    @cache
    def up_bwd(s, m):
        return b[s, m] + max((up_bwd(p, m) for p in stages[s].grad_producers), default=0.0)

    @cache
    def up_fwd(s, m):
        later = [up_fwd(c, m) for c in consumers[s]]
        return f[s, m] + (max(later) if later else up_bwd(s, m))

    prio = critical_path_priority(stages, M, lambda s, m: f[s, m], lambda s, m: b[s, m])
    for s in stages:
        for m in range(M):
            assert prio(Op.FWD, s.id, m) == pytest.approx((-up_fwd(s.id, m), m))
            assert prio(Op.BWD, s.id, m) == pytest.approx((-up_bwd(s.id, m), m))
            assert prio(Op.BWD_I, s.id, m) == prio(Op.BWD, s.id, m)


class _Costs:
    def fwd(self, s: int, m: int) -> float:
        return 1.0 + s

    def bwd(self, s: int, m: int) -> float:
        return 2.0 + m


def test_critical_path_keeps_no_reference_cycle_to_the_cost_model():
    """The planner's cost model must be freed by reference counting once the plan is made (the
    planner leaves cycles to the next full collection, see gc_paused)."""
    stages = _random_dag(random.Random(0), 6)
    was = gc.isenabled()
    gc.disable()
    try:
        costs = _Costs()
        alive = weakref.ref(costs)
        prio = critical_path_priority(stages, 3, costs.fwd, costs.bwd)
        del costs
        assert alive() is None
        assert prio(Op.FWD, 0, 0)[0] < 0
    finally:
        if was:
            gc.enable()
