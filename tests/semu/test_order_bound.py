"""dipc.semu.order_bound: the compute-order bound never exceeds the emulated step of the lowered
program (with messages, per-instruction overheads and sub-microbatches), and is close to it."""
import random

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dipc.errors import DipcError
from dipc.ir import Op, StageInfo, TensorSpec
from dipc.passes.codegen import lower
from dipc.passes.schedules import SCHEDULES, expand_subs
from dipc.semu.emulator import simulate
from dipc.semu.order_bound import order_lower_bound
from dipc.semu.profiles import load_preset

CLUSTER = load_preset("h800")
COMPUTE = (Op.FWD, Op.BWD, Op.BWD_I, Op.BWD_W)


def _stages(num_ranks: int, chunks: int, encoder_stages: int) -> list[StageInfo]:
    S = num_ranks * chunks
    return [StageInfo(id=s, rank=s % num_ranks, modality="vision" if s < encoder_stages else "backbone",
                      producers=(s - 1,) if s else (), grad_producers=(s - 1,) if s else (),
                      loads=("x",) if s == 0 else (), has_loss=s == S - 1) for s in range(S)]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 10_000), ranks=st.integers(2, 4), chunks=st.integers(1, 2), mbs=st.integers(1, 6),
       schedule=st.sampled_from(["gpipe", "1f1b", "interleaved_1f1b", "zb_h1"]), split=st.booleans())
def test_bound_is_below_the_emulated_step(seed, ranks, chunks, mbs, schedule, split):
    rng = random.Random(seed)
    stages = _stages(ranks, chunks, encoder_stages=ranks if split else 0)
    subs = (("vision", tuple(rng.randint(1, 3) for _ in range(mbs))),) if split else ()
    try:
        orders = SCHEDULES[schedule](stages, ranks, mbs)
    except DipcError:
        return                                    # the schedule does not serve this layout
    if subs:
        orders = expand_subs(orders, stages, subs)
    secs = {}

    def seconds(op, s, m, j):
        return secs.setdefault((op, s, m, j), rng.uniform(1e-3, 5e-2))

    def specs(kind, mb, producer, consumer, sub=-1):
        return (TensorSpec(kind="tensor", dtype="bfloat16", shape=(rng.randint(1, 50_000_000),)),)

    program = lower(stages, ranks, mbs, orders, schedule=schedule, specs=specs, subs=subs)
    overhead = rng.uniform(0, 1e-3)
    result = simulate(program, CLUSTER, lambda ins: (seconds(ins.op, ins.stage, ins.mb, ins.sub) + overhead
                                                     if ins.op in COMPUTE else overhead))
    bound = order_lower_bound(stages, orders, seconds, subs)
    assert bound <= result.step_time * (1 + 1e-12)
    assert bound >= sum(seconds(a.op, a.stage, a.mb, a.sub) for a in orders[0]) * (1 - 1e-12)   # rank 0 is serial
