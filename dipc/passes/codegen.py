"""Lower per-rank compute orders to a full :class:`~dipc.ir.program.Program`.

The lowering is a short pipeline of pure steps, top to bottom:

1. ``_expand_rank``   — around every compute action, add the LOAD, the receives it waits for
                         (placed right before it) and the sends it produces (right after it);
2. ``fix_recv_order`` — reorder receives so that, per ordered rank pair, they come in the order
                         the peer sends them (NCCL and gloo match point-to-point messages by
                         order, not by tag);
3. the optimizer step — one OPTIM at the end of every rank (``add_optim``).

Receives carry the tensor specs the plan knows (``specs`` callback), so no shape handshake is
needed at run time. Example::

    >>> from dipc.ir import StageInfo
    >>> stages = [StageInfo(id=0, rank=0, loads=("input_ids",)),
    ...           StageInfo(id=1, rank=1, producers=(0,), grad_producers=(0,), has_loss=True)]
    >>> program = build_program(stages, 2, 2, "1f1b")
    >>> [i.op.value for i in program.streams[1]][:4]
    ['RECV_ACT', 'FWD', 'BWD', 'SEND_GRAD']

Not handled here: gradient reduction across data-parallel replicas (REDUCE), and posting
receives early to overlap communication (receives sit right before the compute that needs them;
sends are non-blocking, so that costs latency, never correctness).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

from dipc.errors import ScheduleError
from dipc.ir.instructions import Instruction, Op, TensorSpec
from dipc.ir.program import Program, StageInfo
from dipc.ir.program import sub_indices
from dipc.passes.schedules import ComputeAction, expand_subs, format_compute_orders, get_schedule

# Op.X is a slow class-attribute lookup on Python 3.11 enums, and these loops run per instruction
(_BWD, _BWD_I, _BWD_W, _FWD, _LOAD, _OPTIM, _RECV_ACT, _RECV_GRAD, _REDUCE, _SEND_ACT,
 _SEND_GRAD) = (Op.BWD, Op.BWD_I, Op.BWD_W, Op.FWD, Op.LOAD, Op.OPTIM, Op.RECV_ACT, Op.RECV_GRAD, Op.REDUCE,
                Op.SEND_ACT, Op.SEND_GRAD)

__all__ = ["SpecsFn", "build_program", "fix_recv_order", "lower"]

SpecsFn = Callable[[str, int, int, int, int], tuple[TensorSpec, ...]]
"""``specs(kind, mb, producer_stage, consumer_stage, sub)`` -> the leaf specs of that message;
``kind`` is ``"act"`` (producer -> consumer) or ``"grad"`` (consumer -> producer); ``sub`` is the
producer's sub-microbatch (``-1`` when the producer is not split)."""

_MessageKey = tuple[str, int, int, int, int]
_SEND_OPS = (_SEND_ACT, _SEND_GRAD)
_RECV_OPS = (_RECV_ACT, _RECV_GRAD)


def _no_specs(kind: str, mb: int, producer: int, consumer: int, sub: int) -> tuple[TensorSpec, ...]:
    return ()


