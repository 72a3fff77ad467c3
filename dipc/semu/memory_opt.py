"""DIP phase 3: fit each rank's memory by recomputing layers, at the least added time (an ILP per rank).

Candidates (paper: up to S per stage pair, from the fastest to the most frugal, the ones between
found by a multiple-choice knapsack). Here a stage's candidates are prefixes of one ranking of
moves, by bytes freed per re-run second (summed over the batch's microbatches), best first: a
layer goes from no checkpointing to *selective* checkpointing (``<layer>~sel``: its matmul and
attention outputs kept, its cheap ops re-run; beyond the paper, whose strategies are whole-layer)
and then to full recomputation (its stream input kept), or straight to full where it has no
selective choice. Selective usually frees a third to a half of a transformer block's stash for a
few percent of its forward, so it ranks first. Candidate ``k`` applies the first ``k`` moves;
``k = 0`` is the fastest (nothing recomputed) and ``k = all`` the most frugal (every layer that
frees memory fully recomputed). With more than ``max_candidates`` prefixes, evenly spaced ones
are kept (both ends always). Layers that free nothing are never recomputed.

The ILP (paper §5.4, one per rank, since phase 2 fixed every rank's order). Variables
``o[s, m, j] ∈ {0, 1}``: microbatch ``m`` of stage ``s`` of the rank uses candidate ``j``;
``Σ_j o[s, m, j] = 1`` (sub-microbatches share their microbatch's choice, as in the runtime,
which switches checkpointing per FWD: :mod:`dipc.runtime.recompute`). This is finer than the
paper's per stage-pair choice where it matters for long-tailed batches: only the microbatches
alive at a rank's peak (typically the long ones) recompute. Objective: the rank's added seconds,
each microbatch's re-run counted once per backward instruction that re-runs it (twice under the
zero-bubble split, see :mod:`dipc.semu.recompute_costs`). Memory: where the paper checks the
Iverson sum of overlapping stage pairs at every start time, the time-free equivalent is exact
here: a rank's memory only changes at its own instructions, so walking its stream in order gives
the live stashes after every FWD and during every backward (plus that backward's recompute
workspace) — the same accounting as the emulator's :class:`MemoryModel`, whose peaks do not
depend on timings. Every such point gives one row ``static + Σ o·stash (+ workspace) ≤ M`` over
the (stage, microbatch) pairs live there, plus the cost model's own workspace of the instruction
(``workspace_bytes``: loss head, gradients of a backward) as a constant; for a backward, each
candidate's workspace comes from the cost model's layer walk (``workspace_choices``, where a re-run
layer's rebuilt activations meet only what is live at that layer), so the emulator's check
agrees with the ILP and the per-microbatch choice does not chase the peak round after round. The
gradients a zero-bubble BWD_I keeps for its BWD_W (``wgrad_seed_bytes``) are held from one to the
other by the candidate that recomputes nothing only: a unit that recomputes takes the runtime's
plain split, which keeps none, so recomputing one layer of a unit also frees its seeds.

Keeping it small: the (stage, microbatch) pairs that hold no stash at any point the all-fastest
choice breaks are first fixed to "nothing recomputed" (recomputing them could only help a row
that the all-fastest choice already satisfies, by making room for another pair's workspace);
only if that reduced ILP is infeasible are all pairs freed. A rank whose ILP would still exceed
``max_columns`` variables falls back to one choice per stage (``per_microbatch=False``, the
earlier formulation: one variable per stage and candidate). Solved with ``scipy.optimize.milp``
(HiGHS), exactly by default; ``mip_rel_gap=0.05`` gives the paper's 5% gap. The paper's greedy
warm start is not available through scipy.

Then the plan is simulated; a rank the emulator still finds over the limit (it would need a
memory model the ILP does not mirror) has its budget lowered by the excess and is solved again,
up to ``max_rounds``. If even the most frugal candidates do not fit, or the ILP is infeasible,
:class:`~dipc.errors.InfeasibleMemoryError` says by how much per rank and what to change.

Planners fit their candidates per stage (``per_microbatch=False``) and refit only the winner per
microbatch (:func:`refine_per_microbatch`), which keeps the search's phase-3 cost where it was.

Not done: offloading (the paper's other strategy), candidates ranked per microbatch (the prefix
ranking is per stage, over the whole batch), re-running phase 2
with the chosen latencies (the paper leaves this open too: the score is the simulated step of the
final plan, as here).
"""
from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from dipc.errors import DipcError, InfeasibleMemoryError
from dipc.ir import Instruction, Op, Program
from dipc.ir.recompute import RecomputePlan, recompute_plan, with_recompute
from dipc.ir.recompute import selective as selective_entry
from dipc.semu.emulator import SimResult
from dipc.semu.recompute_costs import FULL, SELECTIVE, RecomputeCosts, layer_mode, recomputes_in

# Op.X is a slow class-attribute lookup on Python 3.11 enums, and these loops run per instruction
_BWD, _BWD_I, _BWD_W, _FWD = Op.BWD, Op.BWD_I, Op.BWD_W, Op.FWD
_COMPUTE = frozenset((_FWD, _BWD, _BWD_I, _BWD_W))

__all__ = ["MemoryLimitError", "MemoryPlan", "Phase3Tables", "PlannableCosts", "optimize_memory", "refine_per_microbatch",
           "stage_candidates"]

