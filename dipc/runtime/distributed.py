"""Runs one rank's stream over torch.distributed (gloo on CPU, NCCL on GPU), with data parallelism.

Every process builds the same model and compiles the same pipeline; plans are deterministic
functions of the batch, so the ranks of a replica derive the same program from the same
microbatches (issue #6 adds broadcast and a plan-hash check). Each process then executes only its
own stream; replicas all-reduce gradients per stage (see :mod:`dipc.runtime.data_parallel`).
"""
from __future__ import annotations

import datetime
import os
import time
import zlib
from typing import TYPE_CHECKING, Mapping, Sequence

import torch

from dipc.errors import DipcError
from dipc.runtime.data_parallel import GradReducer, topology
from dipc.runtime.interpreter import RankInterpreter
from dipc.runtime.recompute import apply_recompute
from dipc.runtime.timeline import MeasuredTimeline
from dipc.runtime.transport import DistributedTransport

if TYPE_CHECKING:
    from dipc.api import CompiledPipeline, StepResult
    from dipc.ir import Program

DEFAULT_TIMEOUT_S = 60.0
_CHECKSUMS: dict[int, tuple["Program", int]] = {}   # id(program) -> (program, checksum of its text dump)


def init_process_group(backend: str | None = None, timeout_s: float = DEFAULT_TIMEOUT_S) -> tuple[int, int]:
    """Join the process group torchrun (or dipc's spawn helper) describes in the environment."""
    import torch.distributed as dist

    if not dist.is_initialized():
        missing = [k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
        if missing:
            raise DipcError(f"environment variables {missing} are not set, so this process does not know its rank. "
                            "Fix: launch with `torchrun --nproc-per-node N ...` or dipc.runtime.launch.spawn().")
        backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    return dist.get_rank(), dist.get_world_size()


def replica_microbatches(microbatches: Sequence[Mapping], pipeline_depth: int) -> list[Mapping]:
    """This process's replica's share of a global batch's microbatches (round-robin)."""
    topo = topology(pipeline_depth)
    mine = list(microbatches[topo.dp_rank::topo.dp])
    if not mine:
        raise DipcError(f"{len(microbatches)} microbatches cannot feed {topo.dp} data-parallel replicas. "
                        f"Fix: use at least {topo.dp} microbatches per global batch.")
    return mine


def collective(what: str, rank: int, call):
    """Run a collective; a dead or stuck peer becomes a DipcError naming this rank and the step."""
    try:
        return call()
    except RuntimeError as e:
        raise DipcError(f"rank {rank}: the {what} collective failed: {str(e).splitlines()[0][:200]}. A peer "
                        "died or did not join in time. Fix: check the other ranks' logs; raise the timeout "
                        "if they are only slow.") from None


def _program_checksum(program: "Program") -> int:
    from dipc.ir.text import dump_program

    crc = _CHECKSUMS.get(id(program), (None, 0))
    if crc[0] is not program:   # plans recur (CompiledPipeline caches them): dump each one once
        if len(_CHECKSUMS) >= 16:
            _CHECKSUMS.pop(next(iter(_CHECKSUMS)))
        crc = _CHECKSUMS[id(program)] = (program, zlib.crc32(dump_program(program).encode()))
    return crc[1]


class ProgramCheck:
    """Every rank of a pipeline must run the same program: an all-gather of a checksum of its text
    dump, compared before this rank's first message (a mismatch would otherwise surface as a hang
    or wrong shapes).

    Why posted asynchronously and waited at the first send or receive (:meth:`wait`, the
    transport's gate): a rank's instructions before its first message (its first LOAD and FWD)
    touch no peer, so the collective's latency hides behind them instead of adding to the step."""

    def __init__(self, program: "Program", topo, device: torch.device) -> None:
        import torch.distributed as dist

        self.topo = topo
        self.mine = torch.tensor([_program_checksum(program)], dtype=torch.int64, device=device)
        self.every = [torch.zeros_like(self.mine) for _ in range(topo.pp)]
        self.work = collective("plan check", topo.rank,
                               lambda: dist.all_gather(self.every, self.mine, group=topo.pp_group, async_op=True))

    def wait(self) -> None:
        """Complete the check; raise if the ranks' programs differ or a peer never joined."""
        work, self.work = self.work, None
        if work is not None:
            collective("plan check", self.topo.rank, work.wait)
            self._compare()

    def mismatch(self) -> DipcError | None:
        """After this rank failed mid-step: the plan mismatch that explains it, if the check
        completes and finds one (a failed collective says nothing new, so it gives None)."""
        work, self.work = self.work, None
        if work is not None:
            try:
                work.wait()
            except RuntimeError:
                return None
        try:
            self._compare()
        except DipcError as e:
            return e
        return None

    def _compare(self) -> None:
        sums = [int(t.item()) for t in self.every]
        if len(set(sums)) > 1:
            groups: dict[int, list[int]] = {}
            for r, c in enumerate(sums):
                groups.setdefault(c, []).append(r)
            raise DipcError(f"pipeline ranks planned different programs (ranks grouped by program: "
                            f"{sorted(groups.values())}); this rank is {self.topo.pp_rank}. Fix: give every rank "
                            "of a replica the same microbatches and the same dipc.compile arguments (plans are "
                            "deterministic functions of both).")


def check_same_program(program: "Program", topo, device: torch.device) -> None:
    """:class:`ProgramCheck`, waited at once (for callers that send before running any compute)."""
    if topo.pp > 1:
        ProgramCheck(program, topo, device).wait()


def aligned_origin(topo) -> float:
    """A ``time.perf_counter()`` reading that every rank of this pipeline takes at (nearly) the
    same moment: right after a barrier over the pipeline's ranks returns.

    Why a barrier and not the clocks themselves: ranks may run on different hosts whose monotonic
    clocks have unrelated zeros, while a barrier releases all ranks within its release skew (tens of
    microseconds for gloo on one host; a network round trip across hosts). Spans measured from this
    origin are therefore comparable across ranks up to that skew. Not handled: clock drift during
    the step (negligible over one step).
    """
    import torch.distributed as dist

    collective("timeline clock alignment", topo.rank, lambda: dist.barrier(group=topo.pp_group))
    return time.perf_counter()


def gather_timeline(program: "Program", spans: Sequence[tuple], origin: float, topo) -> MeasuredTimeline:
    """Every pipeline rank's spans (shifted to its :func:`aligned_origin`) gathered onto every rank
    of the replica, so each process's StepResult carries the whole pipeline's timeline."""
    import torch.distributed as dist

    mine = [(r, pc, op, st, mb, s - origin, e - origin) for r, pc, op, st, mb, s, e in spans]
    every: list[list[tuple] | None] = [None] * topo.pp
    collective("timeline gather", topo.rank, lambda: dist.all_gather_object(every, mine, group=topo.pp_group))
    return MeasuredTimeline.from_raw(program, [s for part in every for s in (part or ())], 0.0,
                                     executor="distributed")


def run_step_distributed(pipe: "CompiledPipeline", microbatches: Sequence[Mapping], program: "Program | None" = None,
                         timeout_s: float = DEFAULT_TIMEOUT_S, *, record_timeline: bool = False,
                         step_optimizer: bool = True) -> "StepResult":
    """One training step on this process's rank, for this replica's ``microbatches``.

    Loss weights are normalised over all replicas, and gradients summed over them, so the update
    equals one backward over the global batch. Returns the global loss on every rank.

    ``record_timeline``: time every instruction of every rank; ``result.timeline`` (on every rank)
    holds this replica's whole pipeline, with clocks aligned by a barrier (:func:`aligned_origin`).
    Costs one barrier and one object all-gather per step, so leave it off when timing the step.
    ``step_optimizer=False``: the parameters keep their values and only gain gradients (timing and
    calibration steps; the data-parallel all-reduce still runs).
    """
    import torch.distributed as dist

    topo = topology(pipe.num_ranks)
    t0 = time.perf_counter()
    program = pipe.program_for(microbatches, program)
    microbatches = program.ordered(microbatches)   # slot m runs the caller's microbatch_order[m]
    # collectives run on the parameters' device (NCCL needs CUDA tensors, gloo CPU ones)
    device = next(pipe.model.parameters()).device
    plan_check = ProgramCheck(program, topo, device) if topo.pp > 1 else None
    raw = torch.tensor([float(pipe.loss_weight(mb)) for mb in microbatches], dtype=torch.float64, device=device)
    total = raw.sum().reshape(1)
    if topo.dp > 1:
        collective("loss-weight", topo.rank, lambda: dist.all_reduce(total, group=topo.dp_group))
    if total.item() <= 0:
        raise DipcError("every microbatch has loss weight 0 (no label tokens?). Fix: check the labels.")
    weights = (raw / total).tolist()
    transport = DistributedTransport(timeout_s, device=device, global_rank=topo.global_rank,
                                     gate=plan_check.wait if plan_check else None)
    rank = topo.pp_rank
    reducer = None
    if topo.dp > 1:
        owned = {s.id: s.params for s in pipe.stages if s.rank == rank}
        reducer = GradReducer(owned, topo.dp_group, timeout_s)

    def optimizer_step() -> None:
        if reducer is not None:
            reducer.wait()
        if step_optimizer:
            pipe.step_optimizer(rank)

    apply_recompute(program, pipe.stages)   # the program's activation-checkpointing choice
    interp = RankInterpreter(rank, program, pipe.stages, microbatches, weights, transport, pipe.treespecs,
                             optimizer_step=optimizer_step, reduce_grads=reducer.start if reducer else None,
                             sub_batches=pipe.sub_batches(microbatches), record_timeline=record_timeline)
    transport.idle = interp.release_finished   # a receive about to wait frees finished graphs first
    if record_timeline:   # the barrier comes before the loss all-reduce on every rank (gloo matches by order)
        if plan_check is not None:
            plan_check.wait()
        origin = aligned_origin(topo)
    else:
        origin = 0.0
    # The loss all-reduce brings the loss rank's losses to every rank. A rank without a loss stage
    # adds zeros, so it posts them now and the collective completes while it computes (its last
    # backward usually ends the step); the loss rank posts once its stream has run.
    losses = torch.zeros(len(microbatches), dtype=torch.float64, device=device)
    has_loss = any(s.has_loss for s in pipe.stages if s.rank == rank)
    loss_work = None
    if topo.pp > 1 and not has_loss:
        loss_work = collective("loss", topo.rank, lambda: dist.all_reduce(losses, group=topo.pp_group, async_op=True))
    try:
        interp.run()
    except Exception:
        mismatch = plan_check.mismatch() if plan_check is not None else None
        if mismatch is not None:   # a mismatched plan explains a failure better than its symptom
            raise mismatch from None
        raise
    transport.finish()
    if plan_check is not None:
        plan_check.wait()   # a rank that sends and receives nothing has not waited yet
    if has_loss:
        for m, l in interp.stats.losses.items():
            losses[m] = l
    if topo.pp > 1:
        if has_loss:
            loss_work = collective("loss", topo.rank,
                                   lambda: dist.all_reduce(losses, group=topo.pp_group, async_op=True))
        collective("loss", topo.rank, loss_work.wait)
    local = pipe.result(weights, losses.tolist(), t0, program)
    if topo.dp > 1:   # every replica's pipeline rank 0 contributes its replica's share of the global loss
        total_loss = torch.tensor([local.loss if rank == 0 else 0.0], dtype=torch.float64, device=device)
        collective("loss", topo.rank, lambda: dist.all_reduce(total_loss))
        local.loss = total_loss.item()
    if record_timeline:
        local.timeline = gather_timeline(program, interp.stats.spans or (), origin, topo)
        if topo.rank == 0:   # one writer per dump directory
            from dipc.dump import maybe_dump_measured

            maybe_dump_measured(pipe, program, microbatches, local.timeline)
    return local
