"""Checkpoint / resume with torch.distributed.checkpoint, sharded per pipeline stage.

Each process writes the parameters and optimizer state of the stages its pipeline rank owns
(data-parallel replicas hold identical copies, which DCP writes once), plus the step counter,
its RNG state and its replica's data-stream position. Resuming restores all of it, so training
continues exactly as an uninterrupted run would. Works under torch.distributed (every rank calls
it) and in one process (the local executor owns every rank).
"""
from __future__ import annotations

import contextlib
import pickle
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_optimizer_state_dict,
                                                     set_optimizer_state_dict)

from dipc.errors import DipcError

if TYPE_CHECKING:
    from dipc.api import CompiledPipeline


@contextlib.contextmanager
def _single_process_quiet():
    """DCP warns that it assumes one process when no process group exists: that is the intent here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _ranks_here(pipe: "CompiledPipeline") -> tuple[list[int], int, int]:
    """(pipeline ranks this process owns, data-parallel index, process rank)."""
    if dist.is_initialized():
        from dipc.runtime.data_parallel import topology

        topo = topology(pipe.num_ranks)
        return [topo.pp_rank], topo.dp_rank, topo.rank
    return list(range(pipe.num_ranks)), 0, 0


def _state(pipe: "CompiledPipeline", step: int, data_state: Any) -> dict[str, Any]:
    ranks, dp_rank, rank = _ranks_here(pipe)
    names = {id(p): n for n, p in pipe.model.named_parameters()}
    state: dict[str, Any] = {"model": {}, "meta": {"step": step}}
    for r in ranks:
        for p in pipe.rank_parameters(r):
            state["model"][names[id(p)]] = p.detach()
        opt = pipe.optimizers.get(r)
        if opt is not None:
            state[f"optim_pp{r}"] = get_optimizer_state_dict(pipe.model, opt)
    state[f"rng_{rank}"] = {"torch": torch.get_rng_state()}
    # one opaque blob: DCP would otherwise flatten the data state's own nesting into keys
    state[f"data_dp{dp_rank}"] = {"stream": pickle.dumps(data_state)}
    return state


def save_checkpoint(path: str | Path, pipe: "CompiledPipeline", *, step: int, data_state: Any = None) -> None:
    """Write a checkpoint (collective under torch.distributed: every rank must call it)."""
    with _single_process_quiet():
        dcp.save(_state(pipe, step, data_state), checkpoint_id=str(path), no_dist=not dist.is_initialized())


def load_checkpoint(path: str | Path, pipe: "CompiledPipeline") -> dict[str, Any]:
    """Restore parameters, optimizer state and RNG in place; returns ``{"step", "data_state"}``."""
    path = Path(path)
    if not (path / ".metadata").exists():
        raise DipcError(f"no checkpoint at {str(path)!r} (missing .metadata). Fix: pass the directory "
                        "save_checkpoint wrote, and check that every rank wrote its shard.")
    # Optimizer state is created lazily; get_optimizer_state_dict materialises it so DCP has targets.
    state = _state(pipe, 0, None)
    ranks, dp_rank, _ = _ranks_here(pipe)
    try:
        with _single_process_quiet():
            dcp.load(state, checkpoint_id=str(path), no_dist=not dist.is_initialized())
    except (Exception, CheckpointException) as e:   # CheckpointException is a BaseException
        raise DipcError(f"checkpoint {str(path)!r} does not match this pipeline ({type(e).__name__}: "
                        f"{str(e).splitlines()[0][:300]}). Fix: resume with the same model, stage count and "
                        "data-parallel size that wrote it, and check no shard file is missing.") from e
    with torch.no_grad():
        names = dict(pipe.model.named_parameters())
        for name, value in state["model"].items():
            if value.data_ptr() != names[name].data_ptr():
                names[name].copy_(value)
    for r in ranks:
        opt = pipe.optimizers.get(r)
        if opt is not None:
            set_optimizer_state_dict(pipe.model, opt, state[f"optim_pp{r}"],
                                     options=StateDictOptions(strict=False))
    torch.set_rng_state(state[f"rng_{_ranks_here(pipe)[2]}"]["torch"])
    return {"step": state["meta"]["step"], "data_state": pickle.loads(state[f"data_dp{dp_rank}"]["stream"])}
