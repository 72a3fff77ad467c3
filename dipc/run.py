"""``dipc run`` / ``python -m dipc.run``: the training job users put after ``torchrun``.

    torchrun --nproc-per-node 4 -m dipc.run --model vlm --pp 2 --steps 100 --checkpoint-dir ckpt

The world is ``pp`` pipeline ranks times ``world / pp`` data-parallel replicas (process ``g`` is
pipeline rank ``g % pp`` of replica ``g // pp``). Each step draws one global batch of
``--microbatches`` microbatches; replica ``d`` trains on microbatches ``d, d + dp, ...``; gradients
are all-reduced across replicas, so every step equals one full-batch update.

Planning: with ``--async-plan`` pipeline rank 0 of each replica plans batch i+1 on a forked CPU
worker while batch i trains and broadcasts each program to its pipeline (:mod:`dipc.runtime.async_plan`);
otherwise every rank plans itself (plans are deterministic) and the ranks check they agree —
except ``--schedule dip``, whose SEMU profile each process measures (on CPU): rank 0 of each
pipeline plans and broadcasts.
``--checkpoint-dir`` saves model, optimizer, step, RNG and data position every
``--checkpoint-every`` steps (torch.distributed.checkpoint, sharded per stage); ``--resume``
continues from it exactly. Without torchrun's environment, ``--nproc`` processes are spawned on
this machine (gloo).

The model is one of the example LMMs (tiny, random init: this machine has no model hub).
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from dipc.errors import DipcError


@dataclass(frozen=True)
class RunConfig:
    model: str = "vlm"
    pp: int = 2
    schedule: str = "1f1b"
    chunks: int | None = None
    steps: int = 20
    microbatches: int = 4          # per global batch
    samples_per_microbatch: int = 2
    lr: float = 3e-3
    seed: int = 0
    checkpoint_dir: str | None = None
    checkpoint_every: int = 0
    resume: bool = False
    async_plan: bool = False
    timeout_s: float = 60.0
    search_s: float = 0.0          # schedule dip: seconds of phase 1's MCTS per batch
    nproc: int | None = None       # without torchrun: processes to spawn (default pp)


def _check(cfg: RunConfig, world: int) -> None:
    """Bad launches fail here, on every rank, before any collective or training step."""
    if world % cfg.pp:
        raise DipcError(f"world size {world} is not divisible by --pp {cfg.pp}, so the processes cannot form "
                        f"whole pipeline replicas. Fix: launch a multiple of {cfg.pp} processes.")
    if cfg.microbatches < world // cfg.pp:
        raise DipcError(f"{cfg.microbatches} microbatches per batch cannot feed {world // cfg.pp} data-parallel "
                        f"replicas. Fix: pass --microbatches >= {world // cfg.pp}.")
    if cfg.resume and not cfg.checkpoint_dir:
        raise DipcError("--resume needs --checkpoint-dir. Fix: name the directory the checkpoint was saved in.")
    if cfg.resume and not Path(cfg.checkpoint_dir).exists():
        raise DipcError(f"--resume: no checkpoint at {cfg.checkpoint_dir!r}. Fix: check the path, or drop --resume "
                        "to start fresh.")


def train_rank(cfg: RunConfig, log=print) -> list[float]:
    """This process's part of the job (it must already be in a process group)."""
    import torch.distributed as dist

    import dipc
    from dipc.runtime.async_plan import AsyncPlanner, broadcast_program
    from dipc.runtime.checkpoint import load_checkpoint, save_checkpoint
    from dipc.runtime.data_parallel import topology
    from dipc.runtime.distributed import replica_microbatches, run_step_distributed
    from examples.data import make_example

    rank, world = dist.get_rank(), dist.get_world_size()
    _check(cfg, world)
    ex = make_example(cfg.model, seed=cfg.seed)
    fresh = ex.data.state_dict()
    example = ex.data.microbatches(1, cfg.samples_per_microbatch)[0]
    ex.data.load_state_dict(fresh)                         # training starts from the stream's beginning
    pipe = dipc.compile(ex.model, example, num_stages=cfg.pp, chunks=cfg.chunks, schedule=cfg.schedule,
                        loss_weight=ex.loss_weight, optimizer=lambda ps: torch.optim.AdamW(ps, lr=cfg.lr),
                        search_s=cfg.search_s)
    topo = topology(cfg.pp)
    start = 0
    if cfg.resume:
        state = load_checkpoint(cfg.checkpoint_dir, pipe)
        start = state["step"]
        ex.data.load_state_dict(state["data_state"])
    if cfg.schedule == "dip" and cfg.async_plan and topo.pp_rank == 0 and pipe.needs_calibration():
        # before the fork, on a sample of the stream (restored after): the worker inherits the profile
        probe = ex.data.state_dict()
        pipe.calibrate([ex.data.microbatches(cfg.microbatches, cfg.samples_per_microbatch)])
        ex.data.load_state_dict(probe)
    planner = AsyncPlanner(pipe, workers=1) if cfg.async_plan and topo.pp_rank == 0 else None
    src = topo.global_rank(0)

    def next_batch():
        return replica_microbatches(ex.data.microbatches(cfg.microbatches, cfg.samples_per_microbatch), cfg.pp)

    losses: list[float] = []
    try:
        pending = next_batch()
        if planner:
            planner.submit(start, pending)
        for step in range(start, cfg.steps):
            mbs, data_state = pending, ex.data.state_dict()   # the stream right after this step's batch
            if step + 1 < cfg.steps:
                pending = next_batch()
                if planner:
                    planner.submit(step + 1, pending)
            t0 = time.perf_counter()
            if cfg.async_plan:
                program = planner.get(step, mbs).program if planner else None
                program = broadcast_program(program, src=src, group=topo.pp_group)
            elif cfg.schedule == "dip":   # scored on a profile each process measures: one rank plans
                program = broadcast_program(pipe.plan(mbs) if topo.pp_rank == 0 else None, src=src, group=topo.pp_group)
            else:
                program = pipe.plan(mbs)
            plan_ms = (time.perf_counter() - t0) * 1e3
            result = run_step_distributed(pipe, mbs, program, timeout_s=cfg.timeout_s)
            losses.append(result.loss)
            if rank == 0:
                log(f"step {step:4d}  loss {result.loss:.4f}  step {result.seconds * 1e3:7.1f} ms  plan {plan_ms:6.1f} ms")
            done = step + 1
            if cfg.checkpoint_dir and cfg.checkpoint_every and (done % cfg.checkpoint_every == 0 or done == cfg.steps):
                save_checkpoint(cfg.checkpoint_dir, pipe, step=done, data_state=data_state)
    finally:
        if planner:
            planner.close()
    return losses


