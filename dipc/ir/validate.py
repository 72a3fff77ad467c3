"""Prove a program executable before anything runs.

``validate(program)`` checks, in this order, and raises ``ScheduleError`` at the first problem:

1. structure: stream count, stage ids, stage graph (ids in range, acyclic, grad edges are edges),
   the ``recompute`` attribute's stages and microbatches exist (:mod:`dipc.ir.recompute`);
2. each instruction: its fields fit its op, its stage lives on this rank, a comm instruction's edge
   exists and crosses ranks, ``peer`` is the rank of ``other_stage``; no instruction twice;
3. completeness: every (stage, microbatch, sub) has one FWD, one BWD or one BWD_I + BWD_W, one LOAD
   iff the stage loads batch keys, and every cross-rank edge one send and one receive per
   microbatch (per sub when its producer runs in subs);
4. dependency order inside each rank (FWD after its LOAD and inputs, BWD after FWD and its output
   grads, sends after what they send, REDUCE/OPTIM after the backward they reduce/apply);
5. FIFO matching per ordered rank pair: the k-th send a->b carries the k-th receive's message
   (NCCL matches point-to-point messages in issue order and ignores tags);
6. deadlock freedom: all ranks are simulated with non-blocking sends and blocking receives.

Every message reads ``rank r, step s: <rule broken>. Fix: ...`` followed by the program's step x
rank grid with that cell marked (``<-- here``); a missing instruction is reported at the end of the
stream that should hold it (step = stream length). Problems with the stage graph itself read
``program: ...``. The raised error carries ``.rank`` and ``.step`` (``None`` for program-level).
Sub-microbatches (``Program.subs``): a stage of a split modality runs once per (microbatch, sub);
it may read only stages of the same modality (sub j reads sub j). A stage that is not split and
reads a split producer (the encoder -> backbone boundary) needs *every* sub's activation before
its FWD, and its backward sends one gradient per sub, which that sub's backward waits for.

All checks together are linear in the number of instructions (times stage fan-in/fan-out).
"""
from __future__ import annotations

from collections import deque

from dipc.errors import ScheduleError
from dipc.ir.instructions import COMPUTE_OPS, RECV_OPS, SEND_OPS, Instruction, Op, message_key
from dipc.ir.program import Program
from dipc.ir.recompute import check_recompute
from dipc.ir.text import format_grid, format_instruction

# Op.X is a slow class-attribute lookup on Python 3.11 enums, and these loops run per instruction
(_BWD, _BWD_I, _BWD_W, _FWD, _LOAD, _OPTIM, _RECV_ACT, _RECV_GRAD, _REDUCE, _SEND_ACT,
 _SEND_GRAD) = (Op.BWD, Op.BWD_I, Op.BWD_W, Op.FWD, Op.LOAD, Op.OPTIM, Op.RECV_ACT, Op.RECV_GRAD, Op.REDUCE,
                Op.SEND_ACT, Op.SEND_GRAD)

__all__ = ["validate", "GRID_ROWS"]

GRID_ROWS = 64  # an error's grid shows at most this many steps around the marked one

_Key = tuple  # (op, ...) identifying one instruction of the whole program
_BWD_OPS = (_BWD, _BWD_I)
_WGRAD_OPS = (_BWD, _BWD_W)


def validate(program: Program) -> None:
    """Raise ``ScheduleError`` (with the marked grid) unless ``program`` is executable."""
    _Validator(program).run()


def _key(ins: Instruction, rank: int) -> _Key:
    return _key_of(ins.op, ins.stage, ins.mb, ins.sub, ins.other_stage, rank)


def _key_of(op: Op, stage: int, mb: int, sub: int, other_stage: int, rank: int) -> _Key:
    """:func:`_key` of an instruction with these fields, without building it."""
    if op in SEND_OPS or op in RECV_OPS:
        return (op, message_key(op, stage, other_stage, mb, sub))
    if op is _OPTIM:
        return (_OPTIM, rank)
    if op is _REDUCE:
        return (_REDUCE, rank, stage)
    return (op, stage, mb, sub)


