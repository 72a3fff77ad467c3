"""What the runtime actually did in one step: a wall-clock span per executed instruction.

The interpreter records ``(rank, pc, op, stage, mb, start, end)`` per instruction when asked
(``RankInterpreter(..., record_timeline=True)``; ``CompiledPipeline.step(..., record_timeline=True)``;
``run_step_distributed(..., record_timeline=True)``). A :class:`MeasuredTimeline` holds those spans
with times in seconds from the step's origin, and adapts them to the shape SEMU's plotting and
Chrome-trace writers take (:meth:`MeasuredTimeline.as_sim_result`), so a prediction and a
measurement are drawn by the same code.

How the spans map onto SEMU's streams: non-communication instructions are compute; a receive is
the time the rank spent inside it (waiting for the data plus unpacking it); a send is the time
the rank spent posting it, on the ``send -> rank p`` track (the transfer itself runs
asynchronously and is not observed).

What the clock means depends on the executor. Local: all ranks share this process's clock and
run cooperatively, one instruction at a time, so ranks never overlap in time — the timeline shows
the interleaving the local executor chose, not a parallel schedule. Distributed: every process
measures against its own clock, zeroed when it leaves a barrier right before the step (see
:func:`dipc.runtime.distributed.run_step_distributed`), so cross-rank times agree up to the
barrier's release skew (tens of microseconds on one host).

Example::

    >>> result = pipe.step(mbs, record_timeline=True)      # doctest: +SKIP
    >>> result.timeline.write_chrome_trace("measured.json")  # open at https://ui.perfetto.dev
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from dipc.ir import Op, Program
from dipc.semu.emulator import STREAM_COMPUTE, STREAM_RECV_WAIT, STREAM_SEND, SimResult

__all__ = ["MeasuredSpan", "MeasuredTimeline"]

MeasuredSpan = tuple[int, int, Op, int, int, float, float]
"""``(rank, pc, op, stage, mb, start, end)``: ``program.streams[rank][pc]`` ran from start to end (s)."""

_RECVS = (Op.RECV_ACT, Op.RECV_GRAD)
_SENDS = (Op.SEND_ACT, Op.SEND_GRAD)


@dataclass(frozen=True, slots=True, kw_only=True)
class MeasuredTimeline:
    """Every executed instruction of one step with its wall-clock interval (seconds from the origin).

    ``executor`` names where it was measured (``"local"`` or ``"distributed"``); see the module
    docstring for what the clock means in each.
    """

    program: Program
    spans: tuple[MeasuredSpan, ...]
    executor: str

    @classmethod
    def from_raw(cls, program: Program, spans: Iterable[MeasuredSpan], origin: float,
                 executor: str) -> "MeasuredTimeline":
        """Spans with raw clock readings -> a timeline relative to ``origin``, ordered by rank, pc."""
        shifted = sorted((r, pc, op, st, mb, s - origin, e - origin) for r, pc, op, st, mb, s, e in spans)
        return cls(program=program, spans=tuple(shifted), executor=executor)

    @property
    def step_time(self) -> float:
        """Seconds from the origin until the last instruction of any rank ended."""
        return max((s[6] for s in self.spans), default=0.0)

    def rank_spans(self, rank: int) -> list[MeasuredSpan]:
        """One rank's spans in execution order."""
        return [s for s in self.spans if s[0] == rank]

    def as_sim_result(self) -> SimResult:
        """The measurement in SEMU's :class:`SimResult` shape (``raw_spans`` per stream, busy/bubble
        per rank), for :func:`dipc.semu.gantt.plot_gantt` and :func:`dipc.semu.trace.to_chrome_trace`.
        ``peak_memory`` is unknown (``None``)."""
        ranks = range(self.program.num_ranks)
        busy, wait, end = [0.0] * len(ranks), [0.0] * len(ranks), [0.0] * len(ranks)
        raw = []
        for rank, pc, op, _, _, start, stop in self.spans:
            stream, peer = STREAM_COMPUTE, -1
            if op in _RECVS:
                stream = STREAM_RECV_WAIT
                wait[rank] += stop - start
            elif op in _SENDS:
                stream, peer = STREAM_SEND, self.program.streams[rank][pc].peer
            else:
                busy[rank] += stop - start
            end[rank] = max(end[rank], stop)
            raw.append((rank, stream, pc, start, stop, peer))
        step = self.step_time
        return SimResult(program=self.program, step_time=step, busy=tuple(busy),
                         bubble=tuple(step - b for b in busy), recv_wait=tuple(wait), end_time=tuple(end),
                         peak_memory=None, raw_spans=tuple(raw))

    def to_chrome_trace(self) -> dict[str, Any]:
        """Chrome-trace JSON of the measurement (same layout as SEMU's; ``otherData.source`` says
        it was measured and by which executor)."""
        from dipc.semu.trace import to_chrome_trace

        trace = to_chrome_trace(self.as_sim_result())
        trace["otherData"].update(source="measured", executor=self.executor, clock="time.perf_counter")
        return trace

    def write_chrome_trace(self, path: str | Path) -> Path:
        """Write :meth:`to_chrome_trace` to ``path`` (open it at https://ui.perfetto.dev)."""
        path = Path(path)
        path.write_text(json.dumps(self.to_chrome_trace()))
        return path

    def summary(self) -> str:
        """One line: executor, step time, instructions, and the compute share of rank time."""
        res = self.as_sim_result()
        return (f"measured ({self.executor} executor): step {self.step_time * 1e3:.3f} ms, "
                f"{len(self.spans)} instructions, idle {res.bubble_fraction:.1%}")
