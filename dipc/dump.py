"""Dumps for debugging a step: what each rank runs, how the model was cut, and SEMU's timeline.

``dump_step(pipe, program, microbatches, directory)`` writes

- ``program.txt`` / ``program.json``: the whole program (text parses back; see README);
- ``rank{r}.txt``: one rank's instruction stream, one instruction per line;
- ``schedule.csv``: the compute and communication order in torch.distributed.pipelining's action
  format (``{stage}{F|B|I|W|SEND_F|RECV_F|SEND_B|RECV_B}{mb}``, one row per rank), to compare with
  PyTorch's schedules (not written for programs with sub-microbatches: that format has no subs);
- ``partition.txt``: stage -> rank, modality, layers, and each stage's SEMU cost for this batch;
- ``timeline.json``: SEMU's predicted timeline as a Chrome trace (opens in Perfetto);
- ``gantt.png``: that prediction next to SEMU's prediction of a comparison plan for the same
  batch, on one time axis: the baseline (1F1B, or interleaved 1F1B when ranks hold several
  chunks), or, when the dumped program *is* that baseline, DIP's SEMU-scored per-batch plan;
- with a measured step (``measured=`` here, ``CompiledPipeline.step(..., record_timeline=True)``
  under ``DIPC_DUMP_DIR``, ``dipc dump --measure``): ``measured.json``, the runtime's actual
  per-instruction timeline as a Chrome trace, and ``measured.png``, the prediction above the
  measurement (each on its own time axis: the prediction is for the profile's GPU, the
  measurement is of this machine).

Set ``DIPC_DUMP_DIR`` to dump every planned batch into ``$DIPC_DUMP_DIR/step{N}``. The device
profile used for the timeline is ``DIPC_PROFILE`` (a preset name or a JSON path; default h800).
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Mapping, Sequence

from dipc.errors import DipcError
from dipc.ir import Op, Program
from dipc.ir.jsonio import dumps
from dipc.ir.text import dump_program, format_instruction

if TYPE_CHECKING:
    from dipc.api import CompiledPipeline
    from dipc.runtime.timeline import MeasuredTimeline
    from dipc.semu.emulator import SimResult

_PIPELINING = {Op.FWD: "F", Op.BWD: "B", Op.BWD_I: "I", Op.BWD_W: "W", Op.SEND_ACT: "SEND_F",
               Op.RECV_ACT: "RECV_F", Op.SEND_GRAD: "SEND_B", Op.RECV_GRAD: "RECV_B"}


def pipelining_csv(program: Program) -> str:
    """The program in torch.distributed.pipelining's CSV action format (loads, reduces and the
    optimizer step have no counterpart there and are left out). It has no sub-microbatches, so a
    program with ``subs`` raises rather than print ambiguous actions."""
    if program.subs:
        raise DipcError("torch.distributed.pipelining's action format has no sub-microbatches, but this "
                        f"program splits {[m for m, _ in program.subs]}. Fix: use the dipc text or JSON dump.")
    rows = []
    for stream in program.streams:
        rows.append(",".join(f"{i.stage}{_PIPELINING[i.op]}{i.mb}" for i in stream if i.op in _PIPELINING))
    return "\n".join(rows) + "\n"


def dump_step(pipe: "CompiledPipeline", program: Program, microbatches: Sequence[Mapping[str, Any]],
              directory: str | Path, *, timeline: bool = True,
              measured: "MeasuredTimeline | None" = None) -> Path:
    """Write every dump of one planned step into ``directory`` (created); returns it.

    ``timeline=False`` skips SEMU (timeline.json, gantt.png and the stage costs); ``measured``
    adds measured.json / measured.png for a step that ran with ``record_timeline=True``."""
    out = Path(directory)
    try:
        out.mkdir(parents=True, exist_ok=True)
        _write_program(program, out)
        lines = [pipe.describe()]
        predicted = _write_prediction(pipe, program, microbatches, out, lines) if timeline else None
        if measured is not None:
            _write_measured(measured, predicted, out)
            lines.append(measured.summary())
        (out / "partition.txt").write_text("\n".join(lines) + "\n")
    except OSError as e:
        raise DipcError(f"cannot write dumps to {str(out)!r}: {e.strerror}. Fix: point DIPC_DUMP_DIR (or the "
                        "directory argument) at a writable directory.") from None
    pipe._last_dump = (program, out, predicted)
    return out


def _write_program(program: Program, out: Path) -> None:
    """The program itself: text, JSON, per-rank streams, pipelining CSV."""
    (out / "program.txt").write_text(dump_program(program))
    (out / "program.json").write_text(dumps(program))
    for r, stream in enumerate(program.streams):
        (out / f"rank{r}.txt").write_text("".join(format_instruction(i) + "\n" for i in stream))
    if not program.subs:   # PyTorch's action format has no sub-microbatches
        (out / "schedule.csv").write_text(pipelining_csv(program))


def _profile() -> str:
    return os.environ.get("DIPC_PROFILE", "h800")


def _write_prediction(pipe: "CompiledPipeline", program: Program, microbatches: Sequence[Mapping[str, Any]],
                      out: Path, lines: list[str]) -> "SimResult":
    """SEMU's timeline of the program (timeline.json), its stage costs (into ``lines``), and
    gantt.png next to a comparison plan; returns the prediction."""
    from dipc.semu.compare import step_model
    from dipc.semu.gantt import plot_gantt
    from dipc.semu.trace import write_chrome_trace

    batch_model = step_model(pipe, microbatches, _profile())
    model = batch_model.for_program(program)   # per instruction: the program's slots (microbatch_order)
    result = model.simulate(program)
    write_chrome_trace(result, out / "timeline.json")
    lines.append(f"SEMU ({_profile()}): step {result.step_time * 1e3:.3f} ms, bubble {result.bubble_fraction:.1%}")
    for s in pipe.stages:
        fwd = sum(model.compute_time(i) for i in program.streams[s.rank] if i.op is Op.FWD and i.stage == s.id)
        lines.append(f"  stage {s.id}: forward {fwd * 1e3:.3f} ms over {program.num_microbatches} microbatches")
    label, other = _comparison(pipe, program, microbatches, batch_model)
    lines.append(f"compared with {label}: step {other.step_time * 1e3:.3f} ms, bubble {other.bubble_fraction:.1%}")
    plot_gantt({f"{program.schedule} (this program)": result, label: other}, out / "gantt.png",
               title=f"SEMU prediction, {_profile()}, {program.num_microbatches} microbatches")
    return result


def _comparison(pipe: "CompiledPipeline", program: Program, microbatches: Sequence[Mapping[str, Any]],
                model: Any) -> tuple[str, "SimResult"]:
    """The plan gantt.png sets beside ``program``: the static baseline for this placement, or DIP's
    per-batch plan when ``program`` is that baseline (comparing a plan with itself shows nothing)."""
    from dipc.semu.compare import DIP_LABEL, plan_dip

    baseline = "interleaved_1f1b" if pipe.chunks > 1 else "1f1b"
    with _quiet_planning(pipe):
        if program.schedule != baseline:
            return f"{baseline} (baseline)", model.simulate(pipe.plan(microbatches, schedule=baseline))
        label, _, result = plan_dip(pipe, microbatches, model)
    return f"{DIP_LABEL}: {label}", result


@contextlib.contextmanager
def _quiet_planning(pipe: "CompiledPipeline") -> Iterator[None]:
    """Plans made for a dump's comparison neither dump themselves (no recursion through
    DIPC_DUMP_DIR) nor replace the latest plan in ``pipe.history``."""
    history, was_dumping = list(pipe.history), getattr(pipe, "_dumping", False)
    pipe._dumping = True
    try:
        yield
    finally:
        pipe.history[:] = history
        pipe._dumping = was_dumping


def _write_measured(measured: "MeasuredTimeline", predicted: "SimResult | None", out: Path) -> None:
    """measured.json (Chrome trace of the measured step) and measured.png (prediction above it)."""
    from dipc.semu.gantt import plot_gantt

    measured.write_chrome_trace(out / "measured.json")
    panels = {} if predicted is None else {f"SEMU prediction ({_profile()})": predicted}
    panels[f"measured ({measured.executor} executor, this machine)"] = measured.as_sim_result()
    plot_gantt(panels, out / "measured.png", share_time_axis=False,
               title=f"{measured.program.schedule}: predicted vs measured (own time axes)")


def maybe_dump(pipe: "CompiledPipeline", program: Program, microbatches: Sequence[Mapping[str, Any]]) -> None:
    """The ``DIPC_DUMP_DIR`` hook ``CompiledPipeline.plan`` calls after every plan."""
    root = os.environ.get("DIPC_DUMP_DIR")
    if not root or getattr(pipe, "_dumping", False):
        return
    step = getattr(pipe, "_dump_counter", 0)
    pipe._dump_counter = step + 1
    dump_step(pipe, program, microbatches, Path(root) / f"step{step}")


def maybe_dump_measured(pipe: "CompiledPipeline", program: Program, microbatches: Sequence[Mapping[str, Any]],
                        measured: "MeasuredTimeline") -> None:
    """The hook a step with ``record_timeline=True`` calls: under ``DIPC_DUMP_DIR``, add the
    measured files to the directory this program was dumped into when it was planned."""
    last = getattr(pipe, "_last_dump", None)
    if not os.environ.get("DIPC_DUMP_DIR") or last is None or last[0] is not program:
        return
    _, out, predicted = last
    try:
        _write_measured(measured, predicted, out)
        with open(out / "partition.txt", "a") as f:
            f.write(measured.summary() + "\n")
    except OSError as e:
        raise DipcError(f"cannot write measured timeline to {str(out)!r}: {e.strerror}. Fix: point "
                        "DIPC_DUMP_DIR at a writable directory.") from None