_GIB = float(2**30)
_SCALE = float(2**20)   # the ILP works in MiB, so row coefficients stay near 1


class MemoryLimitError(DipcError, ValueError):
    """A memory limit or phase-3 option that makes no sense (not the same as one nothing fits)."""


class PlannableCosts(RecomputeCosts, Protocol):
    """A cost model phase 3 can plan with: recompute accounting plus a simulator."""

    def simulate(self, program: Program) -> SimResult: ...


@dataclass(frozen=True, slots=True, kw_only=True)
class MemoryPlan:
    """Phase 3's result: the program with its ``recompute`` attribute set, the choice, the
    simulated peak per rank, the limit per rank, the added re-run seconds per rank and how many
    ILP rounds the emulator check took."""

    program: Program
    recompute: RecomputePlan
    result: SimResult
    peak_memory: tuple[float, ...]
    limit: tuple[float, ...]
    added_seconds: tuple[float, ...]
    rounds: int


def _gib(x: float) -> str:
    """Bytes in GiB, or MiB below 1 GiB (small test models would all print 0.00 GiB)."""
    return f"{x / _GIB:.2f} GiB" if abs(x) >= _GIB else f"{x / 2**20:.2f} MiB"


def stage_candidates(costs: RecomputeCosts, stage: int, num_microbatches: int,
                     max_candidates: int = 10, selective: bool = True) -> list[tuple[str, ...]]:
    """Recompute candidates of ``stage``, fastest (``()``) first, most frugal last (see module doc).

    A candidate applies a prefix of one ranking of *moves*, by bytes freed per re-run second
    (summed over the batch's microbatches), best first: a layer with a selective choice has two,
    none -> selective (``<layer>~sel``) then selective -> full, the second always after the first
    (when full frees more per second than selective's increment, the layer has one move, to full);
    other layers have one, none -> full. Layers that free nothing are never recomputed.
    ``selective=False``: whole-layer choices only (the paper's strategies)."""
    if max_candidates < 2:
        raise MemoryLimitError(f"max_candidates={max_candidates}. Fix: keep at least 2 (none and all).")
    layers = costs.stage_layers[stage]
    full_saved = {p: 0.0 for p in layers}
    full_secs = {p: 0.0 for p in layers}
    sel_saved = {p: 0.0 for p in layers}
    sel_secs = {p: 0.0 for p in layers}
    sel_ok = {p: True for p in layers}
    for m in range(num_microbatches):
        for p in layers:
            f = costs.layer_footprint(stage, m, p)
            full_saved[p] += f.saved_bytes
            full_secs[p] += f.fwd_seconds
            sel_ok[p] = sel_ok[p] and selective and f.has_selective
            sel_saved[p] += f.act_bytes - f.sel_bytes
            sel_secs[p] += f.sel_seconds + f.sel_fwd_seconds

    def ratio(saved: float, secs: float) -> float:
        return saved / secs if secs > 0 else float("inf")

    moves: list[tuple[float, int, int, str, int]] = []   # (-ratio, layer index, step, layer, mode after)
    for i, p in enumerate(layers):
        if full_saved[p] <= 0 and not (sel_ok[p] and sel_saved[p] > 0):
            continue
        if sel_ok[p] and sel_saved[p] > 0:
            first = ratio(sel_saved[p], sel_secs[p])
            rest_saved, rest_secs = full_saved[p] - sel_saved[p], full_secs[p] - sel_secs[p]
            if rest_saved <= 0:           # selective frees as much as full (a norm): the faster one
                if sel_secs[p] <= full_secs[p] or full_saved[p] <= 0:
                    moves.append((-first, i, 0, p, SELECTIVE))
                    continue
            second = ratio(rest_saved, rest_secs)
            if second < first:
                moves += [(-first, i, 0, p, SELECTIVE), (-second, i, 1, p, FULL)]
                continue
        if full_saved[p] > 0:
            moves.append((-ratio(full_saved[p], full_secs[p]), i, 0, p, FULL))
    moves.sort()
    counts = range(len(moves) + 1)
    if len(counts) > max_candidates:
        counts = sorted({int(round(x)) for x in np.linspace(0, len(moves), max_candidates)})
    out = []
    for k in counts:
        mode = {p: m for _, _, _, p, m in moves[:k]}   # a later move of a layer overrides its first
        out.append(tuple(p if mode[p] == FULL else selective_entry(p) for p in layers if p in mode))
    return out


def _limits(memory_limit: float | Sequence[float], num_ranks: int) -> list[float]:
    if isinstance(memory_limit, (int, float)):
        limits = [float(memory_limit)] * num_ranks
    else:
        limits = [float(x) for x in memory_limit]
    if len(limits) != num_ranks or any(not x > 0 for x in limits):
        raise MemoryLimitError(f"memory_limit={memory_limit!r} for {num_ranks} ranks. Fix: pass bytes > 0, one "
                         "number for all ranks or one per rank.")
    return limits


_Group = tuple[int, int]   # (stage, microbatch) of one one-hot choice; microbatch -1: the whole stage


