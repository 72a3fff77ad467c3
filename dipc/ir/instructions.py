"""The instruction set: one opcode enum and one small frozen value type.

Each instruction prints as one line, ``OP key=value ...``, and :func:`dipc.ir.text.parse_instruction`
is the exact inverse. Key=value tokens (instead of a positional ``2F0``) let new fields be added
without breaking old dumps.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum


class Op(str, Enum):
    """What an instruction does. The mnemonic is the text form."""

    LOAD = "LOAD"            # put the microbatch's batch keys this stage reads into the stage's inbox
    FWD = "FWD"              # forward of one stage for one (sub-)microbatch
    BWD = "BWD"              # full backward (input grads + weight grads)
    BWD_I = "BWD_I"          # backward for inputs only (zero-bubble split)
    BWD_W = "BWD_W"          # backward for weights only, after the matching BWD_I
    SEND_ACT = "SEND_ACT"    # send stage outputs to a consumer stage on another rank (non-blocking)
    RECV_ACT = "RECV_ACT"    # receive a producer stage's outputs (blocking)
    SEND_GRAD = "SEND_GRAD"  # send input grads back to a producer stage on another rank (non-blocking)
    RECV_GRAD = "RECV_GRAD"  # receive output grads from a consumer stage (blocking)
    REDUCE = "REDUCE"        # gradient reduction (data parallel / shared parameters)
    OPTIM = "OPTIM"          # optimizer step and zero-grad for this rank's parameters


COMPUTE_OPS = frozenset({Op.FWD, Op.BWD, Op.BWD_I, Op.BWD_W})
SEND_OPS = frozenset({Op.SEND_ACT, Op.SEND_GRAD})
RECV_OPS = frozenset({Op.RECV_ACT, Op.RECV_GRAD})
COMM_OPS = SEND_OPS | RECV_OPS


@dataclass(frozen=True, slots=True)
class TensorSpec:
    """What a receiver must allocate for one transferred leaf value.

    ``kind`` is ``"tensor"`` (then ``dtype`` and ``shape`` are set) or a Python scalar kind
    (``"int"``, ``"float"``, ``"bool"``), which travels as a 0-d tensor.
    Text form: ``f32[2,16,64]``, ``i64[]``, ``int``.
    """

    kind: str = "tensor"
    dtype: str = ""
    shape: tuple[int, ...] = ()

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


@dataclass(frozen=True, slots=True, kw_only=True)
class Instruction:
    """One step of a rank's stream.

    ``stage``/``mb``: the stage and microbatch the instruction works on.
    ``sub``: the modality sub-microbatch (``-1`` = the whole microbatch). A stage whose modality
    the program splits (``Program.subs``) runs LOAD/FWD/BWD once per sub; a message on an edge out
    of such a stage carries the producer's sub on both sides (send and receive, act and grad).
    For communication, ``peer`` is the other rank and ``other_stage`` the stage on the far side
    (the consumer for SEND_ACT / RECV_GRAD, the producer for RECV_ACT / SEND_GRAD).
    ``specs`` (receives only) lists every leaf value in the message, so no shape handshake is needed.
    """

    op: Op
    stage: int = -1
    mb: int = -1
    sub: int = -1
    peer: int = -1
    other_stage: int = -1
    specs: tuple[TensorSpec, ...] = field(default=())

    def __str__(self) -> str:  # the one-line text form
        from dipc.ir.text import format_instruction

        return format_instruction(self)

    @property
    def is_comm(self) -> bool:
        return self.op in COMM_OPS

    def message_key(self) -> tuple[str, int, int, int, int]:
        """Identity of the message a SEND/RECV carries, the same on both sides:
        (kind, microbatch, producer-side stage, consumer-side stage, sub-microbatch) of the edge."""
        return message_key(self.op, self.stage, self.other_stage, self.mb, self.sub)


def message_key(op: Op, stage: int, other_stage: int, mb: int, sub: int) -> tuple[str, int, int, int, int]:
    """:meth:`Instruction.message_key` of a SEND/RECV with these fields, without building it."""
    if op is _SEND_ACT or op is _RECV_GRAD:
        src, dst = stage, other_stage
    elif op is _RECV_ACT or op is _SEND_GRAD:
        src, dst = other_stage, stage
    else:
        raise ValueError(f"{op} is not a communication instruction")
    return ("act" if op is _SEND_ACT or op is _RECV_ACT else "grad", mb, src, dst, sub)


# Op.X is a slow class-attribute lookup on Python 3.11 enums; message_key runs per message
_RECV_ACT, _RECV_GRAD, _SEND_ACT, _SEND_GRAD = Op.RECV_ACT, Op.RECV_GRAD, Op.SEND_ACT, Op.SEND_GRAD
