"""Runs one rank's stream over torch.distributed (gloo on CPU, NCCL on GPU).

Every process builds the same model and compiles the same pipeline; plans are deterministic
functions of the batch, so every rank derives the same program (issue #6 adds broadcast and a
plan-hash check). Each rank then executes only its own stream.
"""
from __future__ import annotations

import datetime
import os
import time
from typing import TYPE_CHECKING, Mapping, Sequence

import torch

from dipc.errors import DipcError, RuntimeStepError
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


def run_step_distributed(pipe: "CompiledPipeline", microbatches: Sequence[Mapping], program: "Program | None" = None,
                         timeout_s: float = DEFAULT_TIMEOUT_S) -> "StepResult":
    """One training step on this process's rank; returns the full-batch loss on every rank."""
    import torch.distributed as dist

    from dipc.api import StepResult

    rank, world = dist.get_rank(), dist.get_world_size()
    if world != pipe.num_ranks:
        raise DipcError(f"world size {world} but the pipeline has {pipe.num_ranks} ranks. Fix: launch with "
                        f"--nproc-per-node {pipe.num_ranks} or compile with num_stages={world}.")
    t0 = time.perf_counter()
    program = program or pipe.plan(microbatches)
    weights = pipe.loss_weights(microbatches)
    transport = DistributedTransport(timeout_s)
    opt = pipe.optimizers.get(rank)

    def optimizer_step() -> None:
        if opt is not None:
            opt.step()
            opt.zero_grad(set_to_none=True)

    interp = RankInterpreter(rank, program, pipe.stages, microbatches, weights, transport, pipe.treespecs,
                             optimizer_step=optimizer_step if opt is not None else None)
    try:
        interp.run()
        transport.finish()
    except TimeoutError as e:
        step = interp.pc
        instr = program.streams[rank][step] if step < len(program.streams[rank]) else "end of step"
        raise RuntimeStepError(rank, step, str(instr), f"{e}. Fix: check that rank is alive; raise the "
                               "timeout if it is just slow.") from None
    losses = torch.zeros(len(microbatches), dtype=torch.float64)
    for m, l in interp.stats.losses.items():
        losses[m] = l
    dist.all_reduce(losses)
    mb_losses = losses.tolist()
    return StepResult(loss=sum(w * l for w, l in zip(weights, mb_losses)), microbatch_losses=mb_losses,
                      seconds=time.perf_counter() - t0, program=program)
