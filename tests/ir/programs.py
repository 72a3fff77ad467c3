"""Hand-built and generated programs shared by the IR tests (no schedule generator needed)."""
from __future__ import annotations

from dipc.ir import Instruction, Op, Program, StageInfo, TensorSpec
from dipc.ir.program import sub_indices

I = Instruction


def act(n: int) -> tuple[TensorSpec, ...]:
    return (TensorSpec(dtype="float32", shape=(n, 64)),)


def two_rank_1f1b() -> Program:
    """Stage 0 (vision, rank 0) feeds stage 1 (backbone + loss, rank 1); 2 microbatches, 1F1B.

    Microbatch 0 has 196 image tokens, microbatch 1 has 392: receives carry per-microbatch shapes.
    """
    stages = (
        StageInfo(id=0, rank=0, modality="vision", loads=("pixel_values",)),
        StageInfo(id=1, rank=1, modality="backbone", producers=(0,), grad_producers=(0,),
                  loads=("input_ids", "labels"), has_loss=True),
    )
    tokens = {0: 196, 1: 392}
    r0 = (
        I(op=Op.LOAD, stage=0, mb=0), I(op=Op.FWD, stage=0, mb=0),
        I(op=Op.SEND_ACT, stage=0, mb=0, peer=1, other_stage=1),
        I(op=Op.LOAD, stage=0, mb=1), I(op=Op.FWD, stage=0, mb=1),
        I(op=Op.SEND_ACT, stage=0, mb=1, peer=1, other_stage=1),
        I(op=Op.RECV_GRAD, stage=0, mb=0, peer=1, other_stage=1, specs=act(tokens[0])),
        I(op=Op.BWD, stage=0, mb=0),
        I(op=Op.RECV_GRAD, stage=0, mb=1, peer=1, other_stage=1, specs=act(tokens[1])),
        I(op=Op.BWD, stage=0, mb=1),
        I(op=Op.OPTIM),
    )
    r1 = []
    for m in (0, 1):
        r1 += [I(op=Op.RECV_ACT, stage=1, mb=m, peer=0, other_stage=0, specs=act(tokens[m])),
               I(op=Op.LOAD, stage=1, mb=m), I(op=Op.FWD, stage=1, mb=m), I(op=Op.BWD, stage=1, mb=m),
               I(op=Op.SEND_GRAD, stage=1, mb=m, peer=0, other_stage=0)]
    r1.append(I(op=Op.OPTIM))
    return Program(schedule="1f1b", num_ranks=2, num_microbatches=2, stages=stages,
                   streams=(r0, tuple(r1)), attrs=(("generator", "hand"),))


def build_program(stages: tuple[StageInfo, ...], num_ranks: int, num_microbatches: int, *,
                  split: bool = False, reduce: bool = True,
                  subs: tuple[tuple[str, tuple[int, ...]], ...] = ()) -> Program:
    """A valid GPipe-like program for any stage DAG whose producers have smaller ids.

    The instructions are emitted in one global sequential order (all forwards, then all
    backwards), and each receive is appended to its rank right after the matching send, so the
    streams are FIFO-consistent and deadlock-free by construction.
    """
    streams: list[list[Instruction]] = [[] for _ in range(num_ranks)]
    rank = [s.rank for s in stages]

    def emit(ins: Instruction) -> None:
        streams[rank[ins.stage]].append(ins)

    M = num_microbatches

    def units(st: StageInfo, m: int):
        return sub_indices(subs, st.modality, m)

    def msg_subs(p: int, c: int, m: int, j: int):
        split_c = units(stages[c], m) != (-1,)
        return (j,) if split_c else units(stages[p], m)

    for m in range(M):
        for s in stages:
            for j in units(s, m):
                if s.loads:
                    emit(I(op=Op.LOAD, stage=s.id, mb=m, sub=j))
                emit(I(op=Op.FWD, stage=s.id, mb=m, sub=j))
                for c in stages:
                    if s.id in c.producers and rank[c.id] != s.rank:
                        emit(I(op=Op.SEND_ACT, stage=s.id, mb=m, sub=j, peer=rank[c.id], other_stage=c.id))
                        emit(I(op=Op.RECV_ACT, stage=c.id, mb=m, sub=j, peer=s.rank, other_stage=s.id,
                               specs=act(8 + m)))
    for m in range(M):
        for s in reversed(stages):
            for j in units(s, m):
                emit(I(op=Op.BWD_I if split else Op.BWD, stage=s.id, mb=m, sub=j))
                for p in s.grad_producers:
                    if rank[p] != s.rank:
                        for k in msg_subs(p, s.id, m, j):
                            emit(I(op=Op.SEND_GRAD, stage=s.id, mb=m, sub=k, peer=rank[p], other_stage=p))
                            emit(I(op=Op.RECV_GRAD, stage=p, mb=m, sub=k, peer=s.rank, other_stage=s.id,
                                   specs=act(8 + m)))
        if split:
            for s in stages:
                for j in units(s, m):
                    emit(I(op=Op.BWD_W, stage=s.id, mb=m, sub=j))
    for r in range(num_ranks):
        if reduce:
            streams[r].append(I(op=Op.REDUCE))
        streams[r].append(I(op=Op.OPTIM))
    return Program(schedule="gpipe-seq", num_ranks=num_ranks, num_microbatches=M,
                   stages=tuple(stages), streams=tuple(tuple(s) for s in streams), subs=subs)


def vision_subs_stages() -> tuple[StageInfo, ...]:
    """Two vision stages (ranks 0, 1) feeding two backbone stages (ranks 1, 0, loss on the last)."""
    return (
        StageInfo(id=0, rank=0, modality="vision", loads=("pixel_values",)),
        StageInfo(id=1, rank=1, modality="vision", producers=(0,), grad_producers=(0,)),
        StageInfo(id=2, rank=1, modality="backbone", producers=(1,), grad_producers=(1,),
                  loads=("input_ids",)),
        StageInfo(id=3, rank=0, modality="backbone", producers=(2,), grad_producers=(2,),
                  loads=("labels",), has_loss=True),
    )


def chain_stages(num_stages: int, placement: list[int], loads_first: bool = True) -> tuple[StageInfo, ...]:
    """A linear pipeline; ``placement[i]`` is stage i's rank (interleaving when ranks repeat)."""
    return tuple(
        StageInfo(id=i, rank=placement[i], producers=(i - 1,) if i else (),
                  grad_producers=(i - 1,) if i else (),
                  loads=("input_ids",) if (i == 0 and loads_first) else (),
                  has_loss=i == num_stages - 1)
        for i in range(num_stages))
