"""The step emulator: a discrete-event simulation of one training step of a :class:`Program`.

``simulate(program, cluster, compute_time)`` plays every rank's instruction stream the way the
runtime executes it and returns a :class:`SimResult` (step time, per-rank busy/bubble time, peak
memory, and a timeline that :func:`dipc.semu.trace.to_chrome_trace` exports):

- each rank runs its stream in order on one compute stream; every non-communication instruction
  (LOAD, FWD, BWD, BWD_I, BWD_W, REDUCE, OPTIM) takes ``compute_time(instruction)`` seconds, which
  the caller supplies (the symbolic cost model, a table, a constant);
- a send is posted when the rank reaches it and never blocks the rank; a receive blocks until its
  message has arrived; an optional ``comm_overhead`` charges either one CPU time on its own rank
  (a send before posting, a receive after arrival). Messages between an ordered rank pair travel
  in FIFO order on one channel, one at a time, each taking ``latency + bytes / bandwidth`` of the link between the two ranks'
  nodes (:meth:`ClusterProfile.transfer_time`); bytes come from the receive's ``specs``;
- ``p2p="eager"`` starts a transfer when it is posted (NCCL for messages that fit its
  buffers); ``p2p="rendezvous"`` starts it only once the receive is posted as well (NCCL for large
  messages: the send kernel waits for the receive kernel), which exposes the transfer when the
  receive sits right before the compute that needs it; ``p2p="handshake"`` is rendezvous whose
  receive-ready notice first crosses the link (gloo's unbound-buffer protocol: a send posted
  before its receive waits for the receiver's notification, so the data arrives at
  ``max(send posted, receive posted + latency) + latency + bytes / bandwidth``); a receive is
  posted when the rank reaches it, or ``recv_lookahead`` compute instructions earlier, as the
  runtime posts them (:func:`dipc.ir.posting.receives_ahead`);
- a receive that had to wait resumes ``wake_latency`` after its data arrived (a blocked CPU
  thread's wake-up; 0 by default, fitted for multi-process CPU executors);
- a rank's step ends when its last instruction and its last outgoing transfer have finished
  (the runtime waits for posted sends at the end of the step);
- memory (optional :class:`MemoryModel`): per-stage resident bytes (parameters, optimizer
  states) for the whole step, gradients from the stage's first weight backward on; a FWD's
  stashed activations from its end until its backward frees them (BWD_I frees all but what BWD_W still needs, BWD_W the rest); the
  gradients a BWD_I captures for its BWD_W (the seeds of the weight-gradient walk), from its end until that BWD_W ends; received
  activations until the stage's backward of that microbatch ends and received gradients until the
  backward that reads them ends; per-instruction workspace while it runs.

Why no global event heap: a rank is sequential and sends never block, so every event time is
fixed once its rank reaches it and its message (if any) was sent. The simulator therefore runs
each rank until it blocks on a message not yet sent, then switches to another rank (the same
walk as the validator's deadlock check). The times equal an event-ordered simulation's, and the
cost is linear in the number of instructions.

Not modelled (yet): contention between transfers that share a NIC, NVSwitch port or PCIe root
(each ordered rank pair is its own channel), compute/communication interference (a transfer does
not slow the kernels it overlaps), collectives (the caller times REDUCE/OPTIM), allocator
fragmentation and the caching allocator's reserved-but-free memory.

Example::

    >>> from dipc.ir import StageInfo
    >>> from dipc.passes.codegen import build_program
    >>> from dipc.semu.profiles import load_preset
    >>> stages = [StageInfo(id=s, rank=s, producers=(s - 1,) if s else (),
    ...                     grad_producers=(s - 1,) if s else ()) for s in range(4)]
    >>> program = build_program(stages, 4, 8, "1f1b")
    >>> times = {"FWD": 1.0, "BWD": 2.0}
    >>> result = simulate(program, load_preset("h100_sxm"), lambda ins: times.get(ins.op.value, 0.0))
    >>> round(result.step_time, 3)  # (M + P - 1) * (tf + tb) plus a few microseconds of latency
    33.0
"""
from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from dipc.errors import ScheduleError
from dipc.ir.instructions import Instruction, Op, TensorSpec
from dipc.ir.posting import receives_ahead
from dipc.ir.program import Program
from dipc.semu.profiles import DTYPE_BYTES, P2P_MODES, ClusterProfile, ProfileError

