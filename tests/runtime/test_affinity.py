"""Each local rank's threads are pinned to cores of its own (dipc.runtime.affinity)."""
from __future__ import annotations

import os

import pytest

from dipc.runtime.affinity import local_cores, pin_local_rank
from dipc.runtime.launch import spawn

pytestmark = pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="no CPU affinity on this OS")


def test_local_cores_split_evenly_and_contiguously():
    cores = [0, 1, 2, 3, 4, 5, 6]
    shares = [local_cores(r, 3, cores) for r in range(3)]
    assert shares == [[0, 1, 2], [3, 4], [5, 6]]
    assert local_cores(0, 1, [3, 1]) == [1, 3]
    # more ranks than cores: one core each, round robin
    assert [local_cores(r, 4, [2, 5]) for r in range(4)] == [[2], [5], [2], [5]]
    with pytest.raises(ValueError, match="local rank 2 of 2"):
        local_cores(2, 2, cores)


def test_pinning_follows_dipc_pin_cpus(monkeypatch):
    before = os.sched_getaffinity(0)
    try:
        monkeypatch.delenv("DIPC_PIN_CPUS", raising=False)
        assert pin_local_rank(0, 1) is None                  # opt-in
        monkeypatch.setenv("DIPC_PIN_CPUS", "0")
        assert pin_local_rank(0, 1) is None
        monkeypatch.setenv("DIPC_PIN_CPUS", "auto")
        assert pin_local_rank(0, 1, uses_gpu=True) is None   # beside GPUs only when asked
        assert pin_local_rank(0, 1) == sorted(before)        # one rank: every core it may use
        monkeypatch.setenv("DIPC_PIN_CPUS", "sometimes")
        with pytest.raises(ValueError, match="DIPC_PIN_CPUS='sometimes'. Fix: use auto, 1 or 0"):
            pin_local_rank(0, 1)
    finally:
        os.sched_setaffinity(0, before)


def _affinity_of_every_thread(rank: int, world: int) -> list[list[int]]:
    import threading

    import torch.distributed as dist

    dist.barrier()   # the process group's threads exist by now
    assert threading.active_count() >= 1
    return [sorted(os.sched_getaffinity(int(t))) for t in os.listdir("/proc/self/task")]


def test_spawned_ranks_and_their_threads_sit_on_their_own_cores(monkeypatch):
    monkeypatch.setenv("DIPC_PIN_CPUS", "auto")   # the children inherit it
    available = sorted(os.sched_getaffinity(0))
    per_rank = spawn(_affinity_of_every_thread, 2, timeout_s=60)
    for rank, threads in enumerate(per_rank):
        assert threads and all(t == local_cores(rank, 2, available) for t in threads)
    if len(available) >= 2:
        assert not set(per_rank[0][0]) & set(per_rank[1][0])