@dataclass
class _RankProblem:
    stages: list[int]
    cands: dict[int, list[tuple[str, ...]]]
    groups: list[_Group]                      # one one-hot choice each, in column order
    span: dict[_Group, np.ndarray]            # group -> its columns, candidate order
    rows: np.ndarray                          # memory rows (rows x columns), MiB
    offset: np.ndarray                        # per row: the cost model's own workspace there, MiB
    cost: np.ndarray                          # seconds per column
    static: float                             # bytes present from the start (gradients: in the rows' offsets)
    grads: float = 0.0                        # the rank's parameter gradients, bytes

    @property
    def num_columns(self) -> int:
        return len(self.cost)


class Phase3Tables:
    """What every rank problem reads, memoised per cost model: each stage's candidates and, per
    (stage, microbatch, sub), every candidate's stash, recompute workspace (MiB) and re-run
    seconds. A planner's candidate programs for one batch share one cost model, so passing one
    table to each :func:`optimize_memory` call computes these once per batch instead of once per
    candidate (the temporal reuse the paper credits for SEMU's speed). Candidates are prefixes of
    one ranking, so the vectors are a 0/1 mask (candidates x layers) times per-layer footprints."""

    def __init__(self, costs: RecomputeCosts, num_microbatches: int, max_candidates: int = 10,
                 selective: bool = True):
        self.costs = costs
        self.num_microbatches = num_microbatches
        self.max_candidates = max_candidates
        self.selective = selective     # offer selective checkpointing (see stage_candidates)
        # keyed by (stage, selective offered): a split-backward program's stages get whole layers only
        self._cands: dict[tuple[int, bool], list[tuple[str, ...]]] = {}
        self._masks: dict[tuple[int, bool], tuple[np.ndarray, np.ndarray]] = {}   # (full, selective) masks
        self._vectors: dict[tuple[int, int, int, bool], tuple[np.ndarray, ...]] = {}
        self._workspaces: dict[tuple, np.ndarray] = {}
        self._terms: dict[int, tuple[np.ndarray, float, np.ndarray, bool]] = {}   # id(workspaces) -> terms
        self._unit = getattr(costs, "unit_key", None)   # StepModel's (mb, sub) of the same statistics

    def candidates(self, stage: int, selective: bool = True) -> list[tuple[str, ...]]:
        """``stage``'s candidates; ``selective=False`` (or a table made with it): whole layers only."""
        key = (stage, selective and self.selective)
        if key not in self._cands:
            cands = stage_candidates(self.costs, stage, self.num_microbatches, self.max_candidates, key[1])
            layers = self.costs.stage_layers[stage]
            self._cands[key] = cands
            modes = [[layer_mode(p, frozenset(c)) for p in layers] for c in cands]
            self._masks[key] = (np.array([[m == FULL for m in row] for row in modes], dtype=float),
                                np.array([[m == SELECTIVE for m in row] for row in modes], dtype=float))
        return self._cands[key]

    def vectors(self, stage: int, mb: int, sub: int = -1,
                selective: bool = True) -> tuple[np.ndarray, ...]:
        """(stash MiB, workspace MiB, re-run seconds, seconds added to the FWD) per candidate of
        ``stage`` on (``mb``, ``sub``)."""
        selective = selective and self.selective
        key = (stage, mb, sub, selective)
        hit = self._vectors.get(key)
        if hit is None:
            unit = self._unit(mb, sub) if self._unit is not None else (mb, sub)
            if unit != (mb, sub):          # same statistics as an earlier unit: same vectors
                hit = self._vectors[key] = self.vectors(stage, *unit, selective=selective)
                return hit
            self.candidates(stage, selective)
            full, sel = self._masks[(stage, selective)]
            fps = [self.costs.layer_footprint(stage, mb, p, sub) for p in self.costs.stage_layers[stage]]
            act = np.array([f.act_bytes for f in fps])
            inp = np.array([f.in_bytes for f in fps])
            sel_b = np.array([f.sel_bytes for f in fps])
            stash = (full @ inp + sel @ sel_b + (1.0 - full - sel) @ act) / _SCALE
            rebuilt = full * np.maximum(act - inp, 0.0) + sel * np.maximum(act - sel_b, 0.0)
            work = rebuilt.max(axis=1) / _SCALE if full.shape[1] else np.zeros(len(full))
            secs = full @ np.array([f.fwd_seconds for f in fps]) + sel @ np.array([f.sel_seconds for f in fps])
            hit = (stash, work, secs, sel @ np.array([f.sel_fwd_seconds for f in fps]))
            self._vectors[key] = hit
        return hit

    def workspaces(self, ins: Instruction, first: bool, reruns: bool, selective: bool = True) -> np.ndarray | None:
        """Workspace MiB of backward ``ins`` under each candidate of its stage, from the cost
        model's layer walk (``workspace_choices``: a re-run charged at its own layer, as the
        emulator does), or ``None`` for cost models without one."""
        choices = getattr(self.costs, "workspace_choices", None)
        if choices is None:
            return None
        selective = selective and self.selective
        mb, sub = self._unit(ins.mb, ins.sub) if self._unit is not None else (ins.mb, ins.sub)
        key = (ins.op, ins.stage, mb, sub, bool(first), bool(reruns), selective)
        hit = self._workspaces.get(key)
        if hit is None:
            self.candidates(ins.stage, selective)
            full, sel = self._masks[(ins.stage, selective)]
            hit = self._workspaces[key] = choices(ins, first, full, sel, (full + sel).sum(axis=1) > 0, reruns) / _SCALE
        return hit

    def workspace_terms(self, ins: Instruction, first: bool, reruns: bool,
                        selective: bool = True) -> tuple[float, np.ndarray, bool] | None:
        """:meth:`workspaces` as a rank row takes it: (column 0's MiB, each candidate's MiB less
        column 0's, whether any differs), or ``None`` for cost models without a layer walk."""
        walked = self.workspaces(ins, first, reruns, selective)
        if walked is None:
            return None
        hit = self._terms.get(id(walked))
        if hit is None or hit[0] is not walked:
            delta = walked - walked[0]
            hit = self._terms[id(walked)] = (walked, float(walked[0]), delta, bool(delta.any()))
        return hit[1:]