__all__ = [
    "ComputeTimeFn",
    "MemoryModel",
    "SimResult",
    "Span",
    "STREAM_COMPUTE",
    "STREAM_RECV_WAIT",
    "STREAM_SEND",
    "message_bytes",
    "simulate",
    "uniform_memory",
]

ComputeTimeFn = Callable[[Instruction], float]
"""Seconds one non-communication instruction occupies its rank's compute stream."""

STREAM_COMPUTE = 0    # the rank's compute stream (every non-communication instruction)
STREAM_RECV_WAIT = 1  # time the rank blocks in a receive (posted until the data arrived)
STREAM_SEND = 2       # an outgoing transfer (on the sender), start .. arrival

_SCALAR_BYTES = 8  # a Python scalar travels as a 0-d 64-bit tensor

# instruction kinds after preparation
_K_COMPUTE, _K_SEND, _K_RECV = 0, 1, 2


@dataclass(frozen=True, slots=True, kw_only=True)
class MemoryModel:
    """Bytes per rank over a step, from per-stage and per-instruction callbacks.

    ``static(stage)``: resident bytes of that stage for the whole step (parameters, gradients,
    optimizer states). ``activations(fwd)``: bytes a FWD stashes for its backward.
    ``kept_for_wgrad(bwd_i)``: of those, the bytes BWD_I leaves for BWD_W (``None``: all of them).
    ``seeds_for_wgrad(bwd_i)``: bytes BWD_I allocates and leaves alive until BWD_W ends, on top of
    the stash (the gradients the runtime's split captures as BWD_W's seeds; ``None``: none), so
    programs without BWD_I are unaffected.
    ``workspace(instr)``: transient bytes while a compute instruction runs (``None``: none).
    ``grads(stage)``: the stage's parameter gradients, made by its first BWD or BWD_W and kept to
    the end of the step (``None``: count them in ``static``); they count from that instruction's
    end, so its ``workspace`` should include them while it runs.
    ``count_messages``: also count received activations (kept until the stage's backward of that
    microbatch ends) and received gradients (until the backward that reads them ends); turn it
    off if ``activations`` already includes the stage's inputs.
    """

    static: Callable[[int], float]
    activations: Callable[[Instruction], float]
    kept_for_wgrad: Callable[[Instruction], float] | None = None
    seeds_for_wgrad: Callable[[Instruction], float] | None = None
    workspace: Callable[[Instruction], float] | None = None
    grads: Callable[[int], float] | None = None
    count_messages: bool = True


def uniform_memory(static_per_stage: float, activations_per_mb: float, *,
                   wgrad_fraction: float = 1.0, count_messages: bool = False) -> MemoryModel:
    """Every stage holds ``static_per_stage`` bytes; every FWD stashes ``activations_per_mb``;
    BWD_I keeps ``wgrad_fraction`` of that stash for BWD_W."""
    return MemoryModel(static=lambda stage: static_per_stage,
                       activations=lambda ins: activations_per_mb,
                       kept_for_wgrad=lambda ins: activations_per_mb * wgrad_fraction,
                       count_messages=count_messages)


@dataclass(frozen=True, slots=True)
class Span:
    """One interval of the timeline: ``rank``'s ``stream`` was busy with ``program.streams[rank][step]``
    from ``start`` to ``end`` (seconds). For ``STREAM_SEND`` spans ``peer`` is the receiving rank."""

    rank: int
    stream: int
    step: int
    start: float
    end: float
    peer: int = -1


