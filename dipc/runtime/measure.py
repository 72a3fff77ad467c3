"""Measure what SEMU predicts: per-instruction wall times, step times and live tensor memory of
real runs of a compiled pipeline (local executor or one gloo rank per process).

Why here and not in ``dipc.semu``: measuring runs the interpreter, and ``semu`` must not import
``runtime`` (``ir <- passes/semu <- runtime``). :mod:`dipc.semu.calibrate` fits profiles to the
plain-data samples these functions return.

- :func:`timed_local_step`: one step with all ranks in this process, every instruction timed
  (the local executor runs ranks one after another, so an instruction's wall time is its own).
- :func:`timed_distributed_step`: one step of this process's rank under ``torch.distributed``;
  returns the step's wall time from a barrier (all ranks start together) to this rank's end.
- :func:`measure_gloo_link`: one-way times of gloo messages between two local processes
  (ping-pong), for :func:`dipc.semu.calibrate.fit_link`.
- :class:`LiveMemory`: a ``TorchDispatchMode`` that counts the bytes of every storage an op
  creates until the storage is freed (weak references), attributed to the rank that was running
  when it was allocated; :func:`measured_peak_memory` runs one step under it.

Not measured: allocator caching/fragmentation (we count live tensor bytes, not RSS), storages
created outside ATen ops (e.g. ``torch.from_numpy``), and gloo's internal send buffers.
"""
from __future__ import annotations

import statistics
import time
import weakref
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from dipc.errors import ScheduleError
from dipc.ir import Instruction, Op, Program
from dipc.runtime.interpreter import RankInterpreter
from dipc.runtime.recompute import apply_recompute
from dipc.runtime.transport import LocalTransport

if TYPE_CHECKING:
    from dipc.api import CompiledPipeline

__all__ = ["InstructionTiming", "LiveMemory", "measure_gloo_link", "measured_peak_memory", "timed_distributed_step",
           "timed_local_step"]


@dataclass
class InstructionTiming:
    """Wall seconds of every instruction of one local step: ``(rank, instruction, seconds)``."""

    records: list[tuple[int, Instruction, float]] = field(default_factory=list)
    step_seconds: float = 0.0

    def compute_times(self) -> list[tuple[str, int, int, float]]:
        """``(op, stage, mb, seconds)`` of the compute instructions (what calibration fits)."""
        return [(op, s, m, t) for (op, s, m), t in self.by_key().items()]

    @property
    def untimed_seconds(self) -> float:
        """Step time outside every instruction (the dispatch loop, the optimizer call)."""
        return self.step_seconds - sum(t for _, _, t in self.records)

    def other_times(self) -> list[tuple[str, float]]:
        """``(op, seconds)`` of the loads, sends and receives (their fixed CPU times, for calibration)."""
        return [(i.op.value, t) for _, i, t in self.records
                if i.op in (Op.LOAD, Op.SEND_ACT, Op.SEND_GRAD, Op.RECV_ACT, Op.RECV_GRAD)]

    def by_key(self) -> dict[tuple[str, int, int], float]:
        """``(op, stage, mb) -> seconds`` of the compute instructions."""
        return {(i.op.value, i.stage, i.mb): t for _, i, t in self.records
                if i.op in (Op.FWD, Op.BWD, Op.BWD_I, Op.BWD_W)}


def _cuda_clock() -> float:
    """Wall time once the GPU has finished the work queued so far: an instruction's launches are
    asynchronous, so only a synchronised clock charges it with its kernels' time."""
    torch.cuda.synchronize()
    return time.perf_counter()


_CLOCKS = {"wall": time.perf_counter, "cpu": time.thread_time, "cuda": _cuda_clock}


def _clock(name: str) -> Callable[[], float]:
    try:
        return _CLOCKS[name]
    except KeyError:
        raise ValueError(f"clock={name!r}. Fix: use 'wall', 'cpu' or 'cuda'.") from None


