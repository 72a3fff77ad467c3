"""Hypothesis strategies over the whole IR value space (not only valid programs)."""
from __future__ import annotations

from hypothesis import strategies as st

from dipc.ir import Instruction, Op, Program, StageInfo, TensorSpec
from dipc.ir.text import DTYPE_SHORT

small = st.integers(min_value=-1, max_value=40)
names = st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,8}", fullmatch=True)
bare = st.from_regex(r"[A-Za-z0-9_.:/+@%-]{1,10}", fullmatch=True)
any_text = st.text(max_size=12)  # quoted when not bare: spaces, quotes, unicode, newlines

tensor_specs = st.builds(
    TensorSpec, kind=st.just("tensor"),
    dtype=st.sampled_from(sorted(DTYPE_SHORT) + ["float8_e4m3fn", "complex64"]),
    shape=st.lists(st.integers(0, 5000), max_size=4).map(tuple))
scalar_specs = st.builds(TensorSpec, kind=st.sampled_from(["int", "float", "bool"]))
specs = st.one_of(tensor_specs, scalar_specs)

instructions = st.builds(
    Instruction, op=st.sampled_from(list(Op)), stage=small, mb=small, sub=small, peer=small,
    other_stage=small,
    specs=st.lists(specs, max_size=4).map(tuple))

stage_infos = st.builds(
    StageInfo, id=st.integers(0, 20), rank=st.integers(0, 8),
    modality=st.one_of(bare, any_text),
    producers=st.lists(st.integers(0, 20), max_size=3).map(tuple),
    grad_producers=st.lists(st.integers(0, 20), max_size=3).map(tuple),
    loads=st.lists(bare.filter(lambda s: "," not in s), max_size=3).map(tuple),
    has_loss=st.booleans())

attrs = st.dictionaries(
    st.from_regex(r"[A-Za-z_][A-Za-z0-9_.-]{0,8}", fullmatch=True).filter(
        lambda k: k not in ("schedule", "ranks", "microbatches")),
    st.one_of(bare, any_text), max_size=3).map(lambda d: tuple(d.items()))

programs = st.builds(
    Program, schedule=st.one_of(bare, any_text), num_ranks=st.integers(0, 8),
    num_microbatches=st.integers(0, 64),
    stages=st.lists(stage_infos, max_size=4).map(tuple),
    streams=st.lists(st.lists(instructions, max_size=6).map(tuple), max_size=4).map(tuple),
    attrs=attrs,
    subs=st.dictionaries(st.one_of(bare, any_text), st.lists(st.integers(0, 9), min_size=1, max_size=5)
                         .map(tuple), max_size=2).map(lambda d: tuple(d.items())))