def _rank_problem(program: Program, tables: Phase3Tables, rank: int, per_microbatch: bool = True) -> _RankProblem:
    """One rank's ILP data, one one-hot group per (stage, microbatch) (``per_microbatch``) or per
    stage. A row is taken only where memory is about to fall (before a free, or a backward's
    workspace point): every coefficient is >= 0, so a row taken after a FWD that is followed by
    more FWDs is dominated by the later one.

    The live stashes are a running row (column -> MiB) that each FWD, freeing backward and held
    seed changes in its group's columns only. The walk records those changes per group and the
    event count at each row; each group's running values are then one cumulative sum of its own
    changes, read at the rows (the same additions in the same order as updating one running row
    and copying it at every row, without the per-row copies: VLM-L's ranks take ~800 rows each)."""
    stages = list(program.stages_of_rank(rank))
    # torch's selective checkpointing allows one backward per forward, and the zero-bubble split
    # re-runs a checkpointed layer in BWD_I and again in BWD_W (where the stage takes input
    # gradients, see recomputes_in): those stages recompute whole layers
    whole_only = {ins.stage for ins in program.streams[rank]
                  if ins.op is _BWD_I and program.stage(ins.stage).grad_producers}
    sel_ok = {s: s not in whole_only for s in stages}
    cands = {s: tables.candidates(s, sel_ok[s]) for s in stages}
    stream = program.streams[rank]
    groups = list(dict.fromkeys((ins.stage, ins.mb if per_microbatch else -1) for ins in stream if ins.op is _FWD))
    span: dict[_Group, np.ndarray] = {}
    at = 0
    for g in groups:
        span[g] = np.arange(at, at + len(cands[g[0]]))
        at += len(cands[g[0]])
    index = {g: k for k, g in enumerate(groups)}
    useful = {s: any(cands[s]) for s in stages}
    base = getattr(tables.costs, "workspace_bytes", None)   # StepModel: transients of every compute
    seed_bytes = getattr(tables.costs, "wgrad_seed_bytes", None)   # StepModel: what BWD_I keeps for BWD_W
    seeds: dict[tuple[int, int, int], float] = {}           # unit -> MiB held by its column 0
    if base is not None:
        from dipc.semu.step_model import first_weight_backwards
        firsts = first_weight_backwards(program)
    cost = np.zeros(at)
    # the running row's changes: per group, (event number, change of its columns); rows: the
    # number of events before each row, its offset, and (row, group, change) added to that row alone
    changes: list[tuple[list[int], list[np.ndarray]]] = [([], []) for _ in groups]
    events = 0                           # changes so far, all groups
    row_events: list[int] = []

    def change(gi: int, vec: np.ndarray) -> None:
        nonlocal events
        changes[gi][0].append(events)
        changes[gi][1].append(vec)
        events += 1
    offsets: list[float] = []
    row_deltas: list[tuple[int, int, np.ndarray]] = []
    live: set[tuple[int, int, int]] = set()
    pending = False                      # the running row after the last FWD is not yet recorded
    # a stage's gradients exist from its first BWD / BWD_W on, as in the emulator: before that they
    # are not in the rows (charging them from the start made warm-up peaks look over a limit the
    # emulator's most frugal plan fits, and the ILP infeasible)
    grad_bytes = getattr(tables.costs, "grad_bytes", None)
    with_grads: set[int] = set()
    made = 0.0                           # MiB of gradients made so far on this rank

    for ins in stream:
        op = ins.op
        if op not in _COMPUTE:
            continue
        key = (ins.stage, ins.mb, ins.sub)
        if grad_bytes is not None and (op is _BWD or op is _BWD_W) and ins.stage not in with_grads:
            with_grads.add(ins.stage)
            made += grad_bytes(ins.stage) / _SCALE
        extra = base(ins, first=key in firsts) / _SCALE if base is not None else 0.0
        gi = index[(ins.stage, ins.mb if per_microbatch else -1)]
        cols = span[groups[gi]]
        if op is _FWD:
            if extra > 0:                 # the emulator adds a workspace to the memory before the FWD
                row_events.append(events)
                offsets.append(extra + made)
            if key not in live:
                live.add(key)
                vec = tables.vectors(*key, sel_ok[ins.stage])
                change(gi, vec[0])
                cost[cols] += vec[3]      # selective checkpointing's dispatch in the forward
            pending = True
            continue
        reruns = recomputes_in(ins, program)
        if reruns:
            cost[cols] += tables.vectors(*key, sel_ok[ins.stage])[2]
        # each candidate's workspace from the cost model's walk: column 0 (nothing recomputed)
        # as the row's constant, the others as their difference to it (can be < 0: a unit
        # that recomputes captures no seeds, and its re-runs come after later stashes are freed)
        terms = tables.workspace_terms(ins, key in firsts, reruns, sel_ok[ins.stage]) if base is not None else None
        if terms is not None:
            extra, delta, varies = terms
        elif reruns:
            delta = tables.vectors(*key, sel_ok[ins.stage])[1]
            varies = bool(delta.any())
        else:
            delta, varies = None, False
        if (varies and useful[ins.stage]) or extra > 0:
            if delta is not None:           # live stashes + workspaces: dominates pending
                row_deltas.append((len(row_events), gi, delta))
            row_events.append(events)
            offsets.append(extra + made)
            pending = False
        if op is _BWD_I and seed_bytes is not None:
            # held only by the candidate that recomputes nothing (column 0): a unit that
            # recomputes takes the plain split, whose BWD_I keeps no seeds (recompute_costs)
            held = seed_bytes(*key) / _SCALE
            if held > 0:
                seeds[key] = held
                change(gi, _first_only(len(cols), held))
                pending = True
        if op is _BWD_W and key in seeds:
            if pending:
                row_events.append(events)
                offsets.append(made)
                pending = False
            change(gi, _first_only(len(cols), -seeds.pop(key)))
        if op is not _BWD_I and key in live:
            if pending:
                row_events.append(events)
                offsets.append(made)
                pending = False
            live.discard(key)
            change(gi, -tables.vectors(*key, sel_ok[ins.stage])[0])
    if pending:
        row_events.append(events)
        offsets.append(made)
    both = np.zeros((len(row_events), at + 1))
    both[:, -1] = offsets
    if row_events:
        at_row = np.array(row_events)
        for g, (when, what) in zip(groups, changes):
            if when:   # the group's running values after each of its changes, read at every row
                running = np.cumsum(np.vstack([np.zeros(len(what[0])), *what]), axis=0)
                both[:, span[g]] = running[np.searchsorted(when, at_row)]
        for r, gi, delta in row_deltas:
            both[r, span[groups[gi]]] += delta
    both = _undominated(both)
    grads = sum(grad_bytes(s) for s in with_grads) if grad_bytes is not None else 0.0
    static = sum(tables.costs.static_bytes(s) for s in stages) - grads
    return _RankProblem(stages, cands, groups, span, both[:, :-1], both[:, -1], cost, static, grads)


