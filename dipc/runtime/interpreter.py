"""Executes one rank's instruction stream: a dispatch loop over a handler table.

Each stage's backward is its own autograd graph: a stage's floating-point inputs are detached
into fresh leaves at FWD, so BWD runs ``autograd.backward`` on the stage outputs with the grads
its consumers sent, and reads the input leaves' ``.grad`` to send upstream. The loss stage seeds
its backward with the microbatch's loss weight, so the accumulated parameter gradients equal
those of one backward over the whole batch. The zero-bubble split (BWD_I, then BWD_W) walks the
graph once in total: see :mod:`dipc.runtime.split_backward`.

Per-instruction cost: everything a handler looks up (a stage's inputs and local consumers, an
edge's values, output indices and treespecs, dictionary keys) is resolved once per program and
rank into per-pc operands (:class:`_RankPlan`, cached with the program, so a steady run resolves
each stream once); handlers index ``self._args[self.pc]`` and pop per-step dictionaries. Values that
are plain tensors (nearly all) skip pytree flatten/unflatten; the loss seeds of a step are one
tensor; receives are posted a few compute instructions before they are needed
(:func:`receives_ahead`, :meth:`~dipc.runtime.transport.Transport.post_recv`, as the transport's
``recv_lookahead`` and ``peer_ordered_posts`` say), so their data arrives while the rank computes.
What remains per instruction is mostly the torch calls a handler must make (detach, requires_grad_,
the transport's copy or P2P call) and, in BWD, autograd's own destruction of the finished graph.

Sub-microbatches: state is keyed by (stage, mb, sub), sub ``-1`` for a whole microbatch. A LOAD
with a sub reads that sub's slice (``sub_batches``); a stage outside a split modality gathers the
values of a split producer per sub and joins them (dim-0 concatenation,
:func:`~dipc.passes.submicrobatch.join_values`) before its FWD, and its backward cuts the gradient
of the joined value back into one piece per sub (same row counts), sent or accumulated per sub.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import torch
from torch.autograd.profiler import record_function
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

from dipc.errors import RuntimeStepError
from dipc.ir import Instruction, Op, Program
from dipc.ir.posting import receives_ahead
from dipc.ir.recompute import expand_recompute, is_per_microbatch, recompute_plan
from dipc.passes.partition import StageSpec
from dipc.runtime.recompute import microbatch_switches
from dipc.runtime.split_backward import WeightGradWork, backward_input, backward_weight, param_nodes
from dipc.runtime.transport import Transport, WouldBlock
from dipc.passes.submicrobatch import join_values
from dipc.passes.values import from_wire, is_grad_leaf, to_wire


def _profiler_enabled() -> bool:
    return torch.autograd.profiler._is_profiler_enabled


# Values crossing a stage boundary are pytrees, but nearly always one tensor: these helpers take
# the tensor case without pytree's flatten/unflatten (the per-instruction cost of the hot path).
def _detach(leaf: Any) -> Any:
    return leaf.detach() if isinstance(leaf, torch.Tensor) else leaf


def _detached(value: Any) -> Any:
    return value.detach() if isinstance(value, torch.Tensor) else tree_map(_detach, value)


def _attach_leaf(leaf: Any) -> Any:
    return leaf.detach().requires_grad_() if is_grad_leaf(leaf) else leaf


def _attached(value: Any) -> Any:
    """``value`` with every floating-point tensor replaced by a fresh leaf that takes a gradient."""
    return _attach_leaf(value) if isinstance(value, torch.Tensor) else tree_map(_attach_leaf, value)


def _leaves(value: Any) -> list[Any]:
    return [value] if isinstance(value, torch.Tensor) else tree_flatten(value)[0]


def _grad_leaves(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value] if value.is_floating_point() else []
    return [l for l in tree_flatten(value)[0] if is_grad_leaf(l)]


class _Saved:
    """What a unit's FWD keeps for its backward and sends."""

    __slots__ = ("outputs", "grad_inputs", "loss", "weight_work")

    def __init__(self, outputs: Sequence[Any],
                 grad_inputs: list[tuple[str, int, list[torch.Tensor], list[list[int]] | None]],
                 loss: torch.Tensor | None) -> None:
        self.outputs = outputs            # the stage's outputs, in StageSpec.output_values order
        # (value, producer stage, leaves needing grad, per-leaf row counts of each sub when joined from subs)
        self.grad_inputs = grad_inputs
        self.loss = loss
        self.weight_work: WeightGradWork | None = None   # what BWD_I leaves for BWD_W


