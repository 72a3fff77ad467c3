"""Dumps for debugging a step: what each rank runs, how the model was cut, and SEMU's timeline.

``dump_step(pipe, program, microbatches, directory)`` writes

- ``program.txt`` / ``program.json``: the whole program (text parses back; see README);
- ``rank{r}.txt``: one rank's instruction stream, one instruction per line;
- ``schedule.csv``: the compute and communication order in torch.distributed.pipelining's action
  format (``{stage}{F|B|I|W|SEND_F|RECV_F|SEND_B|RECV_B}{mb}``, one row per rank), to compare with
  PyTorch's schedules (not written for programs with sub-microbatches: that format has no subs);
- ``partition.txt``: stage -> rank, modality, layers, and each stage's SEMU cost for this batch;
- ``timeline.json``: SEMU's predicted timeline as a Chrome trace (opens in Perfetto).

Set ``DIPC_DUMP_DIR`` to dump every planned batch into ``$DIPC_DUMP_DIR/step{N}``. The device
profile used for the timeline is ``DIPC_PROFILE`` (a preset name or a JSON path; default h800).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

from dipc.errors import DipcError
from dipc.ir import Op, Program
from dipc.ir.jsonio import dumps
from dipc.ir.text import dump_program, format_instruction

if TYPE_CHECKING:
    from dipc.api import CompiledPipeline

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
              directory: str | Path, *, timeline: bool = True) -> Path:
    """Write every dump of one planned step into ``directory`` (created); returns it."""
    out = Path(directory)
    try:
        out.mkdir(parents=True, exist_ok=True)
        (out / "program.txt").write_text(dump_program(program))
        (out / "program.json").write_text(dumps(program))
        for r, stream in enumerate(program.streams):
            (out / f"rank{r}.txt").write_text("".join(format_instruction(i) + "\n" for i in stream))
        if not program.subs:
            (out / "schedule.csv").write_text(pipelining_csv(program))
        lines = [pipe.describe()]
        if timeline:
            from dipc.semu.trace import write_chrome_trace

            from dipc.semu.compare import step_model

            model = step_model(pipe, microbatches, os.environ.get("DIPC_PROFILE", "h800"))
            result = model.simulate(program)
            write_chrome_trace(result, out / "timeline.json")
            lines.append(f"SEMU ({os.environ.get('DIPC_PROFILE', 'h800')}): step {result.step_time * 1e3:.3f} ms, "
                         f"bubble {result.bubble_fraction:.1%}")
            for s in pipe.stages:
                fwd = sum(model.compute_time(i) for i in program.streams[s.rank] if i.op is Op.FWD and i.stage == s.id)
                lines.append(f"  stage {s.id}: forward {fwd * 1e3:.3f} ms over {program.num_microbatches} microbatches")
        (out / "partition.txt").write_text("\n".join(lines) + "\n")
    except OSError as e:
        raise DipcError(f"cannot write dumps to {str(out)!r}: {e.strerror}. Fix: point DIPC_DUMP_DIR (or the "
                        "directory argument) at a writable directory.") from None
    return out


def maybe_dump(pipe: "CompiledPipeline", program: Program, microbatches: Sequence[Mapping[str, Any]]) -> None:
    """The ``DIPC_DUMP_DIR`` hook ``CompiledPipeline.plan`` calls after every plan."""
    root = os.environ.get("DIPC_DUMP_DIR")
    if not root:
        return
    step = getattr(pipe, "_dump_counter", 0)
    pipe._dump_counter = step + 1
    dump_step(pipe, program, microbatches, Path(root) / f"step{step}")
