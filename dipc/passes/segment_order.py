"""DIP phase 1: Monte-Carlo tree search over pipeline-segment priorities.

The planner's outer loop (paper §5.2) ranks the batch's *segments* — one modality module's work
on one microbatch, e.g. ``("vision", 3)`` — and hands the ranking to the dual-queue interleaver
(phase 2) as queue priorities. Every complete ranking is scored by the caller (phase 2 + SEMU:
the simulated step time, lower is better).

The tree: a node at depth ``d`` fixes the item at position ``d``; the path from the root is a
prefix of the ranking. Each node keeps its visit count and the best score among the complete
rankings found below it. One round:

1. **select** from the root the child maximising ``(t_best / s_v)**alpha + beta*sqrt(ln N_x / N_v)``
   while the node is fully expanded;
2. **expand** one untried child (chosen at random);
3. **roll out** ``rollouts`` random completions of the child's prefix and score each;
4. **back-propagate** the best of them (``s_v = min``) to the root.

Choices where the paper is silent (written down here and in the notes):

- score mapping: ``t_best / s_v`` (1 for the best ranking found so far, < 1 otherwise), so UCB's
  exploitation term rises as time falls and stays in ``(0, 1]`` whatever the time unit;
- ``alpha = 1``, ``beta = 0.3`` by default: with the score within a few percent across rankings
  (pipeline step times differ by ~1-20%), a larger beta degenerates into breadth-first search;
- tie groups: the caller passes *items*; one item stands for all segments of one modality of one
  microbatch (its sub-microbatches and its K_i segments) — the paper's pruning rule — and keeps
  their relative order fixed;
- seeds: the caller may pass heuristic rankings (in order, heaviest first, ...) that are scored
  before the search, so MCTS never returns anything worse than the heuristics it was given;
- every complete ranking is scored once (a cache: identical rankings recur in rollouts);
- parallelism: with ``workers > 0`` rollouts of a round are scored in a process pool (fork) and
  the tree statistics live in this process only, so they are updated under one writer instead of
  a shared mutex — equivalent for the search, simpler to get right;
- stop: at ``budget_s`` seconds, ``max_evaluations`` scorings, or when the whole tree is explored.
"""
from __future__ import annotations

import math
import multiprocessing
import random
import time
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field

from dipc.errors import ScheduleError

__all__ = ["SearchResult", "mcts_order", "priority_from_order"]

Item = Hashable
Score = Callable[[tuple[Item, ...]], float]


@dataclass(frozen=True)
class SearchResult:
    """The best ranking found, its score, how many distinct rankings were scored, and the
    best score after each scoring (for convergence plots)."""

    order: tuple[Item, ...]
    score: float
    evaluations: int
    seconds: float
    exhausted: bool
    history: tuple[float, ...] = ()


@dataclass
class _Node:
    prefix: tuple[Item, ...]
    untried: list[Item]
    children: dict[Item, "_Node"] = field(default_factory=dict)
    visits: int = 0
    best: float = math.inf
    complete: bool = False      # every ranking below it was scored


_POOL_SCORE: Score | None = None   # the scorer a forked worker inherits


def _pool_eval(order: tuple[Item, ...]) -> float:
    assert _POOL_SCORE is not None
    return _POOL_SCORE(order)


def _ucb(child: _Node, t_best: float, log_n: float, alpha: float, beta: float) -> float:
    exploit = (t_best / child.best) ** alpha if math.isfinite(child.best) and child.best > 0 else 0.0
    return exploit + beta * math.sqrt(log_n / max(child.visits, 1))