@dataclass(frozen=True, slots=True)
class _Input:
    """One value a stage's FWD takes, resolved once per program (not per instruction)."""

    name: str
    producer: int
    gathered: bool     # joined from a split producer's per-sub parts
    needs_grad: bool


@dataclass
class StepStats:
    losses: dict[int, float] = field(default_factory=dict)   # microbatch -> unweighted loss
    instructions: int = 0
    # (rank, pc, op, stage, mb, start, end) per executed instruction, time.perf_counter() seconds;
    # None unless the interpreter was created with record_timeline=True
    spans: list[tuple[int, int, Op, int, int, float, float]] | None = None


class _RankPlan:
    """Everything about one rank's stream that does not change between steps running the same
    program: per stage the inputs, local consumers and edges; per instruction (by pc) its operands
    with every name, index and dictionary key looked up in advance. Built once per program and rank
    (:func:`_rank_plan` caches it), so a step's handlers only index lists and pop dictionaries."""

    def __init__(self, rank: int, program: Program, stages: Sequence[StageSpec], treespecs: Mapping[str, Any]):
        self.stream = program.streams[rank]
        split_modalities = {name for name, _ in program.subs}
        self.split = {s.id: s.modality in split_modalities for s in stages}
        self.edge_names = {(p, s.id): s.values_from(p) for s in stages for p in s.producers}
        mine = [s for s in stages if s.rank == rank]
        choice = recompute_plan(program)
        # (stage, mb) units whose BWD_W walks from the outputs again (they checkpoint some layer)
        self.recomputing = set(expand_recompute(choice, program.num_microbatches))
        self.per_microbatch = is_per_microbatch(choice)   # FWDs switch checkpointing per microbatch
        self.inputs = {s.id: [_Input(n, p, self.split[p] and not self.split[s.id], n in s.grad_values)
                              for n, p in s.input_values] for s in mine}
        out_index = {s.id: {n: k for k, n in enumerate(s.output_values)} for s in stages}
        # per stage on this rank: (consumer, [(value, output index, carries grad)], gathered) per local consumer
        self.local_consumers = {
            s.id: [(c.id, [(n, out_index[s.id][n], n in s.grad_values) for n in self.edge_names[(s.id, c.id)]],
                    self.split[s.id] and not self.split[c.id])
                   for c in stages if s.id in c.producers and c.rank == rank]
            for s in mine}
        # values a consumer on this rank also reads (it aliases them): a send of those copies
        shared = {(s.id, n) for s in mine for _, names, _ in self.local_consumers[s.id] for n, _, _ in names}
        # receives posted ahead (receives_ahead), per transport policy (look-ahead, peer order)
        self._prepost: dict[tuple[int, bool], dict[int, list[Instruction]]] = {}
        self.args: list[Any] = []
        for instr in self.stream:
            op, st = instr.op, stages[instr.stage] if instr.stage >= 0 else None
            unit = (instr.stage, instr.mb, instr.sub)
            if op is Op.LOAD:
                arg: Any = (unit, tuple(st.input_keys), (st.modality, instr.mb, instr.sub) if instr.sub >= 0 else None)
            elif op is Op.FWD:
                arg = (unit, st, self.inputs[instr.stage], self.local_consumers[instr.stage])
            elif op in (Op.BWD, Op.BWD_I):
                # (output index, key of its gradients in out_grads) per output that carries a gradient
                arg = (unit, [(k, (*unit, n)) for k, n in enumerate(st.output_values) if n in st.grad_values])
            elif op is Op.SEND_ACT:
                # (output index, a plain tensor, aliased here) per value; a Python scalar is a pytree
                # leaf too but not a plain tensor: it goes the general way, as a 0-d tensor
                values = [(out_index[instr.stage][n], treespecs[n].is_leaf() and n not in st.scalar_outputs,
                           (instr.stage, n) in shared)
                          for n in self.edge_names[(instr.stage, instr.other_stage)]]
                # output indices when every value is a plain tensor no local consumer aliases (the usual case)
                simple = [k for k, _, _ in values] if all(p and not sh for _, p, sh in values) else None
                arg = (unit, values, simple)
            elif op is Op.RECV_ACT:
                gathered = self.split[instr.other_stage] and not self.split[instr.stage]
                names = [(n, treespecs[n].num_leaves, None if treespecs[n].is_leaf() else treespecs[n])
                         for n in self.edge_names[(instr.other_stage, instr.stage)]]
                arg = (unit, gathered, names, all(s.kind == "tensor" for s in instr.specs))
            elif op is Op.SEND_GRAD:
                arg = (instr.stage, instr.mb, instr.sub, instr.other_stage)
            elif op is Op.RECV_GRAD:
                consumer = stages[instr.other_stage]
                names = [(n, out_index[instr.stage][n]) for n in self.edge_names[(instr.stage, instr.other_stage)]
                         if n in consumer.grad_values]
                # plain-tensor values each carry exactly one gradient when the message has one per value
                one_each = len(instr.specs) == len(names) and all(treespecs[n].is_leaf() for n, _ in names)
                arg = (unit, [(k, (*unit, n)) for n, k in names], one_each)
            else:
                arg = unit
            self.args.append(arg)

    def prepost(self, lookahead: int, peer_ordered: bool) -> dict[int, list[Instruction]]:
        """:func:`receives_ahead` of this stream, computed once per policy."""
        key = (lookahead, peer_ordered)
        hit = self._prepost.get(key)
        if hit is None:
            hit = self._prepost[key] = receives_ahead(self.stream, lookahead, peer_ordered)
        return hit


