"""Pipeline x data parallelism: process layout and the per-stage gradient all-reduce.

Process ``g`` is pipeline rank ``g % P`` of replica ``g // P``. Each replica runs the same
program on its own microbatches; ``REDUCE stage=s`` (emitted right after a stage's last
backward) starts an asynchronous all-reduce of that stage's gradients over the replicas holding
the same pipeline rank, so it overlaps the rest of the cool-down; ``OPTIM`` waits for it.
"""
from __future__ import annotations

import datetime
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from dipc.errors import DipcError

_GROUPS: dict[tuple[int, int], tuple[Any, Any]] = {}


@dataclass(frozen=True)
class Topology:
    pp: int            # pipeline depth
    dp: int            # data-parallel replicas
    rank: int          # process rank
    dp_group: Any      # replicas of this pipeline rank
    pp_group: Any      # the ranks of this replica's pipeline

    @property
    def pp_rank(self) -> int:
        return self.rank % self.pp

    @property
    def dp_rank(self) -> int:
        return self.rank // self.pp

    def global_rank(self, pipeline_rank: int) -> int:
        return self.dp_rank * self.pp + pipeline_rank


def topology(pipeline_depth: int) -> Topology:
    """This process's place in the PP x DP grid; creates the process groups once (collective)."""
    import torch.distributed as dist

    rank, world = dist.get_rank(), dist.get_world_size()
    if world % pipeline_depth:
        raise DipcError(f"world size {world} is not divisible by the pipeline depth {pipeline_depth}, so the "
                        f"processes cannot form whole pipeline replicas. Fix: launch a multiple of {pipeline_depth} "
                        f"processes, or compile with num_stages dividing {world}.")
    dp = world // pipeline_depth
    if dp == 1:   # one replica: the default group is the pipeline, and there is nothing to reduce
        return Topology(pp=pipeline_depth, dp=1, rank=rank, dp_group=None, pp_group=None)
    key = (pipeline_depth, world)
    if key not in _GROUPS:
        dp_groups = [dist.new_group([d * pipeline_depth + p for d in range(dp)]) for p in range(pipeline_depth)]
        pp_groups = [dist.new_group([d * pipeline_depth + p for p in range(pipeline_depth)]) for d in range(dp)]
        _GROUPS[key] = (dp_groups, pp_groups)
    dp_groups, pp_groups = _GROUPS[key]
    return Topology(pp=pipeline_depth, dp=dp, rank=rank, dp_group=dp_groups[rank % pipeline_depth],
                    pp_group=pp_groups[rank // pipeline_depth])


class GradReducer:
    """Sums each stage's gradients over the data-parallel replicas, one flat bucket per stage."""

    def __init__(self, stage_params: dict[int, Sequence[torch.nn.Parameter]], group: Any, timeout_s: float):
        self.stage_params = stage_params
        self.group = group
        self.timeout = datetime.timedelta(seconds=timeout_s)
        self.pending: list[tuple[Any, torch.Tensor, list[torch.nn.Parameter]]] = []
        self.done: set[int] = set()

    def start(self, stage: int) -> None:
        import torch.distributed as dist

        params = [p for p in self.stage_params.get(stage, ()) if p.requires_grad and id(p) not in self.done]
        if not params:
            return
        self.done.update(id(p) for p in params)
        # a replica whose batch never touched a parameter still sends zeros, so buckets line up
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = _flatten_dense_tensors(grads)
        self.pending.append((dist.all_reduce(flat, group=self.group, async_op=True), flat, params))

    def wait(self) -> None:
        pending, self.pending = self.pending, []
        for work, flat, params in pending:
            if work.wait(self.timeout) is False:
                raise TimeoutError("data-parallel gradient all-reduce timed out")
            for p, g in zip(params, _unflatten_dense_tensors(flat, [p for p in params])):
                p.grad = g
        self.done.clear()
