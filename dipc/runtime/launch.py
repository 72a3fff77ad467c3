"""Spawn N local processes that form a gloo process group (tests, the demo, CPU runs without torchrun).

Every child gets a timeout: if any child fails or the group does not finish in time, all
children are killed and the parent raises with each rank's error, so nothing is left hanging.
"""
from __future__ import annotations

import io
import os
import socket
import traceback
from typing import Any, Callable

import torch
import torch.multiprocessing as mp

from dipc.errors import DipcError


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _child(rank: int, world: int, port: int, fn: Callable, args: tuple, queue, timeout_s: float) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    import torch.distributed as dist

    from dipc.runtime.affinity import pin_local_rank
    from dipc.runtime.distributed import init_process_group

    # share the machine's cores between the ranks instead of oversubscribing them: each rank's
    # threads (the process group's I/O threads included, started below) on cores of its own
    try:
        cores = pin_local_rank(rank, world)
    except ValueError as e:   # a bad DIPC_PIN_CPUS: reported like any other failure of this rank
        queue.put((rank, "error", f"{type(e).__name__}: {e}"))
        return
    torch.set_num_threads(len(cores) if cores else max(1, (os.cpu_count() or 1) // world))
    try:
        init_process_group("gloo", timeout_s=timeout_s)
        result = fn(rank, world, *args)
        buf = io.BytesIO()  # plain bytes: shared-memory tensors would die with this process
        torch.save(result, buf)
        queue.put((rank, "ok", buf.getvalue()))
    except BaseException as e:  # report everything to the parent, which decides
        queue.put((rank, "error", f"{type(e).__name__}: {e}\n{traceback.format_exc()}"))
    finally:
        if dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception:
                pass


def spawn(fn: Callable[..., Any], world_size: int, *args: Any, timeout_s: float = 120.0) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` in ``world_size`` processes; return each rank's result.

    ``fn`` must be importable (module-level) and its results picklable.
    """
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    # not daemonic: a rank may fork CPU planning workers (dipc.runtime.async_plan), as under torchrun;
    # the finally below still kills every rank that outlives the deadline
    procs = [ctx.Process(target=_child, args=(r, world_size, port, fn, args, queue, timeout_s), daemon=False)
             for r in range(world_size)]
    for p in procs:
        p.start()
    results: dict[int, tuple[str, Any]] = {}
    import queue as _q
    import time

    deadline = time.monotonic() + timeout_s + 30.0
    try:
        while len(results) < world_size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                rank, status, payload = queue.get(timeout=min(remaining, 1.0))
                results[rank] = (status, payload)
            except _q.Empty:
                if all(not p.is_alive() for p in procs) and queue.empty():
                    break
    finally:
        for p in procs:
            p.join(timeout=5.0)
            if p.is_alive():
                p.kill()
                p.join()
    errors = {r: payload for r, (status, payload) in results.items() if status == "error"}
    missing = [r for r in range(world_size) if r not in results]
    if errors or missing:
        lines = [f"rank {r}: {msg.splitlines()[0]}" for r, msg in sorted(errors.items())]
        lines += [f"rank {r}: no result (exited or hung; killed)" for r in missing]
        detail = "\n".join(f"--- rank {r} ---\n{msg}" for r, msg in sorted(errors.items()))
        raise DipcError("distributed run failed:\n" + "\n".join(lines) + ("\n" + detail if detail else ""))
    return [torch.load(io.BytesIO(results[r][1]), weights_only=False) for r in range(world_size)]