def _timed_handlers(interp: RankInterpreter, sink: list[tuple[int, Instruction, float]],
                    clock: Callable[[], float]) -> None:
    for op, handler in list(interp.handlers.items()):
        def timed(instr: Instruction, _h: Callable[[Instruction], None] = handler) -> None:
            t0 = clock()
            _h(instr)
            sink.append((interp.rank, instr, clock() - t0))
        interp.handlers[op] = timed


def _run_ranks(pipe: "CompiledPipeline", program: Program, microbatches: Sequence[Mapping],
               prepare: Callable[[RankInterpreter], None] | None = None,
               on_switch: Callable[[int], None] | None = None, step_optimizer: bool = True) -> None:
    # the program's checkpointing choice, as the executors apply it: without this a program with
    # none (or one per stage) ran with the wrappers the previously measured program left
    apply_recompute(program, pipe.stages)
    transport = LocalTransport()
    microbatches = program.ordered(microbatches)   # slot m runs the caller's microbatch_order[m]
    weights = pipe.loss_weights(microbatches)
    subs = pipe.sub_batches(microbatches)
    ranks = [RankInterpreter(r, program, pipe.stages, microbatches, weights, transport, pipe.treespecs,
                             sub_batches=subs) for r in range(program.num_ranks)]
    for r in ranks:
        if prepare is not None:
            prepare(r)
    while not all(r.done for r in ranks):
        progressed = False
        for r in ranks:
            if on_switch is not None:
                on_switch(r.rank)
            progressed |= r.run(until_blocked=True)
        if not progressed:
            raise ScheduleError("local execution deadlocked while measuring. Fix: validate the program.")
    for r in range(program.num_ranks if step_optimizer else 0):
        if on_switch is not None:
            on_switch(r)
        pipe.step_optimizer(r)


def timed_local_step(pipe: "CompiledPipeline", microbatches: Sequence[Mapping],
                     program: Program | None = None, clock: str = "wall",
                     step_optimizer: bool = True) -> InstructionTiming:
    """One local step with every instruction timed (the optimizer step included in the total,
    unless ``step_optimizer`` is False: then the parameters keep their values and only gain
    gradients).

    ``clock="cpu"`` times with this thread's CPU time instead of wall time: with one torch thread
    the work runs on this thread, so on a shared, oversubscribed machine it measures the work and
    not the time other processes held the core (what calibration wants)."""
    tick = _clock(clock)
    program = pipe.program_for(microbatches, program)
    out = InstructionTiming()
    t0 = tick()
    _run_ranks(pipe, program, microbatches, prepare=lambda r: _timed_handlers(r, out.records, tick),
               step_optimizer=step_optimizer)
    out.step_seconds = tick() - t0
    return out


def timed_distributed_step(pipe: "CompiledPipeline", microbatches: Sequence[Mapping],
                           program: Program | None = None, timeout_s: float = 60.0) -> float:
    """Seconds of one step of this process's rank, from a barrier that starts every rank together
    to the end of its stream (its posted sends completed); the step time is the max over ranks."""
    import torch.distributed as dist

    from dipc.runtime.distributed import run_step_distributed

    program = pipe.program_for(microbatches, program)
    dist.barrier()
    t0 = time.perf_counter()
    run_step_distributed(pipe, microbatches, program, timeout_s=timeout_s)
    return time.perf_counter() - t0