@dataclass(frozen=True, slots=True, kw_only=True)
class SimResult:
    """What one simulated step gives.

    ``step_time``: seconds until the last rank finishes (instructions and outgoing transfers).
    ``busy[r]``: seconds rank r's compute stream works; ``bubble[r] = step_time - busy[r]``.
    ``recv_wait[r]``: seconds rank r blocks in receives. ``end_time[r]``: when rank r finishes.
    ``peak_memory[r]``: bytes (``None`` without a memory model). ``spans`` and
    ``memory_timeline[r]`` (``(time, bytes)`` after each change) are empty unless recorded;
    ``raw_spans`` holds the spans as plain ``(rank, stream, step, start, end, peer)`` tuples
    (building a :class:`Span` per interval would triple the simulation time).
    """

    program: Program
    step_time: float
    busy: tuple[float, ...]
    bubble: tuple[float, ...]
    recv_wait: tuple[float, ...]
    end_time: tuple[float, ...]
    peak_memory: tuple[float, ...] | None
    raw_spans: tuple[tuple[int, int, int, float, float, int], ...] = ()
    memory_timeline: tuple[tuple[tuple[float, float], ...], ...] = ()

    @property
    def spans(self) -> tuple[Span, ...]:
        """The recorded timeline, ordered by rank, then start time."""
        return tuple(Span(*raw) for raw in sorted(self.raw_spans, key=lambda s: (s[0], s[3], s[1])))

    @property
    def bubble_fraction(self) -> float:
        """Idle share of all ranks' time: ``sum(bubble) / (num_ranks * step_time)``."""
        total = self.step_time * len(self.busy)
        return sum(self.bubble) / total if total > 0 else 0.0

    def ranks_over(self, capacity: float) -> list[int]:
        """Ranks whose peak memory exceeds ``capacity`` bytes (needs a memory model)."""
        if self.peak_memory is None:
            raise ValueError("this result has no memory numbers. Fix: pass memory=MemoryModel(...) "
                             "to simulate().")
        return [r for r, peak in enumerate(self.peak_memory) if peak > capacity]

    def summary(self) -> str:
        """A small per-rank table (times in ms, memory in GiB)."""
        lines = [f"{self.program.schedule}: step {self.step_time * 1e3:.3f} ms, bubble "
                 f"{self.bubble_fraction:.1%}",
                 "rank   busy ms  bubble ms  recv-wait ms  peak GiB"]
        for r in range(len(self.busy)):
            mem = "-" if self.peak_memory is None else f"{self.peak_memory[r] / 2**30:.2f}"
            lines.append(f"{r:>4} {self.busy[r] * 1e3:>9.3f} {self.bubble[r] * 1e3:>10.3f} "
                         f"{self.recv_wait[r] * 1e3:>13.3f} {mem:>9}")
        return "\n".join(lines)


# ------------------------------------------------------------------------------------------------
# preparation: per-program facts that do not depend on costs, cached


def message_bytes(specs: Sequence[TensorSpec]) -> int:
    """Bytes of one message: the sum over its leaf specs (scalars travel as 8-byte tensors)."""
    total = 0
    for spec in specs:
        if spec.kind != "tensor":
            total += _SCALAR_BYTES
            continue
        try:
            total += spec.numel * DTYPE_BYTES[spec.dtype]
        except KeyError:
            raise ProfileError(f"receive spec {spec} has dtype {spec.dtype!r} of unknown size. Fix: "
                               f"use one of {', '.join(DTYPE_BYTES)} or add it to "
                               f"dipc.semu.profiles.DTYPE_BYTES.") from None
    return total


@dataclass(frozen=True, slots=True)
class _Prepared:
    # per rank: list of (kind, instruction, peer, bytes); bytes of a send = its matching receive's
    streams: tuple[tuple[tuple[int, Instruction, int, int], ...], ...]
    stage_static_rank: tuple[int, ...]


_CACHE: OrderedDict[tuple[int, int], tuple[tuple, tuple, _Prepared]] = OrderedDict()
_CACHE_SIZE = 16