def _first_only(n: int, value: float) -> np.ndarray:
    """A change of ``value`` in the first of ``n`` columns (the candidate that recomputes nothing)."""
    out = np.zeros(n)
    out[0] = value
    return out


def _undominated(rows: np.ndarray) -> np.ndarray:
    """``rows`` (each a memory row's coefficients then its offset) without the rows another row
    dominates (>= in every entry): the choices are 0/1, so a dominated row holds wherever its
    dominator does and the feasible set is unchanged. A rank's rows are mostly such repeats of the
    same stashes at lower levels (VLM-L: median 266 rows -> 15), and HiGHS's time grows with them.
    Rows are visited largest sum first (a dominator's sum is at least its row's), a block at a
    time: each row of the block is kept unless a kept row dominates it (a duplicate is dominated by
    its twin), then the rest lose every row the block's kept rows dominate in one broadcast.
    First, in two vectorised passes, the rows that their next row (then, of those left, their
    previous row) dominates go: rows come in stream order and memory mostly rises or falls for a
    while, so these drop ~85% of them (VLM-L: median 255 -> 40) and the block loop runs on the
    rest (4 -> 0.8 ms per rank problem; the kept rows are the same, in the same order). Each
    pass keeps the end of every chain of dominated rows, so a dropped row's dominator, or its
    dominator's, is kept."""
    if len(rows) < 2:
        return rows
    rows = rows[np.append(~(rows[1:] >= rows[:-1]).all(axis=1), True)]       # dominated by the next row
    rows = rows[np.insert(~(rows[:-1] >= rows[1:]).all(axis=1), 0, True)]    # dominated by the previous row
    left = rows[np.argsort(-rows.sum(axis=1), kind="stable")]
    kept = np.empty_like(rows)
    n = 0
    while len(left):
        block, left = left[:_PRUNE_BLOCK], left[_PRUNE_BLOCK:]
        start = n
        for row in block:
            if n and (kept[:n] >= row).all(axis=1).any():
                continue
            kept[n] = row
            n += 1
        if len(left) and n > start:
            left = left[~(left[:, None, :] <= kept[None, start:n, :]).all(axis=2).any(axis=1)]
    return kept[:n]


_PRUNE_BLOCK = 16


def _milp(problem: _RankProblem, groups: list[_Group], rows: np.ndarray, rhs: np.ndarray, mip_rel_gap: float,
          time_limit: float | None) -> dict[_Group, int] | None:
    """The cheapest one-hot choice of ``groups`` (their columns only) with ``rows @ x <= rhs``."""
    from scipy.optimize import Bounds, LinearConstraint, milp

    cols = np.concatenate([problem.span[g] for g in groups])
    n = len(cols)
    E = np.zeros((len(groups), n))
    at = 0
    for k, g in enumerate(groups):
        E[k, at:at + len(problem.span[g])] = 1.0
        at += len(problem.span[g])
    constraints = [LinearConstraint(E, 1.0, 1.0)]
    if len(rows):
        constraints.append(LinearConstraint(rows[:, cols], -np.inf, rhs))
    options: dict[str, float | bool] = {"disp": False, "mip_rel_gap": mip_rel_gap}
    if time_limit is not None:
        options["time_limit"] = time_limit
    # seconds are tiny; milliseconds keep the objective's scale near the constraints'
    res = milp(problem.cost[cols] * 1e3, constraints=constraints, integrality=np.ones(n), bounds=Bounds(0, 1),
               options=options)
    if res.x is None:
        return None
    out: dict[_Group, int] = {}
    at = 0
    for g in groups:
        width = len(problem.span[g])
        out[g] = int(np.argmax(res.x[at:at + width]))
        at += width
    return out


