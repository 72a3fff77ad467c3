"""The ``recompute`` program attribute: typed read/write, text and JSON round trips, old dumps."""
import pytest

from dipc.errors import IRParseError
from dipc.ir import dump_program, parse_program, program_from_json, program_to_json
from dipc.ir.recompute import (RECOMPUTE_ATTR, format_recompute, parse_recompute, recompute_plan,
                               with_recompute)
from tests.ir.programs import two_rank_1f1b


def test_plan_round_trips_through_text_and_json():
    p = two_rank_1f1b()
    plan = {1: ("language_model.layers.0", "language_model.layers.3"), 0: ("vision.blocks.1",)}
    q = with_recompute(p, plan)
    assert recompute_plan(q) == {0: ("vision.blocks.1",), 1: plan[1]}
    assert dict(q.attrs)[RECOMPUTE_ATTR] == "0:vision.blocks.1;1:language_model.layers.0,language_model.layers.3"
    assert ("generator", "hand") in q.attrs, "other attributes stay"
    text = dump_program(q)
    assert parse_program(text) == q and dump_program(parse_program(text)) == text
    assert program_from_json(program_to_json(q)) == q
    assert recompute_plan(parse_program(text)) == recompute_plan(q)


def test_empty_plan_leaves_old_dumps_unchanged():
    p = two_rank_1f1b()
    assert recompute_plan(p) == {}
    assert with_recompute(p, {}) == p
    assert with_recompute(with_recompute(p, {0: ["a"]}), {0: []}) == p
    assert dump_program(with_recompute(p, {})) == dump_program(p)


@pytest.mark.parametrize("bad", ["0", "x:a", "0:", "0:a;0:b", "0:a,,b", ":a", "0:a;"])
def test_malformed_values_are_parse_errors(bad):
    with pytest.raises(IRParseError, match="recompute="):
        parse_recompute(bad)


def test_unwritable_plans_are_refused():
    with pytest.raises(ValueError, match="Fix:"):
        format_recompute({0: ["a,b"]})
    with pytest.raises(ValueError, match="stages"):
        with_recompute(two_rank_1f1b(), {7: ["a"]})


def test_format_parse_inverse():
    plan = {0: ("a.b", "c"), 3: ("d.0",)}
    assert parse_recompute(format_recompute(plan)) == plan
    assert format_recompute({}) == "" and parse_recompute("") == {}
