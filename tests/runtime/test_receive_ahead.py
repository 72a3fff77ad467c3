"""Receives are posted a few compute instructions ahead, in program order per peer; on NCCL
(peer_ordered) never ahead of an earlier send to the same peer."""
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dipc.ir import COMPUTE_OPS, RECV_OPS, SEND_OPS, Instruction, Op
from dipc.ir.posting import GLOO_RECV_LOOKAHEAD as RECV_LOOKAHEAD
from dipc.ir.posting import receives_ahead
from dipc.runtime.transport import DistributedTransport, LocalTransport

STREAM = [Instruction(op=Op.RECV_ACT, stage=1, mb=0, peer=0, other_stage=0),        # 0: before any compute
          Instruction(op=Op.FWD, stage=1, mb=0),                                    # 1
          Instruction(op=Op.SEND_GRAD, stage=1, mb=0, peer=0, other_stage=0),       # 2
          Instruction(op=Op.RECV_ACT, stage=1, mb=1, peer=0, other_stage=0),        # 3
          Instruction(op=Op.RECV_ACT, stage=1, mb=2, peer=0, other_stage=0),        # 4
          Instruction(op=Op.BWD, stage=1, mb=0),                                    # 5
          Instruction(op=Op.FWD, stage=1, mb=1),                                    # 6
          Instruction(op=Op.RECV_GRAD, stage=1, mb=1, peer=2, other_stage=2)]       # 7


def test_one_compute_ahead_posts_each_receive_at_the_compute_before_it():
    # the first receive has no compute before it: posted at pc 0
    assert receives_ahead(STREAM) == {0: [STREAM[0]], 1: [STREAM[3], STREAM[4]], 6: [STREAM[7]]}


def test_more_look_ahead_posts_earlier():
    assert receives_ahead(STREAM, lookahead=2) == {0: [STREAM[0], STREAM[3], STREAM[4]], 5: [STREAM[7]]}
    assert receives_ahead(STREAM, lookahead=3) == {0: [STREAM[0], STREAM[3], STREAM[4]], 1: [STREAM[7]]}


def test_peer_ordered_posts_never_pass_a_send_to_the_same_peer():
    # the receives from peer 0 come after a send to peer 0 (pc 2): they wait for it; peer 2's does not
    assert receives_ahead(STREAM, lookahead=3, peer_ordered=True) == {0: [STREAM[0]], 3: [STREAM[3], STREAM[4]],
                                                                      1: [STREAM[7]]}


def test_look_ahead_below_one_is_refused():
    with pytest.raises(ValueError, match="lookahead=0"):
        receives_ahead(STREAM, lookahead=0)


def test_transports_choose_their_policy():
    assert (LocalTransport.recv_lookahead, LocalTransport.peer_ordered_posts) == (1, False)
    gloo, nccl = DistributedTransport(1.0, "cpu"), DistributedTransport(1.0, "cuda")   # no process group used
    assert (gloo.recv_lookahead, gloo.peer_ordered_posts) == (RECV_LOOKAHEAD, False)
    assert (nccl.recv_lookahead, nccl.peer_ordered_posts) == (1, True)
    # NCCL: one process group per message direction (see dipc.ir.stream_order); gloo keeps one
    assert (gloo.directional, nccl.directional) == (False, True)


def _posting_order(stream, ahead):
    """Every communication in the order the rank posts it: the receives listed for a pc first,
    then the instruction at that pc (a send, or a receive nobody posted ahead)."""
    posted, out = set(), []
    for pc, instr in enumerate(stream):
        for r in ahead.get(pc, []):
            posted.add(id(r))
            out.append(r)
        if instr.op in SEND_OPS or (instr.op in RECV_OPS and id(instr) not in posted):
            out.append(instr)
    return out


_OPS = [Op.FWD, Op.BWD, Op.SEND_ACT, Op.SEND_GRAD, Op.RECV_ACT, Op.RECV_GRAD]


@settings(max_examples=200, deadline=None)
@given(ops=st.lists(st.tuples(st.sampled_from(_OPS), st.integers(0, 2)), max_size=40),
       lookahead=st.integers(1, 5), peer_ordered=st.booleans())
def test_posting_keeps_program_order(ops, lookahead, peer_ordered):
    stream = [Instruction(op=op, stage=0, mb=k, peer=peer, other_stage=1) if op not in COMPUTE_OPS
              else Instruction(op=op, stage=0, mb=k) for k, (op, peer) in enumerate(ops)]
    ahead = receives_ahead(stream, lookahead, peer_ordered)
    where = {id(r): pc for pc, rs in ahead.items() for r in rs}
    for pc, instr in enumerate(stream):
        if instr.op in RECV_OPS:
            at = where[id(instr)]
            assert at <= pc
            # never more than `lookahead` computes early
            assert sum(1 for i in stream[at:pc] if i.op in COMPUTE_OPS) <= lookahead
    order = _posting_order(stream, ahead)
    assert sorted(map(id, order)) == sorted(id(i) for i in stream if i.op not in COMPUTE_OPS)
    for peer in range(3):
        recvs = [i for i in order if i.op in RECV_OPS and i.peer == peer]
        assert recvs == [i for i in stream if i.op in RECV_OPS and i.peer == peer]
        if peer_ordered:   # NCCL: each pair's posts in program order
            assert [i for i in order if i.peer == peer] == [i for i in stream if i.op not in COMPUTE_OPS
                                                            and i.peer == peer]