def _solve(problem: _RankProblem, budget: float, mip_rel_gap: float,
           time_limit: float | None) -> dict[_Group, int] | None:
    """Group -> candidate index of the cheapest choice with every memory row within ``budget``
    bytes, or None if infeasible. Groups with no stash in any row that the fastest choice breaks
    are first fixed to the fastest candidate (the reduced ILP; see the module docstring); if that
    is infeasible, every group is free."""
    if not problem.groups:
        return {}
    fastest = np.array([problem.span[g][0] for g in problem.groups])
    limit = budget / _SCALE
    at_fastest = problem.rows[:, fastest].sum(axis=1) + problem.offset if len(problem.rows) else np.zeros(0)
    if not len(problem.rows) or at_fastest.max() <= limit:
        return {g: 0 for g in problem.groups}     # nothing recomputed fits: free, so optimal
    broken = problem.rows[at_fastest > limit]
    needed = [g for g in problem.groups if broken[:, problem.span[g]].any()]
    if len(needed) < len(problem.groups):
        fixed = np.array([problem.span[g][0] for g in problem.groups if g not in set(needed)])
        rhs = limit - problem.offset - problem.rows[:, fixed].sum(axis=1)
        got = _milp(problem, needed, problem.rows, rhs, mip_rel_gap, time_limit)
        if got is not None:
            return {**{g: 0 for g in problem.groups}, **got}
    return _milp(problem, problem.groups, problem.rows, limit - problem.offset, mip_rel_gap, time_limit)


def _warm_index(problem: _RankProblem, plan: RecomputePlan) -> dict[_Group, int] | None:
    """Group -> candidate index of ``plan`` (a feasible plan of the same program, e.g. the
    per-stage fit), or None where the plan takes a choice that is not one of the candidates."""
    out: dict[_Group, int] = {}
    for g in problem.groups:
        stage, mb = g
        layers = plan.get((stage, mb), plan.get(stage, ())) if mb >= 0 else plan.get(stage, ())
        try:
            out[g] = problem.cands[stage].index(tuple(layers))
        except ValueError:
            return None
    return out


def _descend(problem: _RankProblem, start: dict[_Group, int], budget: float) -> dict[_Group, int] | None:
    """From the feasible choice ``start``, move groups to cheaper candidates while every memory
    row stays within ``budget`` bytes: sweeps over the groups, each taking its cheapest candidate
    that still fits, until a sweep changes nothing. None if ``start`` itself breaks a row.

    Why: the per-microbatch ILP costs ~10x the per-stage one and, inside the planner's per-batch
    budget, HiGHS was often stopped at a poor incumbent (T2V-L: 15.6 s mean step against 14.4 s
    with the refit unbounded). Starting from the per-stage plan, the microbatches that are not alive
    at a rank's peak can drop their recomputation one by one -- the gain the finer choice is for --
    in milliseconds. A local optimum, not the ILP's: the caller keeps the cheaper of the two."""
    rows, cost = problem.rows, problem.cost
    rhs = budget / _SCALE - problem.offset + 1e-9
    choice = dict(start)
    if not len(rows):
        return {g: int(np.argmin(cost[problem.span[g]])) for g in problem.groups}
    use = rows[:, [problem.span[g][j] for g, j in choice.items()]].sum(axis=1)
    if (use > rhs).any():
        return None
    changed = True
    while changed:
        changed = False
        for g in problem.groups:
            span = problem.span[g]
            cur = span[choice[g]]
            cheaper = np.flatnonzero(cost[span] < cost[cur] - 1e-12)
            if not cheaper.size:
                continue
            fits = ((use - rows[:, cur])[:, None] + rows[:, span[cheaper]] <= rhs[:, None]).all(axis=0)
            if not fits.any():
                continue
            k = int(cheaper[fits][np.argmin(cost[span[cheaper[fits]]])])
            use += rows[:, span[k]] - rows[:, cur]
            choice[g] = k
            changed = True
    return choice


def _cost_of(problem: _RankProblem, index: dict[_Group, int]) -> float:
    return float(sum(problem.cost[problem.span[g][j]] for g, j in index.items()))


def _choice(problem: _RankProblem, index: dict[_Group, int], num_microbatches: int) -> RecomputePlan:
    """The chosen candidates as a plan: a bare stage where every microbatch takes the same one."""
    plan: RecomputePlan = {}
    for s in problem.stages:
        mine = {m: index[(st, m)] for st, m in problem.groups if st == s}
        if not mine:
            continue
        if set(mine) == {-1} or (set(mine) == set(range(num_microbatches)) and len(set(mine.values())) == 1):
            layers = problem.cands[s][next(iter(mine.values()))]
            if layers:
                plan[s] = layers
            continue
        plan.update({(s, m): problem.cands[s][j] for m, j in mine.items() if problem.cands[s][j]})
    return plan


