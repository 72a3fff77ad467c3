"""Pin each local rank's threads to a share of the host's cores of its own.

Why: ranks on one CPU host exchange messages through the process group's I/O threads (gloo's
TCP loop). Left to the OS, such a thread can be woken on the core where another rank computes
and wait there for that rank's time slice to end. On this project's 2-vCPU machine, two unpinned
gloo ranks lost 3-5 ms at a time inside ``pg.send``/``pg.recv`` and waits (under 0.1 ms of it
CPU): interleaved 1F1B of the example VLM took 35-48 ms per step unpinned and 32-33 ms pinned,
and the stalls inside the process group's calls fell from 29-95 to 11-47 per 10 steps.

Pinned, a rank's compute thread and its I/O threads share the rank's own cores, so a woken I/O
thread runs as soon as the compute thread blocks. But then a send posted before a long compute
can wait for that compute to end before its payload leaves (the I/O thread that pushes it has no
other core): on the same machine, dipc's static interleaved 1F1B of a TinyLlama ran at 7.9 steps/s
pinned and 8.9-9.6 unpinned (torch.distributed.pipelining, which waits right after it posts,
9.9 and 9.0-9.4). Which wins depends on the schedule, so pinning is opt-in: ``DIPC_PIN_CPUS``
``0`` (the default: placement left to the OS, or to a job scheduler or ``numactl``), ``auto``
(pin on CPU-only runs), ``1`` (pin, also beside GPUs).
"""
from __future__ import annotations

import os

__all__ = ["local_cores", "pin_local_rank"]


def local_cores(local_rank: int, local_world: int, available: list[int]) -> list[int]:
    """The cores of ``local_rank`` of ``local_world`` ranks on a host whose usable cores are
    ``available``: contiguous, equal shares (the first ranks get one more where they do not divide
    evenly); with more ranks than cores, one core each, round robin."""
    if not 0 <= local_rank < local_world:
        raise ValueError(f"local rank {local_rank} of {local_world}. Fix: 0 <= rank < world size.")
    cores = sorted(available)
    if not cores:
        raise ValueError("no usable cores. Fix: check the process's CPU affinity (taskset, cgroup cpuset).")
    if local_world >= len(cores):
        return [cores[local_rank % len(cores)]]
    base, extra = divmod(len(cores), local_world)
    start = local_rank * base + min(local_rank, extra)
    return cores[start:start + base + (1 if local_rank < extra else 0)]


def _mode() -> str:
    mode = os.environ.get("DIPC_PIN_CPUS", "0").strip().lower()
    if mode not in ("auto", "1", "0"):
        raise ValueError(f"DIPC_PIN_CPUS={mode!r}. Fix: use auto, 1 or 0.")
    return mode


def pin_local_rank(local_rank: int, local_world: int, *, uses_gpu: bool = False) -> list[int] | None:
    """Pin every thread of this process (and the threads it starts later) to ``local_rank``'s
    cores (:func:`local_cores` over the process's current affinity); returns them, or ``None``
    where pinning is off (``DIPC_PIN_CPUS``, a GPU run under ``auto``) or unsupported (no
    ``sched_setaffinity``, e.g. macOS)."""
    mode = _mode()
    if mode == "0" or (mode == "auto" and uses_gpu) or not hasattr(os, "sched_setaffinity"):
        return None
    cores = local_cores(local_rank, local_world, sorted(os.sched_getaffinity(0)))
    try:
        tids = [int(t) for t in os.listdir("/proc/self/task")]
    except OSError:
        tids = [0]
    for tid in tids:
        try:
            os.sched_setaffinity(tid, cores)
        except OSError:   # a thread that exited meanwhile
            pass
    return cores
