"""Chrome-trace (Perfetto / chrome://tracing) export of a simulated step.

``to_chrome_trace(result)`` returns the JSON object format: ``{"traceEvents": [...],
"displayTimeUnit": "ms", "otherData": {...}}``. One process per rank (``pid = rank``, named
``rank r``); threads per rank: ``tid 0`` compute, ``tid 1`` receive waits, ``tid 2 + peer`` the
transfers the rank sends to ``peer`` (one track per channel, so slices never overlap on a track).
Every interval is a complete event (``ph: "X"``, ``ts``/``dur`` in microseconds) named by the
instruction's short label (``F3.1``, ``B0.2``, ``sA3.1>4``) with the full instruction text, stage,
microbatch and op in ``args``. With a memory model, a counter track (``ph: "C"``, ``memory GiB``)
per rank follows the simulated bytes. Example::

    >>> import json
    >>> json.dump(to_chrome_trace(result), open("step.json", "w"))  # doctest: +SKIP

Open the file at https://ui.perfetto.dev.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from dipc.ir.text import format_instruction, instruction_label
from dipc.semu.emulator import STREAM_COMPUTE, STREAM_RECV_WAIT, STREAM_SEND, SimResult

__all__ = ["to_chrome_trace", "write_chrome_trace"]

_US = 1e6  # seconds -> microseconds
_CATEGORY = {STREAM_COMPUTE: "compute", STREAM_RECV_WAIT: "recv_wait", STREAM_SEND: "transfer"}


def _tid(stream: int, peer: int) -> int:
    return stream if stream != STREAM_SEND else STREAM_SEND + peer


def to_chrome_trace(result: SimResult) -> dict[str, Any]:
    """The simulated step as a Chrome-trace JSON object (see the module docstring)."""
    if not result.raw_spans:
        raise ValueError("the result has no timeline. Fix: simulate(..., record=True) (the default).")
    program = result.program
    events: list[dict[str, Any]] = []
    threads: set[tuple[int, int, int]] = set()
    for rank, stream, step, start, end, peer in result.raw_spans:
        ins = program.streams[rank][step]
        tid = _tid(stream, peer)
        threads.add((rank, tid, peer))
        name = instruction_label(ins)
        if stream == STREAM_RECV_WAIT:
            name = f"wait {name}"
        args: dict[str, Any] = {"instruction": format_instruction(ins), "op": ins.op.value, "step": step}
        if ins.stage >= 0:
            args["stage"] = ins.stage
        if ins.mb >= 0:
            args["mb"] = ins.mb
        if ins.sub >= 0:
            args["sub"] = ins.sub
        if stream == STREAM_SEND:
            args["to_rank"] = peer
        events.append({"name": name, "cat": _CATEGORY[stream], "ph": "X", "pid": rank, "tid": tid,
                       "ts": start * _US, "dur": (end - start) * _US, "args": args})
    for rank in range(program.num_ranks):
        events.append({"name": "process_name", "ph": "M", "pid": rank, "tid": 0,
                       "args": {"name": f"rank {rank}"}})
        events.append({"name": "process_sort_index", "ph": "M", "pid": rank, "tid": 0,
                       "args": {"sort_index": rank}})
        threads.add((rank, STREAM_COMPUTE, -1))
    for rank, tid, peer in sorted(threads):
        label = {STREAM_COMPUTE: "compute", STREAM_RECV_WAIT: "recv wait"}.get(tid, f"send -> rank {peer}")
        events.append({"name": "thread_name", "ph": "M", "pid": rank, "tid": tid, "args": {"name": label}})
        events.append({"name": "thread_sort_index", "ph": "M", "pid": rank, "tid": tid,
                       "args": {"sort_index": tid}})
    for rank, timeline in enumerate(result.memory_timeline):
        for t, num_bytes in timeline:
            events.append({"name": "memory GiB", "ph": "C", "pid": rank, "tid": 0, "ts": t * _US,
                           "args": {"GiB": num_bytes / 2**30}})
    return {
        "traceEvents": events,
        "displayTimeUnit": "ms",
        "otherData": {
            "schedule": program.schedule,
            "num_ranks": program.num_ranks,
            "num_microbatches": program.num_microbatches,
            "step_time_ms": result.step_time * 1e3,
            "bubble_fraction": result.bubble_fraction,
        },
    }


def write_chrome_trace(result: SimResult, path: str | Path) -> Path:
    """Write :func:`to_chrome_trace` to ``path`` (open it at https://ui.perfetto.dev)."""
    path = Path(path)
    path.write_text(json.dumps(to_chrome_trace(result)))
    return path
