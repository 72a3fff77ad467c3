"""The ``recompute`` program attribute: typed read/write, text and JSON round trips, old dumps."""
import pytest
from hypothesis import given
from hypothesis import strategies as st

from dipc.errors import IRParseError, ScheduleError
from dipc.ir import dump_program, parse_program, program_from_json, program_to_json
from dipc.ir.recompute import (RECOMPUTE_ATTR, SELECTIVE_SUFFIX, check_recompute, expand_recompute,
                               format_recompute, is_per_microbatch, layers_of, parse_recompute, recompute_plan,
                               recomputes, selective, split_entry, stage_union, with_recompute)
from dipc.ir.validate import validate
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
    with pytest.raises(ScheduleError, match="stage 7.*Fix:"):
        with_recompute(two_rank_1f1b(), {7: ["a"]})


def test_format_parse_inverse():
    plan = {0: ("a.b", "c"), 3: ("d.0",)}
    assert parse_recompute(format_recompute(plan)) == plan
    assert format_recompute({}) == "" and parse_recompute("") == {}


# -- per-microbatch choices -----------------------------------------------------------------------

def test_microbatch_entries_round_trip_and_group_in_canonical_text():
    p = two_rank_1f1b()
    plan = {(1, 1): ("b",), 0: ("v",), (1, 0): ("a", "b"), 1: ("c",)}
    q = with_recompute(p, plan)
    assert dict(q.attrs)[RECOMPUTE_ATTR] == "0:v;1:c;1@0:a,b;1@1:b"
    assert recompute_plan(q) == {0: ("v",), 1: ("c",), (1, 0): ("a", "b"), (1, 1): ("b",)}
    text = dump_program(q)
    assert parse_program(text) == q and dump_program(parse_program(text)) == text
    assert program_from_json(program_to_json(q)) == q
    # microbatches with the same layers share one part
    assert format_recompute({(2, 3): ["x"], (2, 0): ["x"], (2, 1): ["y"]}) == "2@0,3:x;2@1:y"
    assert parse_recompute("2@0,3:x;2@1:y") == {(2, 0): ("x",), (2, 3): ("x",), (2, 1): ("y",)}


def test_accessors_union_stage_and_microbatch_layers():
    plan = parse_recompute("1:c;1@0:a,c;2@1:z")
    assert layers_of(plan, 1, 0) == ("c", "a") and layers_of(plan, 1, 1) == ("c",)
    assert layers_of(plan, 2, 0) == () and layers_of(plan, 2, 1) == ("z",)
    assert recomputes(plan, 1, 0, "a") and not recomputes(plan, 1, 1, "a") and recomputes(plan, 1, 1, "c")
    assert stage_union(plan) == {1: ("c", "a"), 2: ("z",)}
    assert is_per_microbatch(plan) and not is_per_microbatch(parse_recompute("0:a;1:b"))
    assert expand_recompute(plan, 2) == {(1, 0): frozenset("ac"), (1, 1): frozenset("c"), (2, 1): frozenset("z")}


def test_old_text_means_every_microbatch():
    plan = parse_recompute("0:vision.blocks.1;1:lm.0")
    assert plan == {0: ("vision.blocks.1",), 1: ("lm.0",)}
    assert expand_recompute(plan, 2) == {(s, m): frozenset(plan[s]) for s in (0, 1) for m in (0, 1)}


@pytest.mark.parametrize("bad", ["0@:a", "0@x:a", "0@1,,2:a", "0@1,1:a", "0@1:a;0@1:b", "@1:a", "0@1:a@b",
                                 "0@-1:a"])
def test_malformed_microbatch_parts_are_parse_errors_naming_the_part(bad):
    with pytest.raises(IRParseError, match=r"recompute=.*part .*Fix:"):
        parse_recompute(bad)


def test_plans_naming_missing_stages_or_microbatches_are_refused():
    p = two_rank_1f1b()   # 2 microbatches
    with pytest.raises(ScheduleError, match=r"microbatch 2 of stage 1, outside 0\.\.1.*Fix:"):
        with_recompute(p, {(1, 2): ["a"]})
    with pytest.raises(ScheduleError, match=r"stage 5.*Fix:"):
        with_recompute(p, {(5, 0): ["a"]})
    with pytest.raises(ValueError, match="Fix:"):
        format_recompute({(1, -1): ["a"]})
    with pytest.raises(ValueError, match="Fix:"):
        format_recompute({(1, 0): ["a@b"]})