def _prepare(program: Program) -> _Prepared:
    # keyed by the streams and stages, not the program: phase 3's fitted copies
    # (``with_recompute``) share both with the program they were fitted from
    key = (id(program.streams), id(program.stages))
    hit = _CACHE.get(key)
    if hit is not None and hit[0] is program.streams and hit[1] is program.stages:
        _CACHE.move_to_end(key)
        return hit[2]
    recv_bytes: dict[tuple[int, int], deque[int]] = {}
    # planners share spec tuples across messages: keyed by identity (hashing a tuple of specs
    # hashes every field of every spec), the tuple kept so its id stays its own
    sizes: dict[int, tuple[tuple[TensorSpec, ...], int]] = {}

    def size(specs: tuple[TensorSpec, ...]) -> int:
        hit = sizes.get(id(specs))
        if hit is None:
            hit = sizes[id(specs)] = (specs, message_bytes(specs))
        return hit[1]

    for r, stream in enumerate(program.streams):
        for ins in stream:
            if ins.op is Op.RECV_ACT or ins.op is Op.RECV_GRAD:
                recv_bytes.setdefault((ins.peer, r), deque()).append(size(ins.specs))
    streams = []
    for r, stream in enumerate(program.streams):
        out = []
        for ins in stream:
            op = ins.op
            if op is Op.SEND_ACT or op is Op.SEND_GRAD:
                queue = recv_bytes.get((r, ins.peer))
                if not queue:
                    raise ScheduleError(f"rank {r}: {ins} has no matching receive on rank {ins.peer}. "
                                        "Fix: validate the program (dipc.ir.validate) before simulating.")
                out.append((_K_SEND, ins, ins.peer, queue.popleft()))
            elif op is Op.RECV_ACT or op is Op.RECV_GRAD:
                out.append((_K_RECV, ins, ins.peer, size(ins.specs)))
            else:
                out.append((_K_COMPUTE, ins, -1, 0))
        streams.append(tuple(out))
    prepared = _Prepared(tuple(streams), tuple(s.rank for s in program.stages))
    _CACHE[key] = (program.streams, program.stages, prepared)
    if len(_CACHE) > _CACHE_SIZE:
        _CACHE.popitem(last=False)
    return prepared


_POSTS: OrderedDict[tuple[int, int, bool], tuple[tuple, tuple]] = OrderedDict()


def _post_points(program: Program, lookahead: int, peer_ordered: bool
                 ) -> tuple[tuple[frozenset[int], dict[int, int]], ...]:
    """Per rank: the pcs at which receives are posted ahead and, per receive pc, its post pc
    (:func:`~dipc.ir.posting.receives_ahead`), cached per stream set and policy."""
    key = (id(program.streams), lookahead, peer_ordered)
    hit = _POSTS.get(key)
    if hit is not None and hit[0] is program.streams:
        _POSTS.move_to_end(key)
        return hit[1]
    out = []
    for stream in program.streams:
        where = {id(ins): k for k, ins in enumerate(stream)}
        post_of = {where[id(r)]: at for at, rs in receives_ahead(stream, lookahead, peer_ordered).items() for r in rs}
        out.append((frozenset(post_of.values()), post_of))
    _POSTS[key] = (program.streams, tuple(out))
    if len(_POSTS) > _CACHE_SIZE:
        _POSTS.popitem(last=False)
    return _POSTS[key][1]


# ------------------------------------------------------------------------------------------------
# the simulation