def _expand_rank(
    rank: int,
    order: Sequence[ComputeAction],
    stages: Sequence[StageInfo],
    consumers: Sequence[tuple[int, ...]],
    grad_consumers: Sequence[tuple[int, ...]],
    specs: SpecsFn,
    subs: tuple[tuple[str, tuple[int, ...]], ...] = (),
) -> list[Instruction]:
    """One rank's compute order with its loads, receives and sends around each action.

    With sub-microbatches, a FWD of a stage that is not split receives every sub of a split
    producer (in sub order), and its backward sends one gradient per sub; a split stage's
    messages carry its own sub."""
    out: list[Instruction] = []
    split_modalities = {name for name, _ in subs}

    def msg_subs(p: int, c: int, m: int, j: int) -> range | tuple[int]:
        """The subs of edge p -> c that consumer unit (m, j) reads (a split consumer: its own)."""
        return (j,) if stages[c].modality in split_modalities else sub_indices(subs, stages[p].modality, m)

    for step, action in enumerate(order):
        s, m, j = action.stage, action.mb, action.sub
        if not 0 <= s < len(stages):
            raise ScheduleError(f"rank {rank}, step {step}: {action} names stage {s}, which does not exist. "
                                f"Fix: schedule only stages 0..{len(stages) - 1}.")
        st = stages[s]
        if st.rank != rank:
            raise ScheduleError(
                f"rank {rank}, step {step}: {action} runs stage {s}, which lives on rank {st.rank}. "
                "Fix: put each stage's compute in its own rank's order."
            )
        if action.op == _FWD:
            if st.loads:
                out.append(Instruction(op=_LOAD, stage=s, mb=m, sub=j))
            for p in st.producers:
                peer = stages[p].rank
                if peer != rank:
                    for k in msg_subs(p, s, m, j):
                        out.append(Instruction(op=_RECV_ACT, stage=s, mb=m, sub=k, other_stage=p, peer=peer,
                                               specs=tuple(specs("act", m, p, s, k))))
            out.append(Instruction(op=_FWD, stage=s, mb=m, sub=j))
            for c in consumers[s]:
                peer = stages[c].rank
                if peer != rank:
                    out.append(Instruction(op=_SEND_ACT, stage=s, mb=m, sub=j, other_stage=c, peer=peer))
        elif action.op in (_BWD, _BWD_I):
            for c in grad_consumers[s]:
                peer = stages[c].rank
                if peer != rank:
                    out.append(Instruction(op=_RECV_GRAD, stage=s, mb=m, sub=j, other_stage=c, peer=peer,
                                           specs=tuple(specs("grad", m, s, c, j))))
            out.append(Instruction(op=action.op, stage=s, mb=m, sub=j))
            for p in st.grad_producers:
                peer = stages[p].rank
                if peer != rank:
                    for k in msg_subs(p, s, m, j):
                        out.append(Instruction(op=_SEND_GRAD, stage=s, mb=m, sub=k, other_stage=p, peer=peer))
        else:  # BWD_W: local only
            out.append(Instruction(op=action.op, stage=s, mb=m, sub=j))
    return out


def fix_recv_order(streams: Sequence[Sequence[Instruction]]) -> tuple[tuple[Instruction, ...], ...]:
    """Reorder receives so each rank receives from each peer in the order that peer sends.

    Walk rank b's stream; when a receive needs message k from rank a while messages that a
    sends before k are still unreceived, those receives move to right here, just before it
    (in a's send order). This never adds a wait: sends are non-blocking and a sends them before
    k, so they have arrived by the time k has. Returns new streams; the input is not modified.
    """
    num_ranks = len(streams)
    # send order per ordered pair (a -> b), and each message's position in it
    sent: dict[tuple[int, int], list[_MessageKey]] = {}
    for a, stream in enumerate(streams):
        for ins in stream:
            if ins.op in _SEND_OPS:
                sent.setdefault((a, ins.peer), []).append(ins.message_key())
    position = {pair: {key: i for i, key in enumerate(keys)} for pair, keys in sent.items()}

    fixed: list[tuple[Instruction, ...]] = []
    for b, stream in enumerate(streams):
        recv_of: dict[_MessageKey, Instruction] = {}
        keys: list[_MessageKey | None] = []   # per step: its receive's message (computed once)
        for step, ins in enumerate(stream):
            if ins.op not in _RECV_OPS:
                keys.append(None)
                continue
            key = ins.message_key()
            if not 0 <= ins.peer < num_ranks or key not in position.get((ins.peer, b), {}):
                raise ScheduleError(
                    f"rank {b}, step {step}: {ins.op.value} of {key} from rank {ins.peer} "
                    "has no matching send. Fix: every receive needs the peer's send of the same message."
                )
            recv_of[key] = ins
            keys.append(key)
        done: set[_MessageKey] = set()
        next_index: dict[int, int] = {}  # per source rank: messages before this are all received
        out: list[Instruction] = []
        for ins, key in zip(stream, keys):
            if key is None:
                out.append(ins)
                continue
            if key in done:  # already pulled forward
                continue
            a = ins.peer
            order = sent[(a, b)]
            target = position[(a, b)][key]
            for earlier in order[next_index.get(a, 0):target]:
                if earlier not in done:
                    if earlier not in recv_of:
                        raise ScheduleError(
                            f"rank {a} sends {earlier} to rank {b}, which never receives it. "
                            "Fix: every send needs a matching receive on its peer."
                        )
                    out.append(recv_of[earlier])
                    done.add(earlier)
            out.append(ins)
            done.add(key)
            next_index[a] = max(next_index.get(a, 0), target + 1)
        fixed.append(tuple(out))
    return tuple(fixed)


