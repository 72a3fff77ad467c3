"""Receives are posted one compute instruction ahead, in program order."""
from dipc.ir import Instruction, Op
from dipc.runtime.interpreter import _receives_ahead


def test_each_receive_is_posted_at_the_compute_before_it():
    stream = [Instruction(op=Op.RECV_ACT, stage=1, mb=0, peer=0, other_stage=0),        # 0: before any compute
              Instruction(op=Op.FWD, stage=1, mb=0),                                    # 1
              Instruction(op=Op.SEND_GRAD, stage=1, mb=0, peer=0, other_stage=0),       # 2
              Instruction(op=Op.RECV_ACT, stage=1, mb=1, peer=0, other_stage=0),        # 3
              Instruction(op=Op.RECV_ACT, stage=1, mb=2, peer=0, other_stage=0),        # 4
              Instruction(op=Op.BWD, stage=1, mb=0),                                    # 5
              Instruction(op=Op.FWD, stage=1, mb=1),                                    # 6
              Instruction(op=Op.RECV_GRAD, stage=1, mb=1, peer=2, other_stage=2)]       # 7
    ahead = _receives_ahead(stream)
    assert ahead == {0: [stream[0]], 1: [stream[3], stream[4]], 6: [stream[7]]}
    posted = [r for pc in sorted(ahead) for r in ahead[pc]]
    assert posted == [i for i in stream if i.op in (Op.RECV_ACT, Op.RECV_GRAD)]   # program order kept