def simulate(
    program: Program,
    cluster: ClusterProfile,
    compute_time: ComputeTimeFn,
    memory: MemoryModel | None = None,
    *,
    gpus_per_rank: int = 1,
    p2p: str = "eager",
    record: bool = True,
    comm_overhead: ComputeTimeFn | None = None,
    wake_latency: float = 0.0,
    recv_lookahead: int = 0,
    peer_ordered_posts: bool = False,
) -> SimResult:
    """Simulate one step of ``program`` on ``cluster``; see the module docstring for the model.

    ``gpus_per_rank``: GPUs one pipeline rank spans (tensor parallelism), which decides which
    rank pairs share a node. ``record=False`` skips the timeline (faster, for schedule search).
    ``comm_overhead(instr)``: seconds a send or receive occupies its own rank's compute stream (a
    send before it is posted, a receive after its message arrived: packing and copying on a CPU).
    ``wake_latency``: seconds a rank that blocked in a receive needs, after its message arrived,
    to run again (a CPU thread woken from a futex wait; on a virtual machine whose idle vCPUs halt,
    the host's wake-up latency, measured in milliseconds on the machine this project's CPU figures
    come from). A receive whose message was already there does not pay it.
    ``recv_lookahead``: with ``p2p`` rendezvous or handshake, a receive is posted that many
    compute instructions before it is reached (``peer_ordered_posts``: never before an earlier
    send to the same peer), as the runtime posts them (:func:`dipc.ir.posting.receives_ahead`);
    0, the default, posts it when the rank reaches it.
    The program should be valid (:func:`dipc.ir.validate.validate`); a wait cycle raises
    ``ScheduleError`` naming the blocked ranks.
    """
    if p2p not in P2P_MODES:
        raise ValueError(f"p2p={p2p!r}. Fix: use one of {', '.join(P2P_MODES)}.")
    rendezvous = p2p != "eager"
    handshake = p2p == "handshake"
    prepared = _prepare(program)
    streams = prepared.streams
    R = program.num_ranks
    # receives posted ahead: per rank, the pcs that post some and receive pc -> its post pc; the
    # time a rank reaches a post pc is kept (posted_at) for the receives it posts
    posts = _post_points(program, recv_lookahead, peer_ordered_posts) if rendezvous and recv_lookahead else None
    posted_at: list[dict[int, float]] = [{} for _ in range(R)]

    # per ordered pair: (latency, seconds per byte)
    links = [[(0.0, 0.0)] * R for _ in range(R)]
    for a in range(R):
        for b in range(R):
            if a != b:
                link = cluster.link(a, b, gpus_per_rank)
                links[a][b] = (link.latency, 1.0 / link.bandwidth)

    clock = [0.0] * R
    busy = [0.0] * R
    wait = [0.0] * R
    send_done = [0.0] * R
    pc = [0] * R
    chan_free: dict[tuple[int, int], float] = {}
    # in flight per pair: eager -> arrival times; rendezvous -> (post time, bytes, send step)
    inbox: dict[tuple[int, int], deque] = {}
    waiting_on: list[int] = [-1] * R
    spans: list[tuple[int, int, int, float, float, int]] = []
    append_span = spans.append

    mem = memory is not None
    if mem:
        cur = [0.0] * R
        for st in program.stages:
            cur[st.rank] += float(memory.static(st.id))
        peak = list(cur)
        mem_tl: list[list[tuple[float, float]]] = [[(0.0, c)] for c in cur]
        stash: dict[tuple[int, int, int], float] = {}     # (stage, mb, sub) -> stashed activation bytes
        held_act: dict[tuple[int, int, int], float] = {}  # (stage, mb, sub) -> received activation bytes
        held_grad: dict[tuple[int, int, int], float] = {}  # (stage, mb, sub) -> received gradient bytes
        split_modalities = {name for name, _ in program.subs}
        split_stage = [s.modality in split_modalities for s in program.stages]
        mem_act = memory.activations
        mem_keep = memory.kept_for_wgrad
        mem_seeds = memory.seeds_for_wgrad
        mem_ws = memory.workspace
        mem_grads = memory.grads
        has_grads: set[int] = set()
        count_msgs = memory.count_messages

    # Op.X is a slow class-attribute lookup on Python 3.11 enums; the loop runs per instruction
    _FWD, _BWD, _BWD_I, _BWD_W, _RECV_ACT, _RECV_GRAD = Op.FWD, Op.BWD, Op.BWD_I, Op.BWD_W, Op.RECV_ACT, Op.RECV_GRAD
    work = deque(range(R))
    while work:
        r = work.popleft()
        stream = streams[r]
        n = len(stream)
        i = pc[r]
        t = clock[r]
        marks, post_of = posts[r] if posts is not None else (None, None)
        posted_r = posted_at[r]
        while i < n:
            kind, ins, peer, nbytes = stream[i]
            if marks is not None and i in marks and i not in posted_r:
                posted_r[i] = t   # the receives posted here go out before stream[i] runs
            if kind == _K_COMPUTE:
                d = compute_time(ins)
                end = t + d
                if mem:
                    op = ins.op
                    if mem_ws is not None:
                        ws = mem_ws(ins)
                        if cur[r] + ws > peak[r]:
                            peak[r] = cur[r] + ws
                    delta = 0.0
                    key = (ins.stage, ins.mb, ins.sub)
                    if op is _FWD:
                        b = float(mem_act(ins))
                        stash[key] = b
                        delta = b
                    elif op is _BWD:
                        delta = -stash.pop(key, 0.0) - held_act.pop(key, 0.0) - held_grad.pop(key, 0.0)
                    elif op is _BWD_I:
                        full = stash.get(key, 0.0)
                        kept = full if mem_keep is None else min(full, float(mem_keep(ins)))
                        seeds = 0.0 if mem_seeds is None else float(mem_seeds(ins))
                        stash[key] = kept + seeds       # BWD_W frees both
                        delta = kept + seeds - full - held_grad.pop(key, 0.0)
                    elif op is _BWD_W:
                        delta = -stash.pop(key, 0.0) - held_act.pop(key, 0.0)
                    if mem_grads is not None and (op is _BWD or op is _BWD_W) and ins.stage not in has_grads:
                        has_grads.add(ins.stage)      # made during this backward (its workspace says how)
                        delta += float(mem_grads(ins.stage))
                    if delta:
                        c = cur[r] + delta
                        cur[r] = c
                        if c > peak[r]:
                            peak[r] = c
                        if record:
                            mem_tl[r].append((end, c))
                if record and d > 0:
                    append_span((r, STREAM_COMPUTE, i, t, end, -1))
                busy[r] += d
                t = end
            elif kind == _K_SEND:
                if comm_overhead is not None:
                    d = comm_overhead(ins)
                    if d > 0:
                        if record:
                            append_span((r, STREAM_COMPUTE, i, t, t + d, -1))
                        busy[r] += d
                        t += d
                pair = (r, peer)
                box = inbox.get(pair)
                if box is None:
                    box = inbox[pair] = deque()
                if rendezvous:
                    box.append((t, nbytes, i))
                else:
                    lat, spb = links[r][peer]
                    start = chan_free.get(pair, 0.0)
                    if t > start:
                        start = t
                    arrive = start + lat + nbytes * spb
                    chan_free[pair] = arrive
                    if arrive > send_done[r]:
                        send_done[r] = arrive
                    box.append(arrive)
                    if record:
                        append_span((r, STREAM_SEND, i, start, arrive, peer))
                if waiting_on[peer] == r:
                    waiting_on[peer] = -1
                    work.append(peer)
            else:  # receive
                pair = (peer, r)
                box = inbox.get(pair)
                if not box:
                    waiting_on[r] = peer
                    break
                if mem and count_msgs:
                    c = cur[r] + nbytes
                    cur[r] = c
                    if c > peak[r]:
                        peak[r] = c
                    # held by the receiving unit: a stage outside a split modality receives every
                    # sub of its producer's output for its one whole-microbatch unit
                    sub = ins.sub if ins.op is _RECV_GRAD or split_stage[ins.stage] else -1
                    key = (ins.stage, ins.mb, sub)
                    held = held_act if ins.op is _RECV_ACT else held_grad
                    held[key] = held.get(key, 0.0) + nbytes
                    if record:
                        mem_tl[r].append((t, c))
                if rendezvous:
                    posted, nb, send_step = box.popleft()
                    lat, spb = links[peer][r]
                    start = chan_free.get(pair, 0.0)
                    if posted > start:
                        start = posted
                    at = post_of.get(i) if post_of is not None else None
                    post_t = t if at is None else posted_r[at]   # when the receive was posted
                    ready = post_t + lat if handshake else post_t   # when the sender learns it
                    if ready > start:
                        start = ready
                    arrive = start + lat + nb * spb
                    chan_free[pair] = arrive
                    if arrive > send_done[peer]:
                        send_done[peer] = arrive
                    if record:
                        append_span((peer, STREAM_SEND, send_step, start, arrive, r))
                else:
                    arrive = box.popleft()
                if arrive > t:
                    arrive += wake_latency
                    if record:
                        append_span((r, STREAM_RECV_WAIT, i, t, arrive, -1))
                    wait[r] += arrive - t
                    t = arrive
                if comm_overhead is not None:
                    d = comm_overhead(ins)
                    if d > 0:
                        if record:
                            append_span((r, STREAM_COMPUTE, i, t, t + d, -1))
                        busy[r] += d
                        t += d
            i += 1
        pc[r] = i
        clock[r] = t

    blocked = [r for r in range(R) if pc[r] < len(streams[r])]
    if blocked:
        where = "; ".join(f"rank {r} at step {pc[r]} ({streams[r][pc[r]][1]}) waits for rank "
                          f"{waiting_on[r]}" for r in blocked)
        raise ScheduleError(f"simulation deadlocked: {where}. Fix: validate the program "
                            "(dipc.ir.validate) and reorder the receives it reports.")

    end_time = tuple(max(clock[r], send_done[r]) for r in range(R))
    step = max(end_time) if end_time else 0.0
    return SimResult(
        program=program,
        step_time=step,
        busy=tuple(busy),
        bubble=tuple(step - b for b in busy),
        recv_wait=tuple(wait),
        end_time=end_time,
        peak_memory=tuple(peak) if mem else None,
        raw_spans=tuple(spans),
        memory_timeline=tuple(tuple(tl) for tl in mem_tl) if (mem and record) else (),
    )
