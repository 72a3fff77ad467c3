"""How messages move between ranks: in one process (mailboxes) or over torch.distributed P2P.

Sends never block (they are posted and completed at the end of the step); receives block. The
plan's specs tell the receiver what to allocate, so no shapes are exchanged at run time. Empty
tensors are not transferred at all: both sides know from the spec that there is nothing to move.

A receive can be posted ahead of the instruction that waits for it (:meth:`Transport.post_recv`,
called by the interpreter one compute instruction early): gloo moves a message's payload only
once the receiver has posted its buffer, so a receive posted when the instruction is reached
pays a round trip and the transfer on the critical path, one posted early lets the data land
while the rank computes. Posting keeps program order per peer, which is how P2P matches messages.
"""
from __future__ import annotations

import datetime
from collections import defaultdict, deque
from typing import Any, Callable

import torch

from dipc.ir import Instruction
from dipc.ir.posting import GLOO_RECV_LOOKAHEAD
from dipc.passes.values import dtype_for, empty_for


class WouldBlock(Exception):
    """A local receive whose message has not been sent yet (the local executor switches ranks)."""


def _groups(tensors: list[torch.Tensor]) -> list[tuple[torch.dtype, list[torch.Tensor]]]:
    """Non-empty tensors grouped by dtype, groups in order of first appearance (both sides agree)."""
    groups: dict[torch.dtype, list[torch.Tensor]] = {}
    for t in tensors:
        if t.numel():
            groups.setdefault(t.dtype, []).append(t)
    return list(groups.items())


