"""Text form: round trips (property tests), parse errors, the grid."""
from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dipc.errors import IRParseError
from dipc.ir import (Instruction, Op, TensorSpec, dump_program, format_grid, format_instruction,
                     parse_instruction, parse_program)

from .programs import two_rank_1f1b
from .strategies import instructions, programs


@settings(deadline=None)
@given(instructions)
def test_instruction_roundtrip(ins):
    line = format_instruction(ins)
    assert "\n" not in line
    assert parse_instruction(line) == ins
    assert format_instruction(parse_instruction(line)) == line
    assert str(ins) == line


@pytest.mark.parametrize("op", list(Op))
def test_every_op_roundtrips_bare(op):
    ins = Instruction(op=op)
    assert format_instruction(ins) == op.value
    assert parse_instruction(op.value) == ins


def test_instruction_text_form():
    ins = Instruction(op=Op.RECV_ACT, stage=1, mb=0, peer=0, other_stage=0,
                      specs=(TensorSpec(dtype="float32", shape=(2, 16, 64)), TensorSpec(dtype="int64"),
                             TensorSpec(kind="int"), TensorSpec(dtype="bool", shape=(3,))))
    assert str(ins) == "RECV_ACT stage=1 mb=0 peer=0 other_stage=0 specs=f32[2,16,64];i64[];int;bool[3]"
    # keys in any order and extra spaces parse to the same value
    assert parse_instruction("  RECV_ACT  specs=f32[2,16,64];i64[];int;bool[3] other_stage=0 "
                             "peer=0 mb=0 stage=1 ") == ins


@settings(max_examples=100, deadline=None)
@given(programs)
def test_program_roundtrip(p):
    text = dump_program(p)
    assert text.startswith("# dipc-ir v1\nprogram ")
    assert parse_program(text) == p
    assert dump_program(parse_program(text)) == text


@settings(max_examples=50, deadline=None)
@given(programs, st.data())
def test_comments_and_blank_lines_anywhere_are_ignored(p, data):
    lines = dump_program(p).split("\n")
    out = []
    for line in lines:
        out.append(line)
        if data.draw(st.booleans()):
            out.append(data.draw(st.sampled_from(["# produced by codegen in 3.1 ms", "", "   # x = 1"])))
    text = "# produced by codegen in 3.1 ms\n" + "\n".join(out)
    assert parse_program(text) == p


def test_quoted_strings():
    p = two_rank_1f1b()
    q = type(p)(schedule="my run", num_ranks=p.num_ranks, num_microbatches=p.num_microbatches,
                stages=p.stages, streams=p.streams, attrs=(("note", 'a "b"\nc'), ("empty", "")))
    text = dump_program(q)
    assert 'program schedule="my run" ranks=2 microbatches=2 note="a \\"b\\"\\nc" empty=""' in text
    assert parse_program(text) == q


@pytest.mark.parametrize("line, pattern", [
    ("FOO stage=1", r"unknown op 'FOO'"),
    ("fwd stage=1", r"unknown op 'fwd'"),
    ("FWD stag=1", r"unknown key 'stag'"),
    ("FWD stage", r"malformed token 'stage'"),
    ("FWD stage=1 mb", r"malformed token 'mb'"),
    ("FWD stage=x", r"stage='x' is not an integer"),
    ("FWD stage=1 stage=2", r"key 'stage' given twice"),
    ("RECV_ACT specs=", r"malformed token 'specs='"),
    ("RECV_ACT specs=f32[2,", r"malformed tensor spec 'f32\[2,'"),
    ("RECV_ACT specs=float32[2]", r"long dtype name 'float32'"),
    ("RECV_ACT specs=f32[2,,3]", r"malformed shape"),
    ("RECV_ACT specs=tensor", r"a tensor needs dtype\[shape\]"),
    ('FWD stage="1"', r"is not an integer"),
])
def test_parse_instruction_errors(line, pattern):
    with pytest.raises(IRParseError, match=pattern) as e:
        parse_instruction(line)
    assert line.strip() in str(e.value)  # names the line


