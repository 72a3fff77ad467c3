"""Executes one rank's instruction stream: a dispatch loop over a handler table.

Each stage's backward is its own autograd graph: a stage's floating-point inputs are detached
into fresh leaves at FWD, so BWD runs ``autograd.backward`` on the stage outputs with the grads
its consumers sent, and reads the input leaves' ``.grad`` to send upstream. The loss stage seeds
its backward with the microbatch's loss weight, so the accumulated parameter gradients equal
those of one backward over the whole batch. The zero-bubble split (BWD_I, then BWD_W) walks the
graph once in total: see :mod:`dipc.runtime.split_backward`.

Per-instruction cost: what a handler looks up (a stage's inputs, an edge's values and treespecs,
local consumers) is resolved once per step in ``__init__``; values that are plain tensors (nearly
all) skip pytree flatten/unflatten; each compute instruction first posts the receives that
follow it (:meth:`~dipc.runtime.transport.Transport.post_recv`), so their data arrives while it
computes.

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
from dipc.ir import COMPUTE_OPS, RECV_OPS, Instruction, Op, Program
from dipc.ir.recompute import recompute_plan
from dipc.passes.partition import StageSpec
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


def _wire(leaf: Any) -> torch.Tensor:
    return leaf.detach().contiguous() if isinstance(leaf, torch.Tensor) else to_wire(leaf)


@dataclass
class _Saved:
    outputs: dict[str, Any]
    # (value, producer stage, leaves needing grad, per-leaf row counts of each sub when joined from subs)
    grad_inputs: list[tuple[str, int, list[torch.Tensor], list[list[int]] | None]]
    loss: torch.Tensor | None = None
    weight_work: WeightGradWork | None = None   # what BWD_I leaves for BWD_W


@dataclass(frozen=True, slots=True)
class _Input:
    """One value a stage's FWD takes, resolved once per step (not per instruction)."""

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


