"""Every schedule generator emits valid programs with modality sub-microbatches (property test)."""
from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from dipc.ir import StageInfo, dump_program, parse_program, validate
from dipc.passes.codegen import build_program, lower
from dipc.passes.dual_queue import TaskCosts, dual_queue_schedule

from dipc.ir import TensorSpec


def fake_specs(kind: str, mb: int, producer: int, consumer: int, sub: int) -> tuple[TensorSpec, ...]:
    dtype = "float32" if kind == "act" else "bfloat16"
    return (TensorSpec(dtype=dtype, shape=(mb + 1, producer, consumer, sub + 1)),)


def encoder_then_backbone(num_vision: int, num_backbone: int, placement: list[int]) -> list[StageInfo]:
    """``num_vision`` vision stages feeding ``num_backbone`` backbone stages; stage i on placement[i]."""
    out = []
    for i in range(num_vision + num_backbone):
        vision = i < num_vision
        out.append(StageInfo(id=i, rank=placement[i], modality="vision" if vision else "backbone",
                             producers=(i - 1,) if i else (), grad_producers=(i - 1,) if i else (),
                             loads=("pixel_values",) if i == 0 else (("input_ids",) if i == num_vision else ()),
                             has_loss=i == num_vision + num_backbone - 1))
    return out


@st.composite
def layouts(draw):
    ranks = draw(st.integers(2, 4))
    chunks = draw(st.sampled_from([1, 1, 2]))
    n = ranks * chunks
    num_vision = draw(st.integers(1, n - 1))
    stages = encoder_then_backbone(num_vision, n - num_vision, [i % ranks for i in range(n)])
    M = draw(st.integers(1, 5))
    counts = tuple(draw(st.lists(st.integers(1, 4), min_size=M, max_size=M)))
    return stages, ranks, chunks, M, counts


@settings(max_examples=40, deadline=None)
@given(layouts(), st.data())
def test_programs_with_subs_validate_and_roundtrip(layout, data):
    stages, P, chunks, M, counts = layout
    subs = (("vision", counts),)
    names = ["gpipe", "dual_queue"] + (["1f1b", "zb_h1"] if chunks == 1 else ["interleaved_1f1b"])
    for name in names:
        program = build_program(stages, P, M, name, specs=fake_specs, subs=subs)
        validate(program)
        assert parse_program(dump_program(program)) == program
        for stream in program.streams:
            for ins in stream:
                if ins.specs:
                    assert ins.specs == fake_specs(*ins.message_key())
    # the dual queue with uneven per-sub costs and the zero-bubble split
    seed = data.draw(st.integers(0, 50))
    costs = TaskCosts(fwd=lambda s, m, j=-1: 1 + (s * 7 + m * 3 + j + seed) % 5,
                      bwd=lambda s, m, j=-1: 1 + (s + m + 2 * j + seed) % 4,
                      wgrad=lambda s, m, j=-1: 1.0, act=lambda s, m, j=-1: 1 + (j + 1) % 2)
    for split in (False, True):
        orders = dual_queue_schedule(stages, P, M, costs, split_backward=split, subs=subs)
        program = lower(stages, P, M, orders, schedule="dual_queue", subs=subs)
        validate(program)


def test_dual_queue_fills_gaps_with_subs():
    """Subs are separate tasks: the encoder rank starts the next microbatch's subs before the
    first microbatch's backward arrives, and the backbone starts as soon as all subs are in."""
    stages = encoder_then_backbone(1, 1, [0, 1])
    orders = dual_queue_schedule(stages, 2, 2, subs=(("vision", (3, 2)),))
    assert [str(a) for a in orders[0][:4]] == ["F0.0:0", "F0.0:1", "F0.0:2", "F0.1:0"]
    assert [str(a) for a in orders[1]][:2] == ["F1.0", "B1.0"]