def _infeasible(program: Program, costs: PlannableCosts, limits: list[float], problems: list[_RankProblem],
                simulate: Callable[[Program], SimResult], why: str) -> InfeasibleMemoryError:
    frugal = {s: p.cands[s][-1] for p in problems for s in p.stages}
    peaks = simulate(with_recompute(program, frugal)).peak_memory or ()
    lines = []
    excess: dict[int, float] = {}
    for r, (peak, limit, p) in enumerate(zip(peaks, limits, problems)):
        if peak > limit:
            excess[r] = peak - limit
            fixed = p.static + p.grads
            lines.append(f"rank {r}: needs {_gib(peak)} = {_gib(fixed)} parameters/gradients/optimizer "
                         f"+ {_gib(peak - fixed)} activations with every layer recomputed, "
                         f"{_gib(peak - limit)} ({int(peak - limit)} bytes) over its {_gib(limit)} limit")
    detail = "; ".join(lines) or (f"the emulator's peaks {[_gib(x) for x in peaks]} fit the most frugal plan, "
                                  "but no per-stage choice fits every memory point")
    return InfeasibleMemoryError(
        f"no recomputation plan fits the memory limit for schedule {program.schedule!r} with "
        f"{program.num_microbatches} microbatches ({why}): {detail}. Fix: spread the model over more "
        "pipeline ranks/stages (fewer parameters per rank), use smaller microbatches or a schedule with "
        "fewer microbatches in flight (1f1b or zb_h1 rather than gpipe), add tensor parallelism, or raise "
        f"memory_limit by at least {_gib(max(excess.values(), default=0.0))}.", excess)


def optimize_memory(program: Program, costs: PlannableCosts, memory_limit: float | Sequence[float], *,
                    max_candidates: int = 10, max_rounds: int = 4, mip_rel_gap: float = 0.0,
                    time_limit: float | None = None,
                    simulate: Callable[[Program], SimResult] | None = None,
                    tables: Phase3Tables | None = None, per_microbatch: bool = True,
                    max_columns: int = 4000, selective: bool = True, warm: RecomputePlan | None = None,
                    ilp: bool = True, deadline: float | None = None) -> MemoryPlan:
    """``program`` with the cheapest per-(stage, microbatch) recomputation that keeps every rank's
    simulated peak memory within ``memory_limit`` bytes (one number, or one per rank); see the
    module docstring.

    Example::

        model = step_model(pipe, mbs)                       # dipc.semu.compare
        plan = optimize_memory(pipe.plan(mbs), model, 40 * 2**30)
        pipe.step(mbs, plan.program)                        # the runtime recomputes plan.recompute

    ``tables``: a :class:`Phase3Tables` of ``costs`` shared by calls on programs of the same batch.
    ``per_microbatch=False`` makes one choice per stage for all its microbatches (as does a rank
    whose per-microbatch ILP would have more than ``max_columns`` variables).
    ``selective=False`` offers whole-layer recomputation only (see :func:`stage_candidates`).
    ``warm``: a feasible plan of this program (the per-stage fit): each rank also descends from it
    (:func:`_descend`) and keeps the cheaper of that and the ILP's choice; ``ilp=False`` descends
    only (a rank whose warm choice breaks its budget then has no plan: infeasible).
    ``deadline`` (a ``time.perf_counter()`` time): each rank's ILP gets an equal share of what is
    left as HiGHS's time limit, a rank left under :data:`MIN_REFINE_ILP_S` descends only (the
    rank problems are built and the descent runs whatever the time: ~0.1-0.2 s on VLM-L), and a
    fit that needs a further round past it, or a rank out of time with nothing to descend from,
    raises :class:`OutOfTimeError` -- for anytime callers (the refit) that keep what they had.
    """
    limits = _limits(memory_limit, program.num_ranks)
    if max_columns < 1:
        raise MemoryLimitError(f"max_columns={max_columns}. Fix: allow at least 1 ILP variable per rank.")
    if hasattr(costs, "for_program"):   # a StepModel of the batch as given: the program's slots
        costs = costs.for_program(program)
    sim = simulate or costs.simulate
    if tables is None or tables.costs is not costs or tables.max_candidates != max_candidates \
            or tables.num_microbatches != program.num_microbatches or tables.selective != selective:
        tables = Phase3Tables(costs, program.num_microbatches, max_candidates, selective)
    problems = []
    for r in range(program.num_ranks):
        problem = _rank_problem(program, tables, r, per_microbatch)
        if per_microbatch and problem.num_columns > max_columns:   # too big: one choice per stage
            problem = _rank_problem(program, tables, r, False)
        problems.append(problem)
    budgets = [limit - p.static for limit, p in zip(limits, problems)]
    index: list[dict[_Group, int]] = [{} for _ in problems]   # per rank: group -> chosen candidate
    starts = [_warm_index(p, warm) if warm is not None else None for p in problems]
    todo = list(range(program.num_ranks))
    for rounds in range(1, max_rounds + 1):
        if rounds > 1:
            _check_deadline(deadline, f"round {rounds}")
        for k, r in enumerate(todo):
            got = None
            if budgets[r] > 0:
                got = _descend(problems[r], starts[r], budgets[r]) if starts[r] is not None else None
                limit = time_limit
                if deadline is not None:   # an equal share of what is left for this and the ranks after it
                    share = (deadline - time.perf_counter()) / (len(todo) - k)
                    limit = None if share < MIN_REFINE_ILP_S else min(share, time_limit or share)
                    if limit is None and got is None:
                        raise OutOfTimeError(f"rank {r} has no time left for its ILP and no feasible plan to "
                                             "descend from. Fix: give the fit more time, or a warm plan.")
                use_ilp = ilp and (deadline is None or limit is not None)
                solved = _solve(problems[r], budgets[r], mip_rel_gap, limit) if use_ilp else None
                if solved is not None and (got is None or _cost_of(problems[r], solved) < _cost_of(problems[r], got)):
                    got = solved
            if got is None:
                raise _infeasible(program, costs, limits, problems, sim, f"rank {r}'s ILP is infeasible")
            index[r] = got
        plan: RecomputePlan = {}
        for p, chosen in zip(problems, index):
            plan.update(_choice(p, chosen, program.num_microbatches))
        planned = with_recompute(program, plan)
        result = sim(planned)
        peaks = result.peak_memory
        if peaks is None:
            raise ValueError("the simulator returned no peak memory. Fix: simulate with a memory model.")
        todo = [r for r in range(program.num_ranks) if peaks[r] > limits[r] * (1 + 1e-9) + 1.0]
        if not todo:
            added = tuple(_cost_of(p, chosen) for p, chosen in zip(problems, index))
            return MemoryPlan(program=planned, recompute=plan, result=result, peak_memory=tuple(peaks),
                              limit=tuple(limits), added_seconds=added, rounds=rounds)
        for r in todo:   # the emulator disagrees with the ILP's accounting: tighten and re-solve
            budgets[r] -= peaks[r] - limits[r]
    raise _infeasible(program, costs, limits, problems, sim,
                      f"the emulator still found ranks {todo} over the limit after {max_rounds} rounds")


