"""Sub-microbatches in the IR: text/JSON round trip, golden dump, and the validator's sub rules."""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest

from dipc.errors import IRParseError
from dipc.ir import Instruction, Op, dump_program, parse_instruction, parse_program, validate
from dipc.ir.jsonio import dumps, loads

from .programs import build_program, vision_subs_stages
from .test_ir_validate import fails, find, swap, with_stream

I = Instruction
GOLDEN = Path(__file__).parent / "golden"


def subs_program(counts=(3, 1), split=False):
    return build_program(vision_subs_stages(), 2, len(counts), split=split, subs=(("vision", counts),))


def test_sub_text_form_only_when_set():
    assert str(I(op=Op.FWD, stage=0, mb=3, sub=1)) == "FWD stage=0 mb=3 sub=1"
    assert str(I(op=Op.FWD, stage=0, mb=3)) == "FWD stage=0 mb=3"
    ins = I(op=Op.RECV_ACT, stage=2, mb=0, sub=2, peer=0, other_stage=1)
    assert parse_instruction(str(ins)) == ins
    assert ins.message_key() == ("act", 0, 1, 2, 2)


@pytest.mark.parametrize("split", [False, True])
def test_subs_program_validates_and_roundtrips(split):
    p = subs_program(split=split)
    validate(p)
    assert parse_program(dump_program(p)) == p
    assert loads(dumps(p)) == p
    assert "subs modality=vision counts=3,1" in dump_program(p)


def test_golden():
    p = subs_program()
    text = dump_program(p)
    path = GOLDEN / "vision_subs_gpipe.txt"
    if os.environ.get("DIPC_UPDATE_GOLDEN") == "1":
        path.write_text(text)
    assert text == path.read_text()


def test_subs_line_errors():
    text = dump_program(subs_program())
    with pytest.raises(IRParseError, match="unknown key 'n'"):
        parse_program(text.replace("counts=3,1", "counts=3,1 n=2"))
    with pytest.raises(IRParseError, match="after a stage"):
        lines = text.splitlines()
        lines.insert(4, lines.pop(2))
        parse_program("\n".join(lines))


def test_consumer_forward_needs_every_sub():
    p = subs_program()
    r1 = p.streams[1]
    last = find(r1, op=Op.RECV_ACT, stage=1, mb=0, sub=2)
    fwd1 = find(r1, op=Op.FWD, stage=1, mb=0, sub=2)
    fwd2 = find(r1, op=Op.FWD, stage=2, mb=0)
    # the backbone forward moved before vision sub 2 is in: a dependency-order error
    stream = list(r1)
    moved = stream[fwd2 - 1:fwd2 + 1]          # LOAD + FWD of the backbone stage
    assert moved[0].op is Op.LOAD
    del stream[fwd2 - 1:fwd2 + 1]
    stream[fwd1:fwd1] = moved
    fails(with_stream(p, 1, stream), r"FWD stage=2 mb=0 comes before FWD stage=1 mb=0 sub=2")
    assert last < fwd1


def test_missing_sub_message_and_bad_sub():
    p = subs_program()
    r1 = list(p.streams[1])
    del r1[find(r1, op=Op.RECV_ACT, stage=1, mb=0, sub=1)]
    fails(with_stream(p, 1, r1), r"(missing RECV_ACT stage=1 mb=0 sub=1|1st receive|2nd receive)")
    r0 = list(p.streams[0])
    i = find(r0, op=Op.FWD, stage=0, mb=1, sub=0)
    r0[i] = dataclasses.replace(r0[i], sub=-1)
    fails(with_stream(p, 0, r0), r"sub=-1 is out of range")
    r1 = list(p.streams[1])
    i = find(r1, op=Op.FWD, stage=2, mb=0)
    r1[i] = dataclasses.replace(r1[i], sub=0)
    fails(with_stream(p, 1, r1), r"sub=0 is out of range.*stage 2 is not split")


def test_gradient_per_sub_before_its_backward():
    p = subs_program()
    r0 = p.streams[0]
    b = find(r0, op=Op.BWD, stage=0, mb=0, sub=1)
    g = find(r0, op=Op.RECV_GRAD, stage=0, mb=0, sub=1)
    assert g < b
    fails(with_stream(p, 0, swap(r0, g, b)), r"BWD stage=0 mb=0 sub=1 comes before RECV_GRAD")


def test_bad_subs_table():
    p = subs_program()
    fails(dataclasses.replace(p, subs=(("vision", (3,)),)), r"counts \(3,\) for 2 microbatches")
    fails(dataclasses.replace(p, subs=(("audio", (1, 1)),)), r"no stage has")
    stages = list(p.stages)
    stages[3] = dataclasses.replace(stages[3], modality="vision")
    fails(dataclasses.replace(p, stages=tuple(stages)), r"stage 3 runs in 'vision' subs but reads stage 2")
