"""JSON form: exact round trip and strict reading."""
from __future__ import annotations

import json

import pytest
from hypothesis import given, settings

from dipc.errors import IRParseError
from dipc.ir import program_from_json, program_to_json
from dipc.ir.jsonio import dumps, loads

from .programs import two_rank_1f1b
from .strategies import programs


@settings(max_examples=100, deadline=None)
@given(programs)
def test_json_roundtrip(p):
    d = program_to_json(p)
    assert program_from_json(d) == p
    assert program_from_json(json.loads(json.dumps(d))) == p
    assert loads(dumps(p)) == p
    assert loads(dumps(p, indent=2)) == p


def test_json_layout():
    d = program_to_json(two_rank_1f1b())
    assert d["format"] == "dipc-ir" and d["version"] == 1
    assert d["attrs"] == {"generator": "hand"}
    assert d["stages"][1] == {"id": 1, "rank": 1, "modality": "backbone", "producers": [0],
                              "grad_producers": [0], "loads": ["input_ids", "labels"], "has_loss": True}
    assert d["streams"][1][0] == {"op": "RECV_ACT", "stage": 1, "mb": 0, "peer": 0, "other_stage": 0,
                                  "specs": [{"kind": "tensor", "dtype": "float32", "shape": [196, 64]}]}
    assert d["streams"][0][-1] == {"op": "OPTIM"}


def _broken(mutate):
    d = program_to_json(two_rank_1f1b())
    mutate(d)
    return d


@pytest.mark.parametrize("data, pattern", [
    ([], r"program: expected an object"),
    (_broken(lambda d: d.update(version=2)), r"version is 2"),
    (_broken(lambda d: d.update(format="other")), r"program.format"),
    (_broken(lambda d: d.pop("stages")), r"missing key 'stages'"),
    (_broken(lambda d: d.update(extra=1)), r"unknown key 'extra'"),
    (_broken(lambda d: d["streams"][0][1].update(op="JUMP")), r"streams\[0\]\[1\].op: unknown op 'JUMP'"),
    (_broken(lambda d: d["streams"][0][1].update(stage="0")), r"streams\[0\]\[1\].stage: expected an integer"),
    (_broken(lambda d: d["streams"][0][1].update(mb=True)), r"expected an integer, got True"),
    (_broken(lambda d: d["streams"][1][0]["specs"][0].update(shape=[1.5])), r"specs\[0\].shape\[0\]"),
    (_broken(lambda d: d["stages"][0].update(has_loss=1)), r"stages\[0\].has_loss"),
    (_broken(lambda d: d["stages"][0].update(loads="pixel_values")), r"stages\[0\].loads: expected a list"),
    (_broken(lambda d: d.update(attrs={"a": 1})), r"attrs\['a'\]"),
])
def test_json_errors(data, pattern):
    with pytest.raises(IRParseError, match=pattern):
        program_from_json(data)


def test_loads_rejects_bad_json():
    with pytest.raises(IRParseError, match="not valid JSON"):
        loads("{")
