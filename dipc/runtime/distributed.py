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
from typing import TYPE_CHECKING, Mapping, Sequence

import torch

from dipc.errors import DipcError, RuntimeStepError
from dipc.runtime.data_parallel import GradReducer, topology
from dipc.runtime.interpreter import RankInterpreter
from dipc.runtime.transport import DistributedTransport

if TYPE_CHECKING:
    from dipc.api import CompiledPipeline, StepResult
    from dipc.ir import Program

DEFAULT_TIMEOUT_S = 60.0


def init_process_group(backend: str | None = None, timeout_s: float = DEFAULT_TIMEOUT_S) -> tuple[int, int]:
    """Join the process group torchrun (or dipc's spawn helper) describes in the environment."""
    import torch.distributed as dist

    if not dist.is_initialized():
        missing = [k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
        if missing:
            raise DipcError(f"environment variables {missing} are not set, so this process does not know its rank. "
                            "Fix: launch with `torchrun --nproc-per-node N ...` or dipc.runtime.launch.spawn().")
        backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
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


def run_step_distributed(pipe: "CompiledPipeline", microbatches: Sequence[Mapping], program: "Program | None" = None,
                         timeout_s: float = DEFAULT_TIMEOUT_S) -> "StepResult":
    """One training step on this process's rank, for this replica's ``microbatches``.

    Loss weights are normalised over all replicas, and gradients summed over them, so the update
    equals one backward over the global batch. Returns the global loss on every rank.
    """
    import torch.distributed as dist

    from dipc.api import StepResult

    topo = topology(pipe.num_ranks)
    t0 = time.perf_counter()
    program = program or pipe.plan(microbatches)
    raw = torch.tensor([float(pipe.loss_weight(mb)) for mb in microbatches], dtype=torch.float64)
    total = raw.sum().reshape(1)
    if topo.dp > 1:
        dist.all_reduce(total, group=topo.dp_group)
    if total.item() <= 0:
        raise DipcError("every microbatch has loss weight 0 (no label tokens?). Fix: check the labels.")
    weights = (raw / total).tolist()
    transport = DistributedTransport(timeout_s, global_rank=topo.global_rank)
    rank = topo.pp_rank
    opt = pipe.optimizers.get(rank)
    reducer = None
    if topo.dp > 1:
        owned = {s.id: s.params for s in pipe.stages if s.rank == rank}
        reducer = GradReducer(owned, topo.dp_group, timeout_s)

    def optimizer_step() -> None:
        if reducer is not None:
            reducer.wait()
        if opt is not None:
            opt.step()
            opt.zero_grad(set_to_none=True)

    interp = RankInterpreter(rank, program, pipe.stages, microbatches, weights, transport, pipe.treespecs,
                             optimizer_step=optimizer_step, reduce_grads=reducer.start if reducer else None)
    try:
        interp.run()
        transport.finish()
    except TimeoutError as e:
        step = interp.pc
        instr = program.streams[rank][step] if step < len(program.streams[rank]) else "end of step"
        raise RuntimeStepError(topo.rank, step, str(instr), f"{e}. Fix: check that rank is alive; raise the "
                               "timeout if it is just slow.") from None
    losses = torch.zeros(len(microbatches), dtype=torch.float64)
    for m, l in interp.stats.losses.items():
        losses[m] = l
    if topo.pp > 1:
        dist.all_reduce(losses, group=topo.pp_group)
    mb_losses = losses.tolist()
    replica_loss = torch.tensor([sum(w * l for w, l in zip(weights, mb_losses)) if rank == 0 else 0.0],
                                dtype=torch.float64)
    dist.all_reduce(replica_loss)
    return StepResult(loss=replica_loss.item(), microbatch_losses=mb_losses,
                      seconds=time.perf_counter() - t0, program=program)