# below this many seconds per rank's ILP the refit descends only: HiGHS spent 13-48 ms on a VLM-L rank's
# 35-column per-stage ILP at its root node alone, whatever its time limit
MIN_REFINE_ILP_S = 0.03


class OutOfTimeError(DipcError):
    """A fit given a ``deadline`` ran past it (see :func:`optimize_memory`)."""


def _check_deadline(deadline: float | None, where: str) -> None:
    if deadline is not None and time.perf_counter() > deadline:
        raise OutOfTimeError(f"phase 3 ran past its deadline while {where}. Fix: give the refit more time "
                             "(the planner's per-batch budget) or plan without it.")


def refine_per_microbatch(program: Program, result: SimResult, costs: PlannableCosts,
                          memory_limit: float | Sequence[float], *, time_budget: float | None = None,
                          **kwargs) -> tuple[Program, SimResult]:
    """A planner's winner, fitted with one choice per stage, refitted per (stage, microbatch);
    the faster of the two. Why a second pass rather than per-microbatch fits during the search:
    a per-microbatch ILP costs ~10x a per-stage one (HiGHS on hundreds of columns instead of tens),
    and the search fits several candidates per batch, while the ranking of candidates rarely
    changes with the finer choice. A winner that recomputes nothing is returned as it is; the
    refit is kept unless its simulated step is slower.

    ``time_budget``: wall seconds the refit may take, the planner's leftover per-batch budget. The
    refit is an anytime improvement: each rank first descends from the per-stage plan (cheaper
    microbatch by microbatch while the rows fit, :func:`_descend`, milliseconds), its ILP gets an
    equal share of the time left before the deadline as HiGHS's time limit (it then returns its
    best incumbent) and the cheaper of the two is kept; with under ``MIN_REFINE_ILP_S`` per rank
    only the descent runs. (A share fixed up front overran: the rank problems take ~60-200 ms to
    build on VLM-L and HiGHS's root node 13-48 ms whatever its limit, so a 0.125 s budget took 0.45 s.) Measured on T2V-L
    (4 batches, 8 ranks): the descent alone took 76 ms CPU per refit for 1.0-3.6% shorter steps; the
    ILP unbounded 1.74 s for 4-12%, which the planner's per-batch budget does not leave it. Measured on VLM-L's batches (8 ranks, 2 cores): unbounded, the refit took 1.6 s of
    a 2.3 s median plan; at 0.1 s per ILP the plan median was 1.65 s with the same step times.
    ``kwargs`` go to :func:`optimize_memory`; a refit that fails keeps the per-stage plan."""
    warm = recompute_plan(program)
    if not warm:
        return program, result
    if time_budget is not None:
        # a deadline, not a per-ILP share: building the per-microbatch rank problems and a second
        # round took the refit up to 0.4 s past a share-based budget (VLM-L)
        kwargs["deadline"] = time.perf_counter() + time_budget
    try:
        fine = optimize_memory(program, costs, memory_limit, per_microbatch=True, warm=warm, **kwargs)
    except DipcError:   # infeasible, or out of time (OutOfTimeError): the per-stage plan stands
        return program, result
    # on a tie the finer plan: the per-stage choice is one of its ILP's solutions, so it recomputes
    # no more (up to a gap the caller allows), and leaves more slack where the tie is broken by noise
    if fine.result.step_time <= result.step_time:
        return fine.program, fine.result
    return program, result
