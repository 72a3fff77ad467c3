"""Receive buffers: a message's layout (per-dtype flat buffers, views, empty values, scalars) is
worked out once per receive instruction, and a mixed message arrives intact over gloo."""
from __future__ import annotations

import torch

from dipc.ir import Instruction, Op, TensorSpec
from dipc.runtime.launch import spawn
from dipc.runtime.transport import _LAYOUTS, _recv_layout

SPECS = (TensorSpec(kind="tensor", dtype="float32", shape=(2, 3)),
         TensorSpec(kind="tensor", dtype="int64", shape=(4,)),
         TensorSpec(kind="tensor", dtype="float32", shape=(0, 5)),      # empty: not transferred
         TensorSpec(kind="tensor", dtype="float32", shape=(3,)),
         TensorSpec(kind="float"))                                       # a Python scalar, 0-d float64


def _values() -> list[torch.Tensor]:
    return [torch.arange(6, dtype=torch.float32).reshape(2, 3), torch.tensor([5, -1, 7, 2]),
            torch.empty(0, 5), torch.tensor([0.5, 1.5, 2.5]), torch.tensor(3.25, dtype=torch.float64)]


def test_layout_groups_by_dtype_and_leaves_empty_values_out():
    instr = Instruction(op=Op.RECV_ACT, stage=1, mb=0, peer=0, other_stage=0, specs=SPECS)
    layout = _recv_layout(instr)
    assert layout.single is None
    assert layout.empties == [(2, (0, 5), torch.float32)]
    groups = {dtype: (members, size) for dtype, members, size, _ in layout.groups}
    assert groups[torch.float32] == ([0, 3], 9)          # two float32 values share one buffer
    assert groups[torch.int64] == ([1], (4,))            # one value: its own shape, no views
    assert groups[torch.float64] == ([4], ())
    assert _LAYOUTS[id(instr)] is layout
    one = Instruction(op=Op.RECV_GRAD, stage=0, mb=0, peer=1, other_stage=1, specs=SPECS[:1])
    assert _recv_layout(one).single == ((2, 3), torch.float32, True)


def _exchange(rank: int, world: int) -> list[list[float]]:
    from dipc.runtime.transport import DistributedTransport

    transport = DistributedTransport(timeout_s=30)
    got = []
    for mb in range(2):   # two receives of one shape: each instruction gets its own cached layout
        if rank == 0:
            send = Instruction(op=Op.SEND_ACT, stage=0, mb=mb, peer=1, other_stage=1)
            transport.send(send, 0, [v + mb for v in _values()])
        else:
            recv = Instruction(op=Op.RECV_ACT, stage=1, mb=mb, peer=0, other_stage=0, specs=SPECS)
            transport.post_recv(recv, 1)
            values = transport.recv(recv, 1)
            got.append([list(v.shape) for v in values] + [v.tolist() for v in values])
    transport.finish()
    return got


def test_a_mixed_message_arrives_intact():
    _, got = spawn(_exchange, 2, timeout_s=60)
    for mb, values in enumerate(got):
        want = [v + mb for v in _values()]
        assert values[:5] == [list(v.shape) for v in want]
        assert values[5:] == [v.tolist() for v in want]