def test_validator_refuses_a_dumped_plan_naming_a_missing_microbatch():
    text = dump_program(with_recompute(two_rank_1f1b(), {(1, 1): ["a"]})).replace("1@1:a", "1@7:a")
    program = parse_program(text)   # parsing alone cannot know the program's microbatches
    with pytest.raises(ScheduleError, match=r"microbatch 7 of stage 1.*Fix:"):
        validate(program)
    validate(parse_program(text.replace("1@7:a", "1@1:a")))


# -- selective entries (<layer>~sel) -------------------------------------------------------------

def test_selective_entries_round_trip_through_text_and_json():
    p = two_rank_1f1b()
    plan = {0: (selective("vision.blocks.0"), "vision.blocks.1"), (1, 1): ("lm.layers.0", selective("lm.layers.1")),
            1: (selective("lm.layers.2"),)}
    q = with_recompute(p, plan)
    assert dict(q.attrs)[RECOMPUTE_ATTR] == \
        "0:vision.blocks.0~sel,vision.blocks.1;1:lm.layers.2~sel;1@1:lm.layers.0,lm.layers.1~sel"
    text = dump_program(q)
    assert 'recompute="0:vision.blocks.0~sel' in text
    assert parse_program(text) == q and dump_program(parse_program(text)) == text
    assert program_from_json(program_to_json(q)) == q
    assert recompute_plan(parse_program(text)) == recompute_plan(q) == {k: plan[k] for k in (0, 1, (1, 1))}
    validate(parse_program(text))
    assert [split_entry(e) for e in layers_of(recompute_plan(q), 1, 1)] == \
        [("lm.layers.2", True), ("lm.layers.0", False), ("lm.layers.1", True)]
    assert split_entry("a.b") == ("a.b", False) and selective("a.b") == "a.b" + SELECTIVE_SUFFIX


def test_one_key_naming_a_layer_fully_and_selectively_is_refused():
    with pytest.raises(ValueError, match=r"\['a'\] both fully and selectively.*Fix:"):
        format_recompute({(0, 1): ["a", "a~sel"]})


def test_a_unit_running_a_layer_fully_and_selectively_after_the_union_is_refused():
    p = two_rank_1f1b()
    with pytest.raises(ScheduleError, match=r"\['lm.0'\] of stage 1, microbatch 1 both fully and selectively.*Fix:"):
        with_recompute(p, {1: ["lm.0"], (1, 1): ["lm.0~sel"]})
    with_recompute(p, {1: ["lm.0"], (1, 1): ["lm.1~sel"], (0, 1): ["lm.0~sel"]})   # other layers, other stage
    # a dumped program written by hand is caught by the validator, naming the unit
    text = dump_program(with_recompute(p, {1: ["lm.0~sel"], (1, 0): ["lm.1"]})).replace("1@0:lm.1", "1@0:lm.0")
    with pytest.raises(ScheduleError, match=r"\['lm.0'\] of stage 1, microbatch 0 both.*Fix:"):
        validate(parse_program(text))
    # within one parsed part, too (parsing alone does not check it)
    with pytest.raises(ScheduleError, match=r"\['a'\] of stage 0 both fully.*Fix:"):
        check_recompute(p, parse_recompute("0:a,a~sel"))


_layer = st.from_regex(r"[a-z][a-z0-9_.]{0,6}", fullmatch=True)


@given(st.dictionaries(st.one_of(st.integers(0, 3), st.tuples(st.integers(0, 3), st.integers(0, 5))),
                       st.lists(_layer, max_size=3), max_size=6))
def test_text_round_trip_property(plan):
    text = format_recompute(plan)
    parsed = parse_recompute(text)
    assert parsed == {k: tuple(dict.fromkeys(v)) for k, v in plan.items() if v}
    assert format_recompute(parsed) == text
    assert expand_recompute(parsed, 6) == expand_recompute(plan, 6)