def _ordinal(k: int) -> str:
    suffix = "th" if 10 <= k % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(k % 10, "th")
    return f"{k}{suffix}"


class _Validator:
    def __init__(self, program: Program):
        self.p = program
        self.M = program.num_microbatches
        # where[key] = (rank, step, instruction), filled by _check_instructions
        self.where: dict[_Key, tuple[int, int, Instruction]] = {}

    # ------------------------------------------------------------------ errors

    def fail(self, rank: int | None, step: int | None, rule: str, fix: str) -> ScheduleError:
        if rank is None or step is None:
            head, mark = "program", None
        else:
            head, mark = f"rank {rank}, step {step}", (rank, step)
        grid = format_grid(self.p, mark=mark, max_rows=GRID_ROWS)
        err = ScheduleError(f"{head}: {rule}. Fix: {fix}\n{grid}")
        err.rank, err.step = rank, step  # type: ignore[attr-defined]
        return err

    def fail_at_end(self, rank: int, rule: str, fix: str) -> ScheduleError:
        return self.fail(rank, len(self.p.streams[rank]), rule, fix)

    # ------------------------------------------------------------------ driver

    def run(self) -> None:
        self._check_structure()
        check_recompute(self.p)   # the recompute attribute names stages and microbatches that exist
        self._check_instructions()
        self._check_complete()
        self._check_order()
        self._check_fifo()
        self._check_deadlock()

    # ------------------------------------------------------------------ 1. structure

    def _check_structure(self) -> None:
        p = self.p
        if p.num_ranks < 1 or p.num_microbatches < 1:
            raise self.fail(None, None, f"ranks={p.num_ranks}, microbatches={p.num_microbatches}",
                            "a program needs at least one rank and one microbatch")
        if len(p.streams) != p.num_ranks:
            raise self.fail(None, None, f"{len(p.streams)} streams for ranks={p.num_ranks}",
                            "emit exactly one instruction stream per rank")
        if not p.order_is_valid:
            raise self.fail(None, None, f"microbatch_order {list(p.microbatch_order)} is not a permutation of "
                            f"0..{p.num_microbatches - 1}",
                            "give each of the caller's microbatches exactly one slot, or leave the order empty")
        n = len(p.stages)
        for i, s in enumerate(p.stages):
            if s.id != i:
                raise self.fail(None, None, f"stages[{i}] has id={s.id}",
                                "list stages in id order with ids 0, 1, 2, ...")
            if not 0 <= s.rank < p.num_ranks:
                raise self.fail(None, None, f"stage {i} is placed on rank {s.rank}, outside "
                                f"0..{p.num_ranks - 1}", "place every stage on an existing rank")
            for q in s.producers:
                if not 0 <= q < n or q == i:
                    raise self.fail(None, None, f"stage {i} names producer {q}",
                                    f"producers are other stages' ids in 0..{n - 1}")
            if len(set(s.producers)) != len(s.producers):
                raise self.fail(None, None, f"stage {i} repeats a producer {s.producers}",
                                "name each producer once")
            if len(set(s.grad_producers)) != len(s.grad_producers) or \
                    not set(s.grad_producers) <= set(s.producers):
                raise self.fail(None, None, f"stage {i} has grad_producers={s.grad_producers} "
                                f"not a subset of producers={s.producers}",
                                "a gradient flows back only along a producer edge, once")
        # Kahn's algorithm: the stage graph must be acyclic.
        indeg = [len(s.producers) for s in p.stages]
        consumers: list[list[int]] = [[] for _ in range(n)]
        grad_consumers: list[list[int]] = [[] for _ in range(n)]
        for s in p.stages:
            for q in s.producers:
                consumers[q].append(s.id)
            for q in s.grad_producers:
                grad_consumers[q].append(s.id)
        ready = [i for i in range(n) if indeg[i] == 0]
        seen = 0
        while ready:
            i = ready.pop()
            seen += 1
            for c in consumers[i]:
                indeg[c] -= 1
                if indeg[c] == 0:
                    ready.append(c)
        if seen != n:
            cyc = [i for i in range(n) if indeg[i] > 0]
            raise self.fail(None, None, f"the stage graph has a cycle through stages {cyc}",
                            "producers must form a DAG")
        self._check_subs()
        self.rank_of = [s.rank for s in p.stages]
        self.producer_set = [frozenset(s.producers) for s in p.stages]
        self.grad_set = [frozenset(s.grad_producers) for s in p.stages]
        self.grad_consumers = grad_consumers

    def _check_subs(self) -> None:
        p = self.p
        modalities = {s.modality for s in p.stages}
        seen: set[str] = set()
        for name, counts in p.subs:
            if name in seen:
                raise self.fail(None, None, f"subs lists modality {name!r} twice", "list it once")
            seen.add(name)
            if name not in modalities:
                raise self.fail(None, None, f"subs splits modality {name!r}, which no stage has "
                                f"(stages have {sorted(modalities)})", "split an existing modality")
            if len(counts) != self.M or any(c < 1 for c in counts):
                raise self.fail(None, None, f"subs of {name!r} has counts {counts} for "
                                f"{self.M} microbatches", "give one count >= 1 per microbatch")
        self.split = [p.sub_counts(s.modality) is not None for s in p.stages]
        self._units: dict[tuple[int, int], range | tuple[int]] = {}
        for s in p.stages:
            for q in s.producers:
                if self.split[s.id] and p.stages[q].modality != s.modality:
                    raise self.fail(None, None, f"stage {s.id} runs in {s.modality!r} subs but reads "
                                    f"stage {q} ({p.stages[q].modality!r}), which does not run in "
                                    f"the same subs", "a split stage may read only stages of its "
                                    "own modality; do not split this modality")

    def units(self, stage: int, mb: int) -> range | tuple[int]:
        """The subs ``stage`` runs for ``mb`` (``(-1,)`` when not split)."""
        key = (stage, mb)
        hit = self._units.get(key)
        if hit is None:
            hit = self._units[key] = self.p.sub_indices(stage, mb)
        return hit

    def needed_subs(self, producer: int, consumer: int, mb: int, sub: int) -> range | tuple[int]:
        """Which subs of ``producer``'s output consumer unit (mb, sub) reads."""
        return (sub,) if self.split[consumer] else self.units(producer, mb)

    # ------------------------------------------------------------------ 2. each instruction

    def _check_instructions(self) -> None:
        p, M, n = self.p, self.M, len(self.p.stages)
        where = self.where
        self.sends: dict[tuple[int, int], list[tuple[int, Instruction]]] = {}
        self.recvs: dict[tuple[int, int], list[tuple[int, Instruction]]] = {}
        r = i = 0
        ins = Instruction(op=_OPTIM)

        def bad(rule: str, fix: str) -> ScheduleError:      # reads the loop's current r, i, ins
            return self.fail(r, i, f"{format_instruction(ins)}: {rule}", fix)

        for r, stream in enumerate(p.streams):
            for i, ins in enumerate(stream):
                op = ins.op
                if ins.specs and op not in RECV_OPS:
                    raise bad("only receives carry specs", "drop specs from sends and compute")
                if op in (_REDUCE, _OPTIM):
                    if ins.mb != -1 or ins.sub != -1 or ins.peer != -1 or ins.other_stage != -1:
                        raise bad(f"{op.value} takes only an optional stage",
                                  "drop mb, sub, peer and other_stage")
                    if ins.stage != -1 and (not 0 <= ins.stage < n or self.rank_of[ins.stage] != r):
                        raise bad(f"stage {ins.stage} is not on rank {r}",
                                  f"reduce/step only stages of rank {r}: {p.stages_of_rank(r)}")
                else:
                    if not 0 <= ins.stage < n:
                        raise bad(f"stage {ins.stage} does not exist", f"use a stage id in 0..{n - 1}")
                    if self.rank_of[ins.stage] != r:
                        raise bad(f"stage {ins.stage} is placed on rank {self.rank_of[ins.stage]}, "
                                  f"not on rank {r}",
                                  f"emit it in rank {self.rank_of[ins.stage]}'s stream")
                    if not 0 <= ins.mb < M:
                        raise bad(f"microbatch {ins.mb} is outside 0..{M - 1}",
                                  "use microbatches in range(num_microbatches)")
                    if op in SEND_OPS or op in RECV_OPS:
                        self._check_comm(r, i, ins, bad)
                        side = ins.stage if op in (_SEND_ACT, _RECV_GRAD) else ins.other_stage
                    else:
                        side = ins.stage
                    subs = self.units(side, ins.mb)
                    if ins.sub not in subs:
                        want = "sub=-1 (stage %d is not split)" % side if subs == (-1,) else \
                            f"a sub in 0..{len(subs) - 1} (stage {side}, microbatch {ins.mb})"
                        raise bad(f"sub={ins.sub} is out of range", f"use {want}")
                    if op not in SEND_OPS and op not in RECV_OPS:
                        if ins.peer != -1 or ins.other_stage != -1:
                            raise bad(f"{op.value} takes no peer or other_stage",
                                      "drop peer and other_stage")
                        if op is _LOAD and not p.stages[ins.stage].loads:
                            raise bad(f"stage {ins.stage} loads no batch keys",
                                      "emit LOAD only for stages with loads")
                key = _key(ins, r)
                first = where.get(key)
                if first is not None:
                    raise bad(f"appears twice (first at rank {first[0]}, step {first[1]})",
                              "emit each instruction once")
                where[key] = (r, i, ins)
                if op in SEND_OPS:
                    self.sends.setdefault((r, ins.peer), []).append((i, ins))
                elif op in RECV_OPS:
                    self.recvs.setdefault((ins.peer, r), []).append((i, ins))

    def _check_comm(self, r: int, i: int, ins: Instruction, bad) -> None:
        n, s, o = len(self.p.stages), ins.stage, ins.other_stage
        if not 0 <= o < n:
            raise bad(f"other_stage {o} does not exist", f"use a stage id in 0..{n - 1}")
        op = ins.op
        if op is _SEND_ACT:
            ok, edge = s in self.producer_set[o], f"{s} -> {o} (producers of {o})"
        elif op is _RECV_ACT:
            ok, edge = o in self.producer_set[s], f"{o} -> {s} (producers of {s})"
        elif op is _SEND_GRAD:
            ok, edge = o in self.grad_set[s], f"{o} -> {s} (grad_producers of {s})"
        else:  # RECV_GRAD
            ok, edge = s in self.grad_set[o], f"{s} -> {o} (grad_producers of {o})"
        if not ok:
            raise bad(f"there is no edge {edge}", "send only along edges of the stage graph")
        if self.rank_of[o] == r:
            raise bad(f"stages {s} and {o} are both on rank {r}",
                      "a same-rank edge needs no message; drop it")
        if ins.peer != self.rank_of[o]:
            raise bad(f"peer={ins.peer} but stage {o} is on rank {self.rank_of[o]}",
                      f"set peer={self.rank_of[o]}")

    # ------------------------------------------------------------------ 3. completeness

    def _check_complete(self) -> None:
        p, where = self.p, self.where

        def need(op: Op, stage: int, mb: int, sub: int, why: str, peer: int = -1, other_stage: int = -1) -> None:
            # looked up without building the instruction (~250k asks per VLM-L plan)
            if _key_of(op, stage, mb, sub, other_stage, -1) not in where:
                ins = Instruction(op=op, stage=stage, mb=mb, sub=sub, peer=peer, other_stage=other_stage)
                r = self.rank_of[stage]
                raise self.fail_at_end(r, f"missing {format_instruction(ins)} ({why})",
                                       f"emit it in rank {r}'s stream")

        for s in p.stages:
            r = s.rank
            for m in range(self.M):
                for j in self.units(s.id, m):
                    unit = f"mb {m}" + (f" sub {j}" if j >= 0 else "")
                    ukey = f"mb={m}" + (f" sub={j}" if j >= 0 else "")
                    need(_FWD, s.id, m, j, f"every stage runs forward for every microbatch and sub")
                    if s.loads:
                        need(_LOAD, s.id, m, j, f"stage {s.id} loads {','.join(s.loads)}")
                    b, bi, bw = ((op, s.id, m, j) in where for op in (_BWD, _BWD_I, _BWD_W))
                    if b and (bi or bw):
                        rr, step, _ = max(where[(op, s.id, m, j)] for op in (_BWD_I, _BWD_W)
                                          if (op, s.id, m, j) in where)
                        raise self.fail(rr, step, f"stage {s.id} {unit} has both BWD and a split "
                                        f"BWD_I/BWD_W", "use either BWD or BWD_I + BWD_W")
                    if not b and not bi:
                        if bw:
                            rr, step, ins = where[(_BWD_W, s.id, m, j)]
                            raise self.fail(rr, step, f"{format_instruction(ins)} has no BWD_I",
                                            f"emit BWD_I stage={s.id} {ukey} before it")
                        raise self.fail_at_end(r, f"missing BWD stage={s.id} {ukey} (or BWD_I + BWD_W)",
                                               f"emit the backward in rank {r}'s stream")
                    if bi and not bw:
                        need(_BWD_W, s.id, m, j, "a BWD_I needs its BWD_W")
                    for q in s.producers:
                        rq = self.rank_of[q]
                        if rq == r:
                            continue
                        for k in self.needed_subs(q, s.id, m, j):
                            why = f"activation of edge {q} -> {s.id}"
                            need(_SEND_ACT, q, m, k, why, peer=r, other_stage=s.id)
                            need(_RECV_ACT, s.id, m, k, why, peer=rq, other_stage=q)
                            if q in self.grad_set[s.id]:
                                why = f"gradient of edge {q} -> {s.id}"
                                need(_SEND_GRAD, s.id, m, k, why, peer=rq, other_stage=q)
                                need(_RECV_GRAD, q, m, k, why, peer=r, other_stage=s.id)

    # ------------------------------------------------------------------ 4. order inside a rank

    def _check_order(self) -> None:
        p, where = self.p, self.where

        def bwd_of(stage: int, m: int, j: int) -> _Key:
            k = (_BWD, stage, m, j)
            return k if k in where else (_BWD_I, stage, m, j)

        def deps(ins: Instruction) -> list[tuple[_Key, str]]:
            op, s, m, j = ins.op, ins.stage, ins.mb, ins.sub
            out: list[tuple[_Key, str]] = []
            if op is _FWD:
                st = p.stages[s]
                if st.loads:
                    out.append(((_LOAD, s, m, j), "its input batch"))
                for q in st.producers:
                    for k in self.needed_subs(q, s, m, j):
                        what = f"the output of stage {q}" + (f" (sub {k})" if k >= 0 else "")
                        if self.rank_of[q] == self.rank_of[s]:
                            out.append(((_FWD, q, m, k), what))
                        else:
                            out.append(((_RECV_ACT, ("act", m, q, s, k)), what))
            elif op in _BWD_OPS:
                out.append(((_FWD, s, m, j), "its forward"))
                for c in self.grad_consumers[s]:
                    jc = j if self.split[c] else -1   # a split consumer's sub j, or the whole one
                    if self.rank_of[c] == self.rank_of[s]:
                        out.append((bwd_of(c, m, jc), f"the gradient from stage {c}"))
                    else:
                        out.append(((_RECV_GRAD, ("grad", m, s, c, j)), f"the gradient from stage {c}"))
            elif op is _BWD_W:
                out.append(((_BWD_I, s, m, j), "its BWD_I"))
            elif op is _SEND_ACT:
                out.append(((_FWD, s, m, j), "the forward it sends"))
            elif op is _SEND_GRAD:
                # the gradient of producer sub j comes out of the consumer's own unit
                out.append((bwd_of(s, m, j if self.split[s] else -1), "the backward it sends"))
            return out

        for r, stream in enumerate(p.streams):
            last_compute = -1
            last_wgrad: dict[int, int] = {}
            last_reduce = -1
            for i, ins in enumerate(stream):
                for key, what in deps(ins):
                    _, j, dep = where[key]
                    if j >= i:
                        raise self.fail(r, i, f"{format_instruction(ins)} comes before "
                                        f"{format_instruction(dep)} (step {j}), which produces "
                                        f"{what}", f"move it after step {j}")
                if ins.op in COMPUTE_OPS:
                    last_compute = i
                    if ins.op in _WGRAD_OPS:
                        last_wgrad[ins.stage] = i
                elif ins.op is _REDUCE:
                    last_reduce = i
            # REDUCE/OPTIM must follow every backward of what they reduce/apply.
            for i, ins in enumerate(stream):
                if ins.op is _REDUCE:
                    last = last_compute if ins.stage == -1 else last_wgrad.get(ins.stage, -1)
                    what = "rank's compute" if ins.stage == -1 else f"weight gradients of stage {ins.stage}"
                elif ins.op is _OPTIM:
                    last, what = max(last_compute, last_reduce), "rank's compute and reductions"
                else:
                    continue
                if last > i:
                    raise self.fail(r, i, f"{format_instruction(ins)} comes before "
                                    f"{format_instruction(stream[last])} (step {last}); it must follow "
                                    f"all the {what}", f"move it after step {last}")

    # ------------------------------------------------------------------ 5. FIFO per rank pair

    def _check_fifo(self) -> None:
        for (a, b), sends in self.sends.items():
            recvs = self.recvs.get((a, b), [])
            for k, ((si, s), (ri, rv)) in enumerate(zip(sends, recvs), start=1):
                if s.message_key() != rv.message_key():
                    raise self.fail(
                        b, ri,
                        f"{format_instruction(rv)} is the {_ordinal(k)} receive from rank {a}, but "
                        f"rank {a}'s {_ordinal(k)} send to rank {b} is {format_instruction(s)} (step "
                        f"{si}); point-to-point messages match in issue order per rank pair (NCCL "
                        f"ignores tags)",
                        f"issue rank {a}'s sends to rank {b} in the order rank {b} receives them")

    # ------------------------------------------------------------------ 6. deadlock

    def _check_deadlock(self) -> None:
        streams = self.p.streams
        R = len(streams)
        pc = [0] * R
        queued: dict[tuple[int, int], int] = {}
        waiting_on: list[int | None] = [None] * R
        work = deque(range(R))
        while work:
            r = work.popleft()
            stream = streams[r]
            while pc[r] < len(stream):
                ins = stream[pc[r]]
                if ins.op in SEND_OPS:
                    queued[(r, ins.peer)] = queued.get((r, ins.peer), 0) + 1
                    if waiting_on[ins.peer] == r:
                        waiting_on[ins.peer] = None
                        work.append(ins.peer)
                elif ins.op in RECV_OPS:
                    pair = (ins.peer, r)
                    if not queued.get(pair):
                        waiting_on[r] = ins.peer
                        break
                    queued[pair] -= 1
                pc[r] += 1
        blocked = [r for r in range(R) if pc[r] < len(streams[r])]
        if not blocked:
            return
        # Each blocked rank waits on exactly one peer, itself blocked (every receive has a send).
        cycle: list[int] = []
        r: int | None = blocked[0]
        while r is not None and r not in cycle:
            cycle.append(r)
            r = waiting_on[r]
        cycle = cycle[cycle.index(r):] + [r] if r is not None else cycle
        waits = "; ".join(
            f"rank {b}, step {pc[b]} waits in {format_instruction(streams[b][pc[b]])} for rank "
            f"{waiting_on[b]}" for b in blocked)
        first = cycle[0]
        raise self.fail(
            first, pc[first],
            f"deadlock: no rank can progress ({waits}); wait cycle "
            + " -> ".join(f"rank {x}" for x in cycle),
            "issue the send that the first rank of the cycle waits for before that rank's receive")