_PLANS: dict[tuple[int, int, int], tuple[Program, Sequence[StageSpec], Mapping[str, Any], _RankPlan]] = {}
_PLAN_CACHE_SIZE = 32


def _rank_plan(rank: int, program: Program, stages: Sequence[StageSpec], treespecs: Mapping[str, Any]) -> _RankPlan:
    """The cached :class:`_RankPlan` of ``program``'s stream for ``rank`` (programs recur: the
    pipeline caches them per batch shape, so a steady run resolves each stream once)."""
    key = (id(program), id(stages), rank)
    hit = _PLANS.get(key)
    if hit is not None and hit[0] is program and hit[1] is stages and hit[2] is treespecs:
        return hit[3]
    plan = _RankPlan(rank, program, stages, treespecs)
    if len(_PLANS) >= _PLAN_CACHE_SIZE:
        _PLANS.pop(next(iter(_PLANS)))   # oldest first
    _PLANS[key] = (program, stages, treespecs, plan)
    return plan


class RankInterpreter:
    """State and handlers of one rank for one training step.

    ``handlers`` maps each opcode to a callable taking the instruction; callers may wrap entries
    (timing, fault injection) before the first :meth:`run`, which binds them to the stream."""

    def __init__(self, rank: int, program: Program, stages: Sequence[StageSpec], microbatches: Sequence[Mapping],
                 loss_weights: Sequence[float], transport: Transport, treespecs: Mapping[str, Any],
                 optimizer_step: Callable[[], None] | None = None,
                 reduce_grads: Callable[[int], None] | None = None,
                 sub_batches: Mapping[tuple[str, int, int], Mapping[str, Any]] | None = None,
                 record_timeline: bool = False):
        self.rank = rank
        self.program = program
        self.stages = stages
        self.microbatches = microbatches
        self.loss_weights = loss_weights
        self.transport = transport
        self.treespecs = treespecs
        self.optimizer_step = optimizer_step
        self.reduce_grads = reduce_grads
        self.sub_batches = sub_batches or {}
        self.pc = 0
        plan = self.plan = _rank_plan(rank, program, stages, treespecs)
        self.stream = plan.stream
        self.split = plan.split
        self.edge_names = plan.edge_names
        self.inputs = plan.inputs
        self.local_consumers = plan.local_consumers
        self.recomputing = plan.recomputing
        # stage -> per mb, the checkpointing modes its FWD sets (stages whose choice varies by mb)
        self.switches = microbatch_switches(program, stages) if plan.per_microbatch else {}
        self.prepost = plan.prepost(transport.recv_lookahead, transport.peer_ordered_posts)
        self._args = plan.args
        # keys: (stage, mb, sub); sub -1 = the whole microbatch
        self.inbox: dict[tuple[int, int, int], dict[str, Any]] = {}
        self.parts: dict[tuple[int, int, str], dict[int, Any]] = {}   # (consumer, mb, value) -> sub -> part
        self.loaded: dict[tuple[int, int, int], list[Any]] = {}
        self.saved: dict[tuple[int, int, int], _Saved] = {}
        self.out_grads: dict[tuple[int, int, int, str], list[torch.Tensor]] = {}
        self.grads_to_send: dict[tuple[int, int, int, int], list[torch.Tensor]] = {}  # (stage, mb, sub, producer)
        self.stats = StepStats(spans=[] if record_timeline else None)
        self.losses: dict[int, torch.Tensor] = {}
        self.trainable = {s.id: [p for p in s.params if p.requires_grad] for s in stages if s.rank == rank}
        self.param_nodes: dict[int, dict[Any, torch.Tensor]] = {}   # stage -> split_backward.param_nodes, per step
        self._seeds: dict[tuple[torch.dtype, torch.device], list[torch.Tensor]] = {}
        self._graves: list[_Saved] = []   # units whose backward ran, freed by release_finished
        self._calls: list[Callable[[Instruction], None]] | None = None
        self.handlers: dict[Op, Callable[[Instruction], None]] = {
            Op.LOAD: self._load, Op.FWD: self._fwd, Op.BWD: self._bwd, Op.BWD_I: self._bwd_input,
            Op.BWD_W: self._bwd_weight, Op.SEND_ACT: self._send_act, Op.RECV_ACT: self._recv_act,
            Op.SEND_GRAD: self._send_grad, Op.RECV_GRAD: self._recv_grad, Op.REDUCE: self._reduce,
            Op.OPTIM: self._optim,
        }

    # -- driving -----------------------------------------------------------------------------
    @property
    def done(self) -> bool:
        return self.pc >= len(self.stream)

    def run(self, until_blocked: bool = False) -> bool:
        """Execute instructions; with ``until_blocked`` stop at a receive that is not ready yet.
        Returns whether any instruction ran."""
        calls = self._calls
        if calls is None:   # bind the handler table to the stream once (timing wraps the handlers)
            spans = self.stats.spans
            handlers = self.handlers if spans is None else self._timed_handlers(spans)
            calls = self._calls = [handlers[instr.op] for instr in self.stream]
        profiling = _profiler_enabled()   # label instructions only when someone records a trace
        stream, prepost, post, rank = self.stream, self.prepost, self.transport.post_recv, self.rank
        pc = start = self.pc
        end = len(stream)
        try:
            while pc < end:
                ahead = prepost.get(pc)
                if ahead:
                    for r in ahead:
                        post(r, rank)
                if profiling:
                    with record_function(f"dipc:{stream[pc]}"):
                        calls[pc](stream[pc])
                else:
                    calls[pc](stream[pc])
                pc = self.pc = pc + 1
        except WouldBlock:
            if not until_blocked:
                raise
        except RuntimeStepError:
            raise
        except Exception as e:
            raise RuntimeStepError(rank, pc, str(stream[pc]), f"{type(e).__name__}: {e}") from e
        finally:
            self.stats.instructions += pc - start
        if pc >= end and self._graves:
            self.release_finished()
        if pc >= end and self.losses:   # one device sync per step, not one per loss
            self.stats.losses.update(zip(self.losses, torch.stack(list(self.losses.values())).tolist()))
            self.losses.clear()
        return pc > start

    def _timed_handlers(self, spans: list[tuple[int, int, Op, int, int, float, float]]
                        ) -> dict[Op, Callable[[Instruction], None]]:
        """The handler table with each handler wrapped to append its wall-clock span.
        A receive that raises WouldBlock records nothing; its successful retry is the span."""
        clock = time.perf_counter

        def timed(handler: Callable[[Instruction], None]) -> Callable[[Instruction], None]:
            def run_timed(instr: Instruction) -> None:
                start = clock()
                handler(instr)
                spans.append((self.rank, self.pc, instr.op, instr.stage, instr.mb, start, clock()))
            return run_timed

        return {op: timed(h) for op, h in self.handlers.items()}

    # -- handlers (each reads its operands, resolved in advance, from self._args[self.pc]) ------
    def _load(self, i: Instruction) -> None:
        unit, keys, sub_key = self._args[self.pc]
        # keys were checked against the example batch when planning
        mb = self.microbatches[i.mb] if sub_key is None else self.sub_batches[sub_key]
        self.loaded[unit] = [mb[k] for k in keys]

    def _fwd(self, i: Instruction) -> None:
        if self._graves:
            self.release_finished()
        unit, st, inputs, consumers = self._args[self.pc]
        if self.switches:
            flags = self.switches.get(i.stage)
            if flags is not None:   # this stage's choice varies by microbatch: set this one's modes
                for wrapper, mode in flags[i.mb]:
                    wrapper.mode = mode
        args = self.loaded.pop(unit, None) or []
        box = self.inbox.pop(unit, None)
        grad_inputs = []
        for inp in inputs:
            sizes = None
            if inp.gathered:
                parts = self.parts.pop((i.stage, i.mb, inp.name))
                pieces = [parts[k] for k in sorted(parts)]
                value = join_values(pieces, f"stage {i.stage} input {inp.name!r}")
                sizes = [[l.shape[0] for l in _grad_leaves(p)] for p in pieces]
                sizes = [list(col) for col in zip(*sizes)]   # per grad leaf: rows of each sub
            else:
                value = box[inp.name]   # type: ignore[index]
            if inp.needs_grad:
                if isinstance(value, torch.Tensor):   # nearly always: skip pytree
                    if value.is_floating_point():
                        value = value.detach().requires_grad_()
                        leaves = [value]
                    else:
                        leaves = []
                else:
                    value = _attached(value)
                    leaves = _grad_leaves(value)
                grad_inputs.append((inp.name, inp.producer, leaves, sizes))
            args.append(value)
        outs = st.module(*args)
        loss = outs[-1] if st.has_loss else None
        if loss is not None:
            self.losses[i.mb] = loss.detach()
        self.saved[unit] = _Saved(outs, grad_inputs, loss)
        for c, names, gathered in consumers:
            # same values a remote consumer would get: detached (the consumer re-attaches grad leaves)
            values = {n: outs[k] if grad else _detached(outs[k]) for n, k, grad in names}
            if gathered:
                for n, v in values.items():
                    self.parts.setdefault((c, i.mb, n), {})[i.sub] = v
            else:
                self.inbox.setdefault((c, i.mb, i.sub), {}).update(values)

    def _loss_seed(self, mb: int, loss: torch.Tensor) -> torch.Tensor:
        """The loss's backward seed, its microbatch's weight: one tensor holding every weight per
        dtype and device, made at the first backward of the step, then a view per microbatch."""
        key = (loss.dtype, loss.device)
        seeds = self._seeds.get(key)
        if seeds is None:
            seeds = self._seeds[key] = list(torch.tensor(self.loss_weights, dtype=loss.dtype, device=loss.device)
                                            .unbind())
        return seeds[mb]

    def _backward_args(self, i: Instruction, saved: _Saved) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        _, grad_outputs = self._args[self.pc]
        tensors, grads = [], []
        pop = self.out_grads.pop
        for k, key in grad_outputs:
            g = pop(key, None)
            if g is None:
                continue
            value = saved.outputs[k]
            if isinstance(value, torch.Tensor):
                if value.requires_grad:   # a float output no gradient reaches keeps requires_grad False
                    tensors.append(value)
                    grads.append(g[0])
                continue
            for leaf, grad in zip(_grad_leaves(value), g):
                if leaf.requires_grad:
                    tensors.append(leaf)
                    grads.append(grad)
        loss = saved.loss
        if loss is not None and loss.requires_grad and self.loss_weights[i.mb] != 0:
            tensors.append(loss)
            grads.append(self._loss_seed(i.mb, loss))
        return tensors, grads

    def _deliver_input_grads(self, i: Instruction, saved: _Saved,
                             leaf_grads: Sequence[torch.Tensor | None]) -> None:
        """Send or accumulate the gradients of the stage's input leaves (``leaf_grads`` in the
        order of ``saved.grad_inputs``' leaves; ``None``: the leaf took no gradient)."""
        grad_inputs = saved.grad_inputs
        if len(grad_inputs) == 1 and grad_inputs[0][3] is None:   # one input value from one producer
            name, producer, leaves, _ = grad_inputs[0]
            gs = [g if g is not None else torch.zeros_like(l) for g, l in zip(leaf_grads, leaves)]
            if self.stages[producer].rank == self.rank:
                self._accumulate(producer, i.mb, i.sub, name, gs)
            else:
                self.grads_to_send[(i.stage, i.mb, i.sub, producer)] = gs
            return
        per_producer: dict[tuple[int, int], list[torch.Tensor]] = {}
        at = 0
        for name, producer, leaves, sizes in grad_inputs:
            gs = [g if g is not None else torch.zeros_like(l) for g, l in zip(leaf_grads[at:at + len(leaves)], leaves)]
            at += len(leaves)
            if sizes is None:   # the producer's own unit: same sub as this one
                per_sub = {i.sub: gs}
            else:               # joined from subs: cut each leaf's gradient back into its subs' rows
                cuts = [torch.split(g, rows, dim=0) for g, rows in zip(gs, sizes)]
                per_sub = {k: [c[k] for c in cuts] for k in range(len(sizes[0]) if sizes else 0)}
            for k, g_k in per_sub.items():
                if self.stages[producer].rank == self.rank:
                    self._accumulate(producer, i.mb, k, name, g_k)
                else:
                    per_producer.setdefault((producer, k), []).extend(g_k)
        for (producer, k), gs in per_producer.items():
            self.grads_to_send[(i.stage, i.mb, k, producer)] = gs

    def _accumulate(self, stage: int, mb: int, sub: int, name: str, grads: list[torch.Tensor]) -> None:
        key = (stage, mb, sub, name)
        if key in self.out_grads:
            self.out_grads[key] = [a + b for a, b in zip(self.out_grads[key], grads)]
        else:
            self.out_grads[key] = grads

    def _bwd(self, i: Instruction) -> None:
        if self._graves:
            self.release_finished()
        saved = self.saved.pop(self._args[self.pc][0])
        tensors, grads = self._backward_args(i, saved)
        if tensors:
            torch.autograd.backward(tensors, grads)
        del tensors, grads   # the graph's roots: _release frees the graph
        self._deliver_input_grads(i, saved, [l.grad for _, _, ls, _ in saved.grad_inputs for l in ls])
        self._graves.append(saved)   # freed after the sends that follow (see release_finished)

    def _bwd_input(self, i: Instruction) -> None:
        if self._graves:
            self.release_finished()
        saved = self.saved[self._args[self.pc][0]]
        tensors, grads = self._backward_args(i, saved)
        leaves = [l for _, _, ls, _ in saved.grad_inputs for l in ls]
        params = self.trainable[i.stage]
        nodes = self.param_nodes.get(i.stage)
        if nodes is None:
            nodes = self.param_nodes[i.stage] = param_nodes(params)
        input_grads, saved.weight_work = backward_input(tensors, grads, leaves, params, nodes=nodes,
                                                        rewalk=(i.stage, i.mb) in self.recomputing)
        del tensors, grads, leaves
        self._deliver_input_grads(i, saved, input_grads)

    def _bwd_weight(self, i: Instruction) -> None:
        if self._graves:
            self.release_finished()
        saved = self.saved.pop(self._args[self.pc])
        if saved.weight_work is not None:
            backward_weight(saved.weight_work)
        self._graves.append(saved)

    def release_finished(self) -> None:
        """Free the units whose backward has run. Deferred from BWD / BWD_W to the next compute
        instruction, a receive that has to wait, or the end of the stream: freeing a graph takes
        tens to hundreds of microseconds, and the gradient sends that follow a BWD are what the
        upstream rank waits for, so they go first. Memory is unchanged where it peaks (inside
        compute): the next compute frees before it allocates."""
        graves = self._graves
        while graves:
            self._release(graves.pop())

    @staticmethod
    def _release(saved: _Saved) -> None:
        """Drop a finished unit's outputs, input leaves and backward graph. Freeing the graph
        (C++ node destructors) is most of what a BWD costs outside autograd; it happens here, by
        name, so measurements can tell it from the interpreter's own work."""
        saved.outputs = ()
        saved.grad_inputs = []
        saved.loss = None
        saved.weight_work = None

    def _send_act(self, i: Instruction) -> None:
        unit, values, simple = self._args[self.pc]
        outputs = self.saved[unit].outputs
        if simple is not None:   # the transport detaches and copies what it must
            self.transport.send(i, self.rank, [outputs[k] for k in simple])
            return
        wire: list[torch.Tensor] = []
        for k, plain, shared in values:
            value = outputs[k]
            # the transport detaches and copies what it must; a plain tensor goes as it is
            leaves = [value] if plain else [l if isinstance(l, torch.Tensor) else to_wire(l) for l in _leaves(value)]
            if shared:   # a consumer here aliases it: send a copy it cannot change
                leaves = [l.detach().clone() for l in leaves]
            wire.extend(leaves)
        self.transport.send(i, self.rank, wire)

    def _recv_act(self, i: Instruction) -> None:
        unit, gathered, names, all_tensors = self._args[self.pc]
        leaves = self.transport.recv(i, self.rank)
        if not all_tensors:
            leaves = [t if s.kind == "tensor" else from_wire(t, s) for t, s in zip(leaves, i.specs)]
        box = self.inbox.setdefault(unit, {}) if not gathered else {}
        at = 0
        for name, count, spec in names:
            box[name] = leaves[at] if spec is None else tree_unflatten(leaves[at:at + count], spec)
            at += count
        if gathered:   # one sub of a split producer: kept until the consumer's FWD joins them
            for name, value in box.items():
                self.parts.setdefault((i.stage, i.mb, name), {})[i.sub] = value

    def _send_grad(self, i: Instruction) -> None:
        self.transport.send(i, self.rank, self.grads_to_send.pop(self._args[self.pc]))

    def _recv_grad(self, i: Instruction) -> None:
        unit, names, one_each = self._args[self.pc]
        grads = self.transport.recv(i, self.rank)
        if one_each:
            for at, (_, key) in enumerate(names):
                self._accumulate(*key, grads[at:at + 1])
            return
        outputs = self.saved[unit].outputs
        at = 0
        for k, key in names:
            n = len(_grad_leaves(outputs[k]))
            self._accumulate(*key, grads[at:at + n])
            at += n

    def _reduce(self, i: Instruction) -> None:
        """Start the data-parallel gradient all-reduce of a stage (a no-op with one replica)."""
        if self.reduce_grads is not None:
            self.reduce_grads(i.stage)

    def _optim(self, i: Instruction) -> None:
        self.release_finished()
        self.transport.finish()
        if self.optimizer_step is not None:
            self.optimizer_step()