class RankInterpreter:
    """State and handlers of one rank for one training step."""

    def __init__(self, rank: int, program: Program, stages: Sequence[StageSpec], microbatches: Sequence[Mapping],
                 loss_weights: Sequence[float], transport: Transport, treespecs: Mapping[str, Any],
                 optimizer_step: Callable[[], None] | None = None,
                 reduce_grads: Callable[[int], None] | None = None,
                 sub_batches: Mapping[tuple[str, int, int], Mapping[str, Any]] | None = None,
                 record_timeline: bool = False):
        self.rank = rank
        self.program = program
        self.stream = program.streams[rank]
        self.stages = stages
        self.microbatches = microbatches
        self.loss_weights = loss_weights
        self.transport = transport
        self.treespecs = treespecs
        self.optimizer_step = optimizer_step
        self.reduce_grads = reduce_grads
        self.sub_batches = sub_batches or {}
        self.pc = 0
        # keys: (stage, mb, sub); sub -1 = the whole microbatch
        self.inbox: dict[tuple[int, int, int], dict[str, Any]] = {}
        self.parts: dict[tuple[int, int, str], dict[int, Any]] = {}   # (consumer, mb, value) -> sub -> part
        self.loaded: dict[tuple[int, int, int], list[Any]] = {}
        self.saved: dict[tuple[int, int, int], _Saved] = {}
        self.out_grads: dict[tuple[int, int, int, str], list[torch.Tensor]] = {}
        self.grads_to_send: dict[tuple[int, int, int, int], list[torch.Tensor]] = {}  # (stage, mb, sub, producer)
        split_modalities = {name for name, _ in program.subs}
        self.split = {s.id: s.modality in split_modalities for s in stages}
        self.stats = StepStats(spans=[] if record_timeline else None)
        self._timed: dict[Op, Callable[[Instruction], None]] | None = None
        self.losses: dict[int, torch.Tensor] = {}
        # Everything the hot path looks up, resolved once per step instead of per instruction.
        self.edge_names = {(p, s.id): s.values_from(p) for s in stages for p in s.producers}
        mine = [s for s in stages if s.rank == rank]
        self.trainable = {s.id: [p for p in s.params if p.requires_grad] for s in mine}
        self.recomputing = set(recompute_plan(program))   # stages whose BWD_W walks from the outputs again
        self.param_nodes: dict[int, dict[Any, torch.Tensor]] = {}   # stage -> split_backward.param_nodes, per step
        self.inputs = {s.id: [_Input(n, p, self.split[p] and not self.split[s.id], n in s.grad_values)
                              for n, p in s.input_values] for s in mine}
        self.local_consumers = {
            s.id: [(c.id, [(n, n in s.grad_values) for n in self.edge_names[(s.id, c.id)]],
                    self.split[s.id] and not self.split[c.id])
                   for c in stages if s.id in c.producers and c.rank == rank]
            for s in mine}
        # values a consumer on this rank also reads (it aliases them): a send of those copies
        self.shared_values = {(s.id, n) for s in mine for _, names, _ in self.local_consumers[s.id] for n, _ in names}
        # per edge into a stage on this rank: (value, leaf count, treespec or None for a plain tensor)
        self.unflatten = {key: [(n, treespecs[n].num_leaves, None if treespecs[n].is_leaf() else treespecs[n])
                                for n in names]
                          for key, names in self.edge_names.items() if stages[key[1]].rank == rank}
        self.loss_seeds: dict[tuple[int, torch.dtype, torch.device], torch.Tensor] = {}
        # receives posted ahead: before each compute instruction, the receives up to the next one
        self.prepost = _receives_ahead(self.stream)
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
        progressed = False
        profiling = _profiler_enabled()   # label instructions only when someone records a trace
        # timing wraps the handlers, so the untimed loop pays one check per call, none per instruction
        spans = self.stats.spans
        handlers = self.handlers if spans is None else self._timed_handlers(spans)
        stream, prepost, post = self.stream, self.prepost, self.transport.post_recv
        while self.pc < len(stream):
            instr = stream[self.pc]
            try:
                ahead = prepost.get(self.pc)
                if ahead:
                    for r in ahead:
                        post(r, self.rank)
                if profiling:
                    with record_function(f"dipc:{instr}"):
                        handlers[instr.op](instr)
                else:
                    handlers[instr.op](instr)
            except WouldBlock:
                if until_blocked:
                    return progressed
                raise
            except RuntimeStepError:
                raise
            except Exception as e:
                raise RuntimeStepError(self.rank, self.pc, str(instr), f"{type(e).__name__}: {e}") from e
            self.pc += 1
            self.stats.instructions += 1
            progressed = True
        if self.losses:   # one device sync per step, not one per loss
            self.stats.losses.update(zip(self.losses, torch.stack(list(self.losses.values())).tolist()))
            self.losses.clear()
        return progressed

    def _timed_handlers(self, spans: list[tuple[int, int, Op, int, int, float, float]]
                        ) -> dict[Op, Callable[[Instruction], None]]:
        """The handler table with each handler wrapped to append its wall-clock span (built once).
        A receive that raises WouldBlock records nothing; its successful retry is the span."""
        if self._timed is None:
            clock = time.perf_counter

            def timed(handler: Callable[[Instruction], None]) -> Callable[[Instruction], None]:
                def run_timed(instr: Instruction) -> None:
                    start = clock()
                    handler(instr)
                    spans.append((self.rank, self.pc, instr.op, instr.stage, instr.mb, start, clock()))
                return run_timed

            self._timed = {op: timed(h) for op, h in self.handlers.items()}
        return self._timed

    # -- handlers ----------------------------------------------------------------------------
    def _load(self, i: Instruction) -> None:
        st = self.stages[i.stage]
        # keys were checked against the example batch when planning
        mb = self.microbatches[i.mb] if i.sub < 0 else self.sub_batches[(st.modality, i.mb, i.sub)]
        self.loaded[(i.stage, i.mb, i.sub)] = [mb[k] for k in st.input_keys]

    def _fwd(self, i: Instruction) -> None:
        st = self.stages[i.stage]
        unit = (i.stage, i.mb, i.sub)
        args = self.loaded.pop(unit, None) or []
        box = self.inbox.pop(unit, None)
        grad_inputs = []
        for inp in self.inputs[i.stage]:
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
                value = _attached(value)
                grad_inputs.append((inp.name, inp.producer, _grad_leaves(value), sizes))
            args.append(value)
        outs = st.module(*args)
        outputs = dict(zip(st.output_values, outs))
        loss = outs[-1] if st.has_loss else None
        if loss is not None:
            self.losses[i.mb] = loss.detach()
        self.saved[unit] = _Saved(outputs=outputs, grad_inputs=grad_inputs, loss=loss)
        for c, names, gathered in self.local_consumers[i.stage]:
            # same values a remote consumer would get: detached (the consumer re-attaches grad leaves)
            values = {n: outputs[n] if grad else _detached(outputs[n]) for n, grad in names}
            if gathered:
                for n, v in values.items():
                    self.parts.setdefault((c, i.mb, n), {})[i.sub] = v
            else:
                self.inbox.setdefault((c, i.mb, i.sub), {}).update(values)

    def _loss_seed(self, mb: int, loss: torch.Tensor) -> torch.Tensor:
        """The loss's backward seed, its microbatch's weight (one tensor per weight, dtype, device)."""
        key = (mb, loss.dtype, loss.device)
        seed = self.loss_seeds.get(key)
        if seed is None:
            seed = self.loss_seeds[key] = torch.tensor(self.loss_weights[mb], dtype=loss.dtype, device=loss.device)
        return seed

    def _backward_args(self, i: Instruction) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        st = self.stages[i.stage]
        saved = self.saved[(i.stage, i.mb, i.sub)]
        tensors, grads = [], []
        for name, value in saved.outputs.items():
            if name not in st.grad_values:
                continue
            g = self.out_grads.pop((i.stage, i.mb, i.sub, name), None)
            if g is None:
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
        per_producer: dict[tuple[int, int], list[torch.Tensor]] = {}
        at = 0
        for name, producer, leaves, sizes in saved.grad_inputs:
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
        tensors, grads = self._backward_args(i)
        if tensors:
            torch.autograd.backward(tensors, grads)
        del tensors, grads   # the graph's roots: _release frees the graph
        saved = self.saved.pop((i.stage, i.mb, i.sub))
        self._deliver_input_grads(i, saved, [l.grad for _, _, ls, _ in saved.grad_inputs for l in ls])
        self._release(saved)

    def _bwd_input(self, i: Instruction) -> None:
        tensors, grads = self._backward_args(i)
        saved = self.saved[(i.stage, i.mb, i.sub)]
        leaves = [l for _, _, ls, _ in saved.grad_inputs for l in ls]
        params = self.trainable[i.stage]
        nodes = self.param_nodes.get(i.stage)
        if nodes is None:
            nodes = self.param_nodes[i.stage] = param_nodes(params)
        input_grads, saved.weight_work = backward_input(tensors, grads, leaves, params, nodes=nodes,
                                                        rewalk=i.stage in self.recomputing)
        del tensors, grads, leaves
        self._deliver_input_grads(i, saved, input_grads)

    def _bwd_weight(self, i: Instruction) -> None:
        saved = self.saved.pop((i.stage, i.mb, i.sub))
        if saved.weight_work is not None:
            backward_weight(saved.weight_work)
        self._release(saved)

    @staticmethod
    def _release(saved: _Saved) -> None:
        """Drop a finished unit's outputs, input leaves and backward graph. Freeing the graph
        (C++ node destructors) is most of what a BWD costs outside autograd; it happens here, by
        name, so measurements can tell it from the interpreter's own work."""
        saved.outputs.clear()
        saved.grad_inputs.clear()
        saved.loss = None
        saved.weight_work = None

    def _send_act(self, i: Instruction) -> None:
        outputs = self.saved[(i.stage, i.mb, i.sub)].outputs
        wire = []
        for n in self.edge_names[(i.stage, i.other_stage)]:
            leaves = [_wire(l) for l in _leaves(outputs[n])]
            if (i.stage, n) in self.shared_values:   # a consumer here aliases it: send a copy it cannot change
                leaves = [l.clone() for l in leaves]
            wire.extend(leaves)
        self.transport.send(i, self.rank, wire)

    def _recv_act(self, i: Instruction) -> None:
        tensors = self.transport.recv(i, self.rank)
        leaves = [t if s.kind == "tensor" else from_wire(t, s) for t, s in zip(tensors, i.specs)]
        gathered = self.split[i.other_stage] and not self.split[i.stage]
        box = self.inbox.setdefault((i.stage, i.mb, i.sub), {}) if not gathered else {}
        at = 0
        for name, count, spec in self.unflatten[(i.other_stage, i.stage)]:
            box[name] = leaves[at] if spec is None else tree_unflatten(leaves[at:at + count], spec)
            at += count
        if gathered:   # one sub of a split producer: kept until the consumer's FWD joins them
            for name, value in box.items():
                self.parts.setdefault((i.stage, i.mb, name), {})[i.sub] = value

    def _send_grad(self, i: Instruction) -> None:
        grads = self.grads_to_send.pop((i.stage, i.mb, i.sub, i.other_stage))
        self.transport.send(i, self.rank, [g.detach().contiguous() for g in grads])

    def _recv_grad(self, i: Instruction) -> None:
        grads = self.transport.recv(i, self.rank)
        outputs = self.saved[(i.stage, i.mb, i.sub)].outputs
        consumer = self.stages[i.other_stage]
        at = 0
        for name in self.edge_names[(i.stage, i.other_stage)]:
            if name not in consumer.grad_values:
                continue
            n = len(_grad_leaves(outputs[name]))
            self._accumulate(i.stage, i.mb, i.sub, name, grads[at:at + n])
            at += n

    def _reduce(self, i: Instruction) -> None:
        """Start the data-parallel gradient all-reduce of a stage (a no-op with one replica)."""
        if self.reduce_grads is not None:
            self.reduce_grads(i.stage)

    def _optim(self, i: Instruction) -> None:
        self.transport.finish()
        if self.optimizer_step is not None:
            self.optimizer_step()


def _receives_ahead(stream: Sequence[Instruction]) -> dict[int, list[Instruction]]:
    """pc -> the receives to post before running ``stream[pc]``: at each compute instruction,
    every receive between it and the next compute (so their data arrives while it computes), and
    at pc 0 the receives before the first compute. One compute of look-ahead bounds the extra
    receive buffers alive at once to what the next compute consumes."""
    out: dict[int, list[Instruction]] = {}
    at = 0
    for pc, instr in enumerate(stream):
        if instr.op in COMPUTE_OPS:
            at = pc
        elif instr.op in RECV_OPS:
            out.setdefault(at, []).append(instr)
    return out