def lower(
    stages: Sequence[StageInfo],
    num_ranks: int,
    num_microbatches: int,
    compute_orders: Sequence[Sequence[ComputeAction]],
    *,
    schedule: str,
    specs: SpecsFn | None = None,
    add_optim: bool = True,
    add_reduce: bool = True,
    subs: Sequence[tuple[str, Sequence[int]]] = (),
) -> Program:
    """Lower per-rank compute orders to a Program with loads, sends, receives, REDUCE and OPTIM.

    Around ``FWD(s, m)``: LOAD if the stage reads batch keys, RECV_ACT from each producer on
    another rank, then SEND_ACT to each consumer on another rank. Around ``BWD``/``BWD_I``:
    RECV_GRAD from each consumer on another rank that sends s a gradient, then SEND_GRAD to each
    grad producer on another rank. ``BWD_W`` needs no communication. Receives are then put in
    the peer's send order (:func:`fix_recv_order`). Same-rank edges need no messages.
    ``REDUCE stage=s`` follows each stage's last backward, so its data-parallel gradient
    all-reduce starts while the rank still works on other stages (a no-op without replicas).
    ``subs`` (``Program.subs``): the compute orders already hold one action per sub of a split
    stage (see :func:`dipc.passes.schedules.expand_subs`); messages get their sub here.
    The result is not validated here; call :func:`dipc.ir.validate.validate`.
    """
    subs_t = tuple((name, tuple(counts)) for name, counts in subs)
    if len(compute_orders) != num_ranks:
        raise ScheduleError(
            f"got compute orders for {len(compute_orders)} ranks, but num_ranks={num_ranks}. "
            f"Fix: pass one list per rank.\n{format_compute_orders(compute_orders)}"
        )
    specs_fn = specs if specs is not None else _no_specs
    consumers = [tuple(c.id for c in stages if st.id in c.producers) for st in stages]
    grad_consumers = [tuple(c.id for c in stages if st.id in c.grad_producers) for st in stages]
    streams = [
        _expand_rank(rank, order, stages, consumers, grad_consumers, specs_fn, subs_t)
        for rank, order in enumerate(compute_orders)
    ]
    fixed = fix_recv_order(streams)
    if add_reduce:
        fixed = tuple(_add_reduces(stream) for stream in fixed)
    if add_optim:
        fixed = tuple(stream + (Instruction(op=_OPTIM),) for stream in fixed)
    return Program(schedule=schedule, num_ranks=num_ranks, num_microbatches=num_microbatches,
                   stages=tuple(stages), streams=fixed, subs=subs_t)


def _add_reduces(stream: tuple[Instruction, ...]) -> tuple[Instruction, ...]:
    last_backward = {}
    for i, ins in enumerate(stream):
        if ins.op in (_BWD, _BWD_W):
            last_backward[ins.stage] = i
    after = {i: s for s, i in last_backward.items()}
    out: list[Instruction] = []
    for i, ins in enumerate(stream):
        out.append(ins)
        if i in after:
            out.append(Instruction(op=_REDUCE, stage=after[i]))
    return tuple(out)


def schedule_orders(
    stages: Sequence[StageInfo],
    num_ranks: int,
    num_microbatches: int,
    schedule_name: str,
    subs: Sequence[tuple[str, Sequence[int]]] = (),
) -> list[list]:
    """The compute orders of the schedule generator ``schedule_name`` (what :func:`build_program`
    lowers; planners bound a schedule from them before lowering it).

    With ``subs``, the dual-queue scheduler places every sub as its own task; the baseline
    generators order whole microbatches and each split stage's action becomes a block of subs
    (:func:`~dipc.passes.schedules.expand_subs`)."""
    if subs and schedule_name == "dual_queue":
        from dipc.passes.dual_queue import dual_queue_schedule

        return dual_queue_schedule(stages, num_ranks, num_microbatches, subs=subs)
    orders = get_schedule(schedule_name)(stages, num_ranks, num_microbatches)
    return expand_subs(orders, stages, subs) if subs else orders


def build_program(
    stages: Sequence[StageInfo],
    num_ranks: int,
    num_microbatches: int,
    schedule_name: str,
    specs: SpecsFn | None = None,
    subs: Sequence[tuple[str, Sequence[int]]] = (),
) -> Program:
    """Run the schedule generator ``schedule_name`` and lower its compute orders
    (:func:`schedule_orders`)."""
    orders = schedule_orders(stages, num_ranks, num_microbatches, schedule_name, subs)
    return lower(stages, num_ranks, num_microbatches, orders, schedule=schedule_name, specs=specs,
                 subs=subs)
