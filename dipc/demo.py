"""The embedded default job: train a tiny example LMM pipelined on CPU and report what happened.

Every rank builds the same model and data stream (same seeds), compiles the same pipeline,
plans each batch (shapes differ batch to batch, nothing is padded across microbatches) and runs
its own instruction stream; rank 0 prints the plan once and then loss and step time per step.
"""
from __future__ import annotations

import os
import statistics
import time
from dataclasses import dataclass, replace

import torch

import dipc
from dipc.ir.text import format_grid


@dataclass(frozen=True)
class DemoConfig:
    model: str = "vlm"
    stages: int = 2
    schedule: str = "dip"
    chunks: int | None = None
    steps: int = 30
    microbatches: int = 4
    samples_per_microbatch: int = 2
    lr: float = 3e-3
    seed: int = 0
    executor: str = "gloo"      # "gloo": one process per rank; "local": all ranks in this process
    timeout_s: float = 60.0
    async_plan: bool | None = None   # plan batch i+1 on a CPU worker while batch i trains (None: if cores spare)
    search_s: float = 0.0            # schedule dip: seconds of phase 1's MCTS per batch


def _build(cfg: DemoConfig):
    from examples.data import make_example

    ex = make_example(cfg.model, seed=cfg.seed)
    example = ex.data.microbatches(1, cfg.samples_per_microbatch)[0]
    pipe = dipc.compile(ex.model, example, num_stages=cfg.stages, chunks=cfg.chunks, schedule=cfg.schedule,
                        loss_weight=ex.loss_weight, search_s=cfg.search_s,
                        optimizer=lambda params: torch.optim.AdamW(params, lr=cfg.lr))
    return ex, pipe


def _describe_program(program) -> str:
    counts = ", ".join(f"rank {r}: {len(s)}" for r, s in enumerate(program.streams))
    return f"instructions per rank: {counts}\n" + format_grid(program, max_rows=24)


def _use_async(cfg: DemoConfig) -> bool:
    """Auto: plan ahead only when the machine has a core beyond the ranks this host runs."""
    if cfg.async_plan is not None:
        return cfg.async_plan
    ranks_here = 1 if cfg.executor == "local" else int(os.environ.get("LOCAL_WORLD_SIZE", cfg.stages))
    return (os.cpu_count() or 1) > ranks_here


def train(cfg: DemoConfig, rank: int = 0, step_fn=None, log=print) -> list[float]:
    """The training loop shared by both executors; returns the loss of every step.

    With async planning, rank 0 plans batch i+1 on a forked CPU worker while batch i trains and
    (distributed) broadcasts each program; otherwise every rank plans each batch itself (plans
    are deterministic, and the ranks check they agree before running) — but schedule ``dip``,
    planned on rank 0 and broadcast (its SEMU profile is measured per process)."""
    from dipc.runtime.async_plan import AsyncPlanner, broadcast_program

    ex, pipe = _build(cfg)
    distributed = step_fn is not None
    use_async = _use_async(cfg)
    # DIP's plans are scored on a profile each process measures (on CPU): one rank plans for all
    plan_once = cfg.schedule == "dip"
    batches = [ex.data.microbatches(cfg.microbatches, cfg.samples_per_microbatch)]
    if plan_once and use_async and rank == 0 and pipe.needs_calibration():
        pipe.calibrate([batches[0]])   # before the fork: the worker inherits it, measured without a trainer beside
    planner = AsyncPlanner(pipe, workers=1) if use_async and rank == 0 else None
    if planner:
        planner.submit(0, batches[0])
    losses = []
    try:
        for step in range(cfg.steps):
            mbs = batches[step]
            if step + 1 < cfg.steps:
                batches.append(ex.data.microbatches(cfg.microbatches, cfg.samples_per_microbatch))
                if planner:
                    planner.submit(step + 1, batches[step + 1])
            t0 = time.perf_counter()
            source = "sync"
            if planner:
                outcome = planner.get(step, mbs)
                program, source = outcome.program, outcome.source
            elif not use_async and not (distributed and plan_once and rank != 0):
                program = pipe.plan(mbs)
            else:
                program = None
            if distributed and (use_async or plan_once):
                program = broadcast_program(program)
            plan_ms = (time.perf_counter() - t0) * 1e3
            result = step_fn(pipe, mbs, program) if distributed else pipe.step(mbs, program)
            batches[step] = None
            losses.append(result.loss)
            if rank == 0:
                if step == 0:
                    log(pipe.describe())
                    log(_describe_program(program))
                tokens = sum(int(mb["labels"].numel()) if "labels" in mb else 0 for mb in mbs)
                log(f"step {step:3d}  loss {result.loss:.4f}  step {result.seconds * 1e3:7.1f} ms  "
                    f"plan {plan_ms:6.1f} ms ({source})  tokens {tokens}")
    finally:
        if planner:
            planner.close()
    return losses


def _rank_main(rank: int, world: int, cfg: DemoConfig) -> list[float]:
    from dipc.runtime.distributed import run_step_distributed

    step = lambda pipe, mbs, program: run_step_distributed(pipe, mbs, program, timeout_s=cfg.timeout_s)
    return train(cfg, rank, step_fn=step, log=lambda s: print(s, flush=True))


def run_demo(cfg: DemoConfig) -> list[float]:
    if os.environ.get("RANK", "0") == "0":
        print(f"dipc demo: {cfg.model}, {os.environ.get('WORLD_SIZE', cfg.stages)} pipeline ranks ({cfg.executor}), "
              f"schedule {cfg.schedule}, {cfg.steps} steps x {cfg.microbatches} microbatches", flush=True)
    t0 = time.perf_counter()
    if cfg.executor == "local":
        losses = train(cfg)
    elif "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        # launched by torchrun: this process is one rank; the world size is the pipeline depth
        from dipc.runtime.distributed import init_process_group

        rank, world = init_process_group(timeout_s=cfg.timeout_s)
        losses = _rank_main(rank, world, replace(cfg, stages=world))
        if rank != 0:
            return losses
    else:
        from dipc.runtime.launch import spawn

        losses = spawn(_rank_main, cfg.stages, cfg, timeout_s=cfg.timeout_s * max(cfg.steps, 1))[0]
    k = max(1, min(5, len(losses) // 3))
    first, last = statistics.mean(losses[:k]), statistics.mean(losses[-k:])
    print(f"loss {first:.4f} -> {last:.4f} (mean of first/last {k} steps); "
          f"total {time.perf_counter() - t0:.1f} s", flush=True)
    return losses