def _pingpong(rank: int, world: int, sizes: Sequence[int], repeats: int) -> list[tuple[float, float]]:
    import torch.distributed as dist

    bufs = [torch.zeros(max(1, nbytes // 4), dtype=torch.float32) for nbytes in sizes]
    times: list[list[float]] = [[] for _ in sizes]
    # sizes round-robin within each repeat, so a burst of load on a shared machine hits every size alike
    for i in range(repeats + 2):
        for k, buf in enumerate(bufs):
            dist.barrier()
            t0 = time.perf_counter()
            if rank == 0:
                dist.send(buf, 1)
                dist.recv(buf, 1)
            else:
                dist.recv(buf, 0)
                dist.send(buf, 0)
            if i >= 2:
                times[k].append((time.perf_counter() - t0) / 2)
    return [(float(buf.numel() * 4), statistics.median(ts)) for buf, ts in zip(bufs, times)]


def measure_gloo_link(sizes: Sequence[int] = (4, 1 << 14, 1 << 17, 1 << 20, 1 << 22), repeats: int = 20,
                      timeout_s: float = 120.0) -> list[tuple[float, float]]:
    """``(bytes, one-way seconds)`` of gloo messages between two local processes (median ping-pong / 2)."""
    from dipc.runtime.launch import spawn

    return spawn(_pingpong, 2, list(sizes), repeats, timeout_s=timeout_s)[0]


class LiveMemory(TorchDispatchMode):
    """Live bytes of the storages ATen ops create, per rank, and each rank's peak.

    ``rank`` (set by the caller when it switches ranks) is charged for every new storage; a
    storage is uncharged from the rank that allocated it when it is freed. ``base[r]`` (bytes
    that exist before the step: parameters, optimizer states) is added to rank ``r``'s numbers.
    """

    def __init__(self, num_ranks: int, base: Sequence[float] | None = None) -> None:
        super().__init__()
        self.rank = 0
        self.live = [float(b) for b in (base or [0.0] * num_ranks)]
        self.peak = list(self.live)
        self._refs: dict[int, Any] = {}

    def _free(self, key: int, rank: int, nbytes: int) -> None:
        self.live[rank] -= nbytes
        self._refs.pop(key, None)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        out = func(*args, **(kwargs or {}))
        inputs = None
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor) or t.device.type == "meta":
                continue
            storage = t.untyped_storage()
            key = storage._cdata
            if key in self._refs:
                continue
            if inputs is None:   # a view or in-place result of a tensor from before (a parameter): not new
                inputs = {x.untyped_storage()._cdata for x in tree_flatten((args, kwargs))[0]
                          if isinstance(x, torch.Tensor) and x.device.type != "meta"}
            if key in inputs:
                continue
            nbytes, rank = storage.nbytes(), self.rank
            self.live[rank] += nbytes
            if self.live[rank] > self.peak[rank]:
                self.peak[rank] = self.live[rank]
            self._refs[key] = weakref.ref(storage, lambda _, k=key, r=rank, n=nbytes: self._free(k, r, n))
        return out


def _tensor_bytes(tensors: Any) -> int:
    seen: dict[int, int] = {}
    for t in tensors:
        if isinstance(t, torch.Tensor):
            st = t.untyped_storage()
            seen[st._cdata] = st.nbytes()
    return sum(seen.values())


def measured_peak_memory(pipe: "CompiledPipeline", microbatches: Sequence[Mapping],
                         program: Program | None = None) -> list[float]:
    """Peak live tensor bytes per rank during one local step: the rank's parameters and optimizer
    states (present before the step), plus everything the step allocates while that rank runs
    (activations stashed for backward, received messages, gradients, temporaries).

    Gradients are freed first (``set_to_none``), as the runtime's optimizer step leaves them, so
    the step allocates them at each stage's first backward.
    """
    program = pipe.program_for(microbatches, program)
    pipe.model.zero_grad(set_to_none=True)
    base = []
    for r in range(program.num_ranks):
        params = pipe.rank_parameters(r)
        frozen = [p for s in pipe.stages if s.rank == r for p in s.params if not p.requires_grad]
        opt = pipe.optimizers.get(r)
        states = [v for st in (opt.state.values() if opt else ()) for v in st.values()]
        base.append(_tensor_bytes(list(params) + frozen + states))
    with LiveMemory(program.num_ranks, base) as mem:
        def switch(rank: int) -> None:
            mem.rank = rank
        _run_ranks(pipe, program, microbatches, on_switch=switch)
    return mem.peak