GOOD = dump_program(two_rank_1f1b())


def _replace_line(text: str, n: int, new: str) -> str:
    lines = text.split("\n")
    lines[n] = new
    return "\n".join(lines)


@pytest.mark.parametrize("text, pattern", [
    (_replace_line(GOOD, 7, "  FWD stage=0 mb=0 color=red"), r"^line 8: .*unknown key 'color'"),
    (_replace_line(GOOD, 7, "  JUMP stage=0"), r"^line 8: .*unknown op 'JUMP'"),
    (_replace_line(GOOD, 0, "# dipc-ir v2"), r"^line 1: format version '2'"),
    (_replace_line(GOOD, 0, "# hello"), r"^line 2: no '# dipc-ir v1' header"),
    (_replace_line(GOOD, 1, "program schedule=1f1b ranks=2"), r"^line 2: .*missing microbatches="),
    (_replace_line(GOOD, 1, "program schedule=1f1b ranks=two microbatches=2"), r"ranks='two'"),
    (_replace_line(GOOD, 2, "stage id=0 rank=0"), r"^line 3: .*missing modality="),
    (_replace_line(GOOD, 2, "stage id=0 rank=0 modality=v loss=yes"), r"^line 3: .*malformed token 'loss=yes'"),
    (_replace_line(GOOD, 2, "stage id=0 rank=0 modality=v flavor=x"), r"^line 3: .*unknown key 'flavor'"),
    (_replace_line(GOOD, 4, "rank 1:"), r"^line 5: rank section 1 out of order"),
    (_replace_line(GOOD, 4, "rank zero:"), r"^line 5: malformed rank header"),
    (GOOD.replace("rank 0:\n", ""), r"^line 5: instruction .* before any 'rank <r>:'"),
    (GOOD + "stage id=2 rank=0 modality=x\n", r"stage line .* after the first rank section"),
    (GOOD + "program schedule=x ranks=1 microbatches=1\n", r"a second program line"),
    ("# dipc-ir v1\n", r"no 'program \.\.\.' line"),
    (_replace_line(GOOD, 1, 'program schedule="open ranks=2 microbatches=2'), r"unterminated string"),
    (_replace_line(GOOD, 1, "program schedule=a\"b ranks=2 microbatches=2"), r"malformed token"),
])
def test_parse_program_errors(text, pattern):
    with pytest.raises(IRParseError, match=pattern):
        parse_program(text)


@pytest.mark.parametrize("spec", [TensorSpec(dtype="f32", shape=(2,)), TensorSpec(dtype=""),
                                  TensorSpec(kind="int", dtype="int64"), TensorSpec(dtype="float32", shape=(-1,))])
def test_unprintable_specs_are_refused(spec):
    with pytest.raises(ValueError, match="Fix:"):
        format_instruction(Instruction(op=Op.RECV_ACT, specs=(spec,)))


def test_grid_labels_and_mark():
    grid = format_grid(two_rank_1f1b(), mark=(1, 3))
    lines = grid.splitlines()
    assert lines[0].split() == ["step", "rank", "0", "rank", "1"]
    assert lines[1].split() == ["0", "L0.0", "rA1.0<0"]
    assert lines[3].split() == ["2", "sA0.0>1", "F1.0"]
    assert re.fullmatch(r"\s*3\s+L0\.1\s+\[B1\.0\]\s+<-- here", lines[4])
    assert lines[11].split() == ["10", "O", "O"]
    assert grid.count("<-- here") == 1


def test_grid_marks_end_of_stream_and_windows():
    p = two_rank_1f1b()
    grid = format_grid(p, mark=(0, 11))
    assert re.search(r"11\s+\[end\]\s+<-- here", grid)
    short = format_grid(p, mark=(1, 5), max_rows=4)
    assert "steps above" in short and "steps below" in short
    assert len(short.splitlines()) == 1 + 1 + 4 + 1
    assert "[rA1.1<0]" in short
