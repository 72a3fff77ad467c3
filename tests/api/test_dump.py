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