def _pack(tensors: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """One contiguous buffer per dtype, detached from autograd (a pending send must not keep the
    sender's graph alive); a dtype with one tensor is sent as it is when already contiguous."""
    if len(tensors) == 1:   # the common message: one activation or one gradient
        t = tensors[0]
        if not t.numel():
            return []
        t = t.detach()
        if not t.is_contiguous():
            t = t.contiguous()
        return [t if t.device == device else t.to(device)]
    out = []
    with torch.no_grad():   # one flattening copy per dtype (flatten_dense_tensors: one op, not one per leaf)
        for _, members in _groups(tensors):
            if len(members) == 1:
                out.append(members[0].detach().contiguous().to(device))
                continue
            if any(t.device != device for t in members):
                members = [t.to(device) for t in members]
            out.append(torch._C._nn.flatten_dense_tensors(members))
    return out


class _RecvLayout:
    """Where a receive's values land, worked out once per instruction (a steady run executes the
    same instructions every step): ``single`` (shape, dtype) for a one-value message; otherwise
    per dtype the values' indices, the buffer's shape (one value) or length (several, views cut by
    meta-tensor templates in one C++ call), and the empty values, which are not transferred."""

    __slots__ = ("instr", "single", "groups", "empties")

    def __init__(self, instr: Instruction) -> None:
        self.instr = instr
        specs = instr.specs
        shapes = [spec.shape if spec.kind == "tensor" else () for spec in specs]   # scalars: 0-d
        self.single = (shapes[0], dtype_for(specs[0]), specs[0].numel > 0) if len(specs) == 1 else None
        self.empties: list[tuple[int, tuple[int, ...], torch.dtype]] = []
        members: dict[torch.dtype, list[int]] = {}
        for k, spec in enumerate(specs):
            if spec.numel:
                members.setdefault(dtype_for(spec), []).append(k)
            else:
                self.empties.append((k, shapes[k], dtype_for(spec)))
        self.groups: list[tuple[torch.dtype, list[int], Any, list[torch.Tensor] | None]] = []
        for dtype, ks in members.items():
            if len(ks) == 1:
                self.groups.append((dtype, ks, shapes[ks[0]], None))
            else:
                self.groups.append((dtype, ks, sum(specs[k].numel for k in ks),
                                    [empty_for(specs[k], "meta") for k in ks]))


_LAYOUTS: dict[int, _RecvLayout] = {}
_LAYOUT_CACHE_SIZE = 1 << 16


def _recv_layout(instr: Instruction) -> _RecvLayout:
    """The cached :class:`_RecvLayout` of ``instr`` (by identity: the pipeline caches programs)."""
    if len(_LAYOUTS) >= _LAYOUT_CACHE_SIZE:
        _LAYOUTS.clear()
    layout = _LAYOUTS[id(instr)] = _RecvLayout(instr)
    return layout


class Transport:
    # how far ahead the interpreter posts receives (dipc.ir.posting.receives_ahead):
    # compute instructions of look-ahead, and whether each peer's posts must keep program order
    recv_lookahead: int = 1
    peer_ordered_posts: bool = False

    def send(self, instr: Instruction, rank: int, tensors: list[torch.Tensor]) -> None:
        """Send ``tensors`` (they may require grad or be non-contiguous: the transport copies or
        detaches what it needs; the receiver gets tensors of its own, without autograd history)."""
        raise NotImplementedError

    def recv(self, instr: Instruction, rank: int) -> list[torch.Tensor]:
        raise NotImplementedError

    def post_recv(self, instr: Instruction, rank: int) -> None:
        """Post ``instr``'s receive now; its :meth:`recv` then only waits (no-op by default)."""

    def finish(self) -> None:
        """Wait until every posted send has completed."""


class LocalTransport(Transport):
    """All ranks in one process: one FIFO mailbox per ordered rank pair. The receiver gets a copy
    (as a real transport's receiver gets its own buffer), contiguous and without autograd history;
    the mailbox holds the sender's tensors until then (its unit keeps them until its backward,
    which comes after the receive)."""

    def __init__(self) -> None:
        self.boxes: dict[tuple[int, int], deque] = defaultdict(deque)

    def send(self, instr, rank, tensors):
        self.boxes[(rank, instr.peer)].append((instr.message_key(), tensors))

    def recv(self, instr, rank):
        box = self.boxes[(instr.peer, rank)]
        if not box:
            raise WouldBlock()
        key, tensors = box.popleft()
        if key != instr.message_key():
            raise RuntimeError(f"expected message {instr.message_key()} from rank {instr.peer} but the next one "
                               f"is {key} (sends and receives are out of order)")
        for t, spec in zip(tensors, instr.specs):
            if spec.kind == "tensor" and tuple(t.shape) != spec.shape:
                raise RuntimeError(f"received shape {tuple(t.shape)} but the plan says {spec.shape}")
        if len(tensors) != len(instr.specs):
            raise RuntimeError(f"received {len(tensors)} tensors but the plan says {len(instr.specs)}")
        return self._copy(tensors)

    @staticmethod
    def _copy(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        """The receiver's own buffers: the data movement of this transport (detach, then one copy)."""
        copies = []
        for t in tensors:
            t = t.detach()
            copies.append(t.clone() if t.is_contiguous() else t.contiguous())
        return copies


_DIRECTION_GROUPS: list = []   # [(the default group they were made for, (to higher, to lower))]


def direction_groups() -> tuple[Any, Any]:
    """Two process groups over every process, both numbered like the default group: index 0
    carries messages to a higher rank, index 1 messages to a lower rank. Made once per default
    group (``new_group`` is collective: every process calls this at the same point)."""
    import torch.distributed as dist

    world = dist.group.WORLD
    if not _DIRECTION_GROUPS or _DIRECTION_GROUPS[0][0] is not world:
        _DIRECTION_GROUPS[:] = [(world, (dist.new_group(), dist.new_group()))]
    return _DIRECTION_GROUPS[0][1]


class DistributedTransport(Transport):
    """torch.distributed point-to-point (gloo on CPU, NCCL on GPU) with a timeout on every wait.

    Receives are posted :data:`~dipc.ir.posting.GLOO_RECV_LOOKAHEAD` compute instructions ahead on
    CPU (gloo). On a GPU one compute ahead, as before it was measured on gloo, and never ahead of
    an earlier send to the same peer. One ahead also keeps receive buffers where SEMU's memory
    model charges them, at most one compute early (no GPU pair has measured what more would give).

    ``directional`` (default: on a GPU): messages from a lower to a higher process rank go over one
    process group, those the other way over another (:func:`direction_groups`). NCCL runs one
    process group's operations between a rank pair in launch order on one stream, and a large
    message moves only while both ends' kernels run; with one group, 1F1B's steady state queues
    ``send act(m+1), recv grad(m)`` on one rank and ``send grad(m), recv act(m+1)`` on its peer,
    and each send waits for a receive queued behind the other send. One stream per direction
    leaves each queue in the order its receiver expects (:mod:`dipc.ir.stream_order` checks both
    layouts on every schedule). gloo progresses each message on its own and keeps one group."""

    def __init__(self, timeout_s: float, device: torch.device | str = "cpu", global_rank=lambda peer: peer,
                 gate: Callable[[], None] | None = None, directional: bool | None = None):
        """``gate``: called once, before this rank's first message (the pipeline's plan check,
        which may then overlap the compute that comes before it). ``directional``: see the class
        docstring; creating the groups is collective, so every rank builds its transport at the
        same point of the step (once per process: the groups are cached)."""
        import torch.distributed as dist

        self.dist = dist
        self.group = dist.group.WORLD   # global_rank() gives ranks of the default group
        self.global_rank = global_rank   # pipeline rank -> process rank (data-parallel replicas)
        self.timeout = datetime.timedelta(seconds=timeout_s)
        self.timeout_s = timeout_s
        self.device = torch.device(device)
        on_cpu = self.device.type == "cpu"
        self.recv_lookahead = GLOO_RECV_LOOKAHEAD if on_cpu else 1
        self.peer_ordered_posts = not on_cpu
        self.directional = not on_cpu if directional is None else directional
        # (lower -> higher rank, higher -> lower rank); None: both on self.group
        self.by_direction = direction_groups() if self.directional and dist.is_initialized() else None
        self.me = dist.get_rank() if dist.is_initialized() else 0
        self.pending: list[tuple[object, torch.Tensor, Instruction]] = []
        # id(receive instruction) -> (its buffers, the works filling them)
        self.posted: dict[int, tuple[list[torch.Tensor], list[object]]] = {}
        self.gate = gate
        # one rank's transport: work to do before a receive blocks (its interpreter's deferred frees)
        self.idle: Callable[[], None] | None = None

    def _open_gate(self) -> None:
        gate, self.gate = self.gate, None
        gate()

    def send(self, instr, rank, tensors):
        # one flat buffer per dtype: a message costs one isend per dtype, not one per leaf
        if self.gate is not None:
            self._open_gate()
        dst = self.global_rank(instr.peer)
        for flat in _pack(tensors, self.device):
            self.pending.append((self._isend(flat, dst), flat, instr))

    # The process group's own send/recv: torch.distributed.isend/irecv re-check their arguments
    # and look the group up on every call (~12 us of Python per message, measured).
    def _isend(self, tensor: torch.Tensor, dst: int):
        groups = self.by_direction
        group = self.group if groups is None else groups[dst < self.me]
        return group.send([tensor], dst, 0)

    def _irecv(self, tensor: torch.Tensor, src: int):
        groups = self.by_direction
        group = self.group if groups is None else groups[self.me < src]
        return group.recv([tensor], src, 0)

    def post_recv(self, instr, rank):
        key = id(instr)
        if key in self.posted:
            return
        if self.gate is not None:
            self._open_gate()
        src = self.global_rank(instr.peer)
        layout = _LAYOUTS.get(key)
        if layout is None or layout.instr is not instr:
            layout = _recv_layout(instr)
        device = self.device
        if layout.single is not None:   # the common message: one activation or one gradient
            shape, dtype, nonempty = layout.single
            buf = torch.empty(shape, dtype=dtype, device=device)
            self.posted[key] = ([buf], [self._irecv(buf, src)] if nonempty else [])
            return
        # one flat buffer per dtype (as the sender packs them); each value is a view into it
        bufs: list[torch.Tensor | None] = [None] * len(instr.specs)
        for k, shape, dtype in layout.empties:
            bufs[k] = torch.empty(shape, dtype=dtype, device=device)
        works = []
        for dtype, members, shape_or_numel, templates in layout.groups:
            flat = torch.empty(shape_or_numel, dtype=dtype, device=device)
            if templates is None:
                bufs[members[0]] = flat
            else:
                for k, view in zip(members, torch._C._nn.unflatten_dense_tensors(flat, templates)):
                    bufs[k] = view
            works.append(self._irecv(flat, src))
        self.posted[key] = (bufs, works)

    def recv(self, instr, rank):
        self.post_recv(instr, rank)
        bufs, works = self.posted.pop(id(instr))
        if self.idle is not None and works and not works[-1].is_completed():
            self.idle()
        for work in works:
            self._wait(work, instr)
        return bufs

    def _wait(self, work, instr) -> None:
        try:
            ok = work.wait(self.timeout)
        except RuntimeError as e:
            timed_out = "imeout" in str(e) or "imed out" in str(e)
            what = f"no reply within {self.timeout_s:g} s" if timed_out else "it died or closed the connection"
            raise TimeoutError(f"no answer from rank {instr.peer}: {what} [{str(e).splitlines()[0][:160]}]. "
                               "Fix: check that rank's log (it may have crashed); raise the timeout if it is "
                               "only slow.") from None
        if ok is False:
            raise TimeoutError(f"no answer from rank {instr.peer}: no reply within {self.timeout_s:g} s. "
                               "Fix: check that rank's log; raise the timeout if it is only slow.")

    def finish(self):
        pending, self.pending = self.pending, []
        for work, _, instr in pending:
            self._wait(work, instr)
