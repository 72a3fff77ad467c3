"""Checkpoint / resume: a resumed run continues exactly as an uninterrupted one (CPU float32,
bit for bit), distributed and in one process; a missing shard is a clear error before training."""
import os
from pathlib import Path

import pytest
import torch

import dipc
from dipc.errors import DipcError
from dipc.runtime.checkpoint import load_checkpoint, save_checkpoint
from dipc.runtime.launch import spawn
from examples.data import make_example


def _setup(stages: int, model_seed: int = 0):
    """A pipeline whose weights come from ``model_seed`` but whose data stream is always seed 0."""
    ex = make_example("vlm", seed=model_seed)
    data = make_example("vlm", seed=0).data
    example = make_example("vlm", seed=0).data.microbatches(1, 2)[0]
    pipe = dipc.compile(ex.model, example, num_stages=stages, loss_weight=ex.loss_weight,
                        optimizer=lambda ps: torch.optim.AdamW(ps, lr=1e-2))
    return data, pipe


def _train(data, pipe, steps: int, step_fn) -> list[float]:
    return [step_fn(pipe, data.microbatches(3, 2)).loss for _ in range(steps)]


def _local_step(pipe, mbs):
    return pipe.step(mbs)


def _dist_step(pipe, mbs):
    from dipc.runtime.distributed import run_step_distributed

    return run_step_distributed(pipe, mbs, timeout_s=60)


def _uninterrupted_then_first_half(rank: int, world: int, path: str) -> tuple[list[float], list[float]]:
    data, pipe = _setup(world)
    full = _train(data, pipe, 4, _dist_step)
    data, pipe = _setup(world)
    first = _train(data, pipe, 2, _dist_step)
    save_checkpoint(path, pipe, step=2, data_state=data.state_dict())
    return full, first


def _resume(rank: int, world: int, path: str) -> list[float]:
    data, pipe = _setup(world, model_seed=123)   # different weights: everything must come from the checkpoint
    state = load_checkpoint(path, pipe)
    assert state["step"] == 2
    data.load_state_dict(state["data_state"])
    return _train(data, pipe, 2, _dist_step)


@pytest.mark.dist
@pytest.mark.timeout(300)
def test_distributed_resume_continues_bit_for_bit(tmp_path):
    path = str(tmp_path / "ckpt")
    full, first = spawn(_uninterrupted_then_first_half, 2, path, timeout_s=200)[0]
    shards = sorted(p.name for p in Path(path).iterdir())
    assert ".metadata" in shards and len([s for s in shards if s.endswith(".distcp")]) == 2, shards
    second = spawn(_resume, 2, path, timeout_s=200)[0]
    assert first + second == full


def test_local_resume_continues_bit_for_bit(tmp_path):
    data, pipe = _setup(2)
    full = _train(data, pipe, 4, _local_step)
    data, pipe = _setup(2)
    first = _train(data, pipe, 2, _local_step)
    save_checkpoint(tmp_path, pipe, step=2, data_state=data.state_dict())
    data, pipe = _setup(2, model_seed=7)
    state = load_checkpoint(tmp_path, pipe)
    data.load_state_dict(state["data_state"])
    assert first + _train(data, pipe, 2, _local_step) == full


def test_missing_checkpoint_and_missing_shard_are_clear_errors(tmp_path):
    data, pipe = _setup(2)
    with pytest.raises(DipcError, match=r"no checkpoint at .*Fix:"):
        load_checkpoint(tmp_path / "nowhere", pipe)
    _train(data, pipe, 1, _local_step)
    save_checkpoint(tmp_path, pipe, step=1, data_state=data.state_dict())
    for shard in tmp_path.glob("*.distcp"):
        os.remove(shard)
    with pytest.raises(DipcError, match=r"does not match this pipeline.*Fix:.*shard"):
        load_checkpoint(tmp_path, pipe)
