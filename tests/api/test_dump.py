"""DIPC_DUMP_DIR dumps: every file is produced and parses back."""
import csv
import json

import pytest

import dipc
from dipc.errors import DipcError
from dipc.ir import parse_program, program_from_json
from examples.data import make_example


def test_dump_dir_writes_every_file(tmp_path, monkeypatch):
    monkeypatch.setenv("DIPC_DUMP_DIR", str(tmp_path))
    ex = make_example("vlm")
    mbs = ex.data.microbatches(3, 2)
    pipe = dipc.compile(ex.model, mbs[0], num_stages=2, loss_weight=ex.loss_weight)
    program = pipe.plan(mbs)
    d = tmp_path / "step0"
    assert parse_program((d / "program.txt").read_text()) == program
    assert program_from_json(json.loads((d / "program.json").read_text())) == program
    assert (d / "rank1.txt").read_text().splitlines()[0].startswith(("RECV_ACT", "LOAD"))
    rows = list(csv.reader((d / "schedule.csv").read_text().splitlines()))
    assert len(rows) == 2 and "0F0" in rows[0] and "1B0" in rows[1]
    trace = json.loads((d / "timeline.json").read_text())
    ops = {e.get("args", {}).get("op") for e in trace["traceEvents"] if e.get("ph") == "X"}
    assert {"FWD", "BWD", "SEND_ACT"} <= ops
    assert "bubble" in (d / "partition.txt").read_text()
    pipe.plan(mbs)
    assert (tmp_path / "step1" / "program.txt").exists()


def test_unwritable_dump_dir_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("DIPC_DUMP_DIR", "/proc/dipc-cannot-write")
    ex = make_example("vlm")
    mbs = ex.data.microbatches(2, 2)
    pipe = dipc.compile(ex.model, mbs[0], num_stages=2, loss_weight=ex.loss_weight)
    with pytest.raises(DipcError, match="cannot write dumps .*Fix:"):
        pipe.plan(mbs)


PNG = b"\x89PNG\r\n\x1a\n"


def test_timed_step_adds_measured_dumps_and_gantt(tmp_path, monkeypatch):
    monkeypatch.setenv("DIPC_DUMP_DIR", str(tmp_path))
    ex = make_example("vlm")
    mbs = ex.data.microbatches(3, 2)
    pipe = dipc.compile(ex.model, mbs[0], num_stages=2, loss_weight=ex.loss_weight)
    result = pipe.step(mbs, record_timeline=True)
    d = tmp_path / "step0"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step0"]   # comparison plans do not dump
    assert pipe.history[-1][1] is result.program                      # nor replace the latest plan
    for name in ("gantt.png", "measured.png"):
        assert (d / name).read_bytes()[:8] == PNG, name
    trace = json.loads((d / "measured.json").read_text())
    assert trace["otherData"]["source"] == "measured" and trace["otherData"]["executor"] == "local"
    events = [e for e in trace["traceEvents"] if e.get("ph") == "X"]
    n = sum(len(s) for s in result.program.streams)
    assert len(events) == n and {e["pid"] for e in events} == {0, 1}
    assert all(e["dur"] >= 0 and e["ts"] >= 0 for e in events)
    text = (d / "partition.txt").read_text()
    assert "compared with DIP" in text      # the program is the baseline, so DIP is the comparison
    assert "measured (local executor)" in text and f"{n} instructions" in text


def test_gantt_compares_a_non_baseline_program_with_the_baseline(tmp_path):
    from dipc.dump import dump_step

    ex = make_example("vlm")
    mbs = ex.data.microbatches(3, 2)
    pipe = dipc.compile(ex.model, mbs[0], num_stages=2, schedule="gpipe", loss_weight=ex.loss_weight)
    program = pipe.plan(mbs)
    dump_step(pipe, program, mbs, tmp_path)
    assert "compared with 1f1b (baseline)" in (tmp_path / "partition.txt").read_text()
    assert (tmp_path / "gantt.png").read_bytes()[:8] == PNG
    assert not (tmp_path / "measured.json").exists()    # nothing was measured