def _spawned(rank: int, world: int, cfg: RunConfig) -> list[float]:
    return train_rank(cfg, log=lambda s: print(s, flush=True))


def run(cfg: RunConfig) -> list[float]:
    """Run the job in this process (under torchrun) or spawn ``nproc`` local gloo processes."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        from dipc.runtime.affinity import pin_local_rank
        from dipc.runtime.distributed import init_process_group

        _check(cfg, int(os.environ["WORLD_SIZE"]))
        # before the process group starts its I/O threads, so they inherit the rank's cores
        pin_local_rank(int(os.environ.get("LOCAL_RANK", "0")), int(os.environ.get("LOCAL_WORLD_SIZE", "1")),
                       uses_gpu=torch.cuda.is_available())
        init_process_group(timeout_s=cfg.timeout_s)
        return train_rank(cfg)
    from dipc.runtime.launch import spawn

    world = cfg.nproc or cfg.pp
    _check(cfg, world)
    return spawn(_spawned, world, cfg, timeout_s=cfg.timeout_s * max(cfg.steps, 1))[0]


def main(argv: list[str] | None = None) -> None:
    from dipc.cli import cli

    cli.main(args=["run", *(argv if argv is not None else __import__("sys").argv[1:])], prog_name="dipc")


if __name__ == "__main__":
    main()