def mcts_order(items: Sequence[Item], score: Score, *, budget_s: float = 1.0, max_evaluations: int | None = None,
               rollouts: int = 10, alpha: float = 1.0, beta: float = 0.3, seeds: Sequence[Sequence[Item]] = (),
               seed: int = 0, workers: int = 0) -> SearchResult:
    """The ranking of ``items`` with the lowest ``score`` that MCTS finds within the budget."""
    items = tuple(items)
    if len(set(items)) != len(items):
        raise ScheduleError(f"segment items must be distinct, got {list(items)}. Fix: tie equal segments "
                            "into one item (e.g. (modality, microbatch)).")
    if not items:
        raise ScheduleError("no segments to order. Fix: pass at least one (modality, microbatch) item.")
    if rollouts < 1:
        raise ScheduleError(f"rollouts={rollouts}. Fix: pass rollouts >= 1.")
    rng = random.Random(seed)
    t0 = time.perf_counter()
    cache: dict[tuple[Item, ...], float] = {}
    history: list[float] = []
    best: list = [None, math.inf]
    pool = None
    if workers > 0:
        global _POOL_SCORE
        _POOL_SCORE = score
        pool = multiprocessing.get_context("fork").Pool(workers)

    def out_of_budget() -> bool:
        return (time.perf_counter() - t0 >= budget_s
                or (max_evaluations is not None and len(cache) >= max_evaluations))

    def evaluate(orders: list[tuple[Item, ...]]) -> list[float]:
        fresh = list(dict.fromkeys(o for o in orders if o not in cache))
        if max_evaluations is not None:
            fresh = fresh[: max(0, max_evaluations - len(cache))]
        values = pool.map(_pool_eval, fresh) if pool is not None and len(fresh) > 1 else [score(o) for o in fresh]
        for o, v in zip(fresh, values):
            cache[o] = v
            if v < best[1]:
                best[0], best[1] = o, v
            history.append(best[1])
        return [cache.get(o, math.inf) for o in orders]

    try:
        for s in seeds:
            s = tuple(s)
            if sorted(map(repr, s)) != sorted(map(repr, items)):
                raise ScheduleError(f"seed ranking {list(s)} is not a permutation of the items {list(items)}. "
                                    "Fix: pass rankings of exactly the searched items.")
        evaluate([tuple(s) for s in seeds])
        root = _Node(prefix=(), untried=list(items))
        rng.shuffle(root.untried)
        while not root.complete and not out_of_budget():
            path = [root]
            node = root
            while not node.untried and node.children:        # select
                live = [c for c in node.children.values() if not c.complete]
                if not live:
                    break
                t_best = best[1] if math.isfinite(best[1]) else 1.0
                log_n = math.log(max(node.visits, 1))
                node = max(live, key=lambda c: _ucb(c, t_best, log_n, alpha, beta))
                path.append(node)
            if node.untried:                                  # expand
                item = node.untried.pop()
                rest = [x for x in items if x not in node.prefix and x != item]
                rng.shuffle(rest)
                child = _Node(prefix=node.prefix + (item,), untried=rest)
                node.children[item] = child
                node = child
                path.append(node)
            remaining = [x for x in items if x not in node.prefix]
            if len(remaining) <= 1:
                orders = [node.prefix + tuple(remaining)]
                node.complete, node.untried = True, []
            else:
                orders = []
                for _ in range(rollouts):                     # roll out
                    tail = remaining[:]
                    rng.shuffle(tail)
                    orders.append(node.prefix + tuple(tail))
            value = min(evaluate(orders))
            for n in reversed(path):                           # back-propagate
                n.visits += 1
                n.best = min(n.best, value)
                if not n.untried and n.children and all(c.complete for c in n.children.values()):
                    n.complete = True
    finally:
        if pool is not None:
            pool.terminate()
    if best[0] is None:
        raise ScheduleError("the segment search scored no ranking (budget too small?). "
                        "Fix: raise budget_s / max_evaluations or pass seed rankings.")
    return SearchResult(order=best[0], score=best[1], evaluations=len(cache), seconds=time.perf_counter() - t0,
                        exhausted=root.complete, history=tuple(history))


def priority_from_order(order: Sequence[Item], item_of: Callable[[int, int], Item]):
    """A dual-queue priority ``(op, stage, mb) -> key`` from a segment ranking: earlier items first
    (the paper's priority ``n - position``); within an item, forwards by ascending stage and
    backwards by descending stage (the order data and gradients flow). ``item_of(stage, mb)``
    names the item a stage's work on a microbatch belongs to."""
    from dipc.ir.instructions import Op

    position = {x: i for i, x in enumerate(order)}

    def priority(op, stage: int, mb: int) -> tuple:
        return (position[item_of(stage, mb)], stage if op is Op.FWD else -stage, mb)
    return priority
