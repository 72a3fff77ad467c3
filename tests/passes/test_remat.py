"""Cheap glue values (RoPE tables, masks from batch keys) are recomputed on the stage that reads
them instead of being sent; values whose recomputation would cost or change anything still travel."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dipc
from dipc.ir import Op
from examples.models.layers import LlamaBlock, RotaryEmbedding


class _Chain(nn.Module):
    """Embedding -> 4 LLaMA blocks -> head. ``hf_positions``: positions from the hidden state's
    shape and device (HF's ``arange(inputs_embeds.shape[1], device=inputs_embeds.device)``),
    else from the token ids."""

    def __init__(self, hf_positions: bool = False, trainable_scale: bool = False):
        super().__init__()
        self.embed = nn.Embedding(32, 16)
        self.rotary = RotaryEmbedding(8)
        self.blocks = nn.ModuleList(LlamaBlock(16, 2, 2, 32) for _ in range(4))
        self.head = nn.Linear(16, 32)
        self.hf_positions = hf_positions
        self.scale = nn.Parameter(torch.ones(())) if trainable_scale else None

    def forward(self, input_ids, labels):
        h = self.embed(input_ids)
        src = h if self.hf_positions else input_ids
        cos, sin = self.rotary(torch.arange(src.shape[1], device=src.device))
        if self.scale is not None:
            cos = cos * self.scale   # carries a gradient: must travel, not be recomputed
        for block in self.blocks:
            h = block(h, cos, sin)
        return F.cross_entropy(self.head(h).flatten(0, 1), labels.flatten())


def _batch(seed: int, length: int = 6):
    g = torch.Generator().manual_seed(seed)
    return {"input_ids": torch.randint(0, 32, (2, length), generator=g),
            "labels": torch.randint(0, 32, (2, length), generator=g)}


def _compile(model, **kw):
    layers = ["embed"] + [f"blocks.{i}" for i in range(4)] + ["head"]
    return dipc.compile(model, _batch(0), num_stages=2, layers=layers, **kw)


def _sent_names(pipe) -> list[str]:
    return [v for s in pipe.stages for v, p in s.input_values if pipe.stages[p].rank != s.rank]


def test_rope_tables_are_recomputed_not_sent():
    torch.manual_seed(0)
    pipe = _compile(_Chain())
    assert _sent_names(pipe) == ["blocks_1"]
    assert "input_ids" in pipe.stages[1].input_keys   # the recomputed tables read the positions' source
    plain = _compile(_Chain(), remat_glue=False)
    assert sorted(_sent_names(plain)) == ["blocks_1", "cos", "sin"]
    # the program's messages shrink accordingly: one tensor per activation message, not three
    recvs = [i for stream in pipe.plan([_batch(1), _batch(2)]).streams for i in stream if i.op is Op.RECV_ACT]
    assert recvs and all(len(i.specs) == 1 for i in recvs)


def test_hf_style_positions_send_a_length_and_read_the_device_locally():
    torch.manual_seed(0)
    pipe = _compile(_Chain(hf_positions=True))
    sent = _sent_names(pipe)
    assert "cos" not in sent and "sin" not in sent
    # the sequence length (a Python int of a tensor made on stage 0) travels as a scalar
    ints = [v for v, _ in pipe.stages[1].input_values if v != "blocks_1"]
    assert len(ints) == 1 and isinstance(pipe.captured.example_values[ints[0]], int)
    assert ".device" in pipe.stages[1].module.code


def test_values_with_gradients_still_travel():
    torch.manual_seed(0)
    pipe = _compile(_Chain(trainable_scale=True))
    sent = [v for v in _sent_names(pipe) if v != "blocks_1"]
    assert len(sent) == 1 and pipe.captured.example_values[sent[0]].requires_grad   # cos * scale
    assert "sin" not in sent                   # its gradient-free sibling is still recomputed


def test_same_rank_edges_are_not_recomputed():
    torch.manual_seed(0)
    layers = ["embed"] + [f"blocks.{i}" for i in range(4)] + ["head"]
    pipe = dipc.compile(_Chain(), _batch(0), num_stages=2, chunks=2, schedule="interleaved_1f1b", layers=layers)
    for s in pipe.stages:
        for v, p in s.input_values:
            if v in ("cos", "sin"):
                assert pipe.stages[p].rank == s.rank, f"stage {s.id} receives {v} from another rank"


@pytest.mark.parametrize("hf_positions", [False, True])
@pytest.mark.parametrize("schedule,chunks", [("1f1b", 1), ("interleaved_1f1b", 2), ("zb_h1", 1)])
def test_recomputed_glue_gradients_equal_reference(hf_positions, schedule, chunks):
    torch.manual_seed(0)
    model = _Chain(hf_positions=hf_positions, trainable_scale=True).double()
    mbs = [_batch(s, length=4 + s) for s in range(1, 5)]
    ref = copy.deepcopy(model)
    counts = [float((mb["labels"] != -100).sum()) for mb in mbs]
    for c, mb in zip(counts, mbs):
        (ref(**mb) * c / sum(counts)).backward()
    layers = ["embed"] + [f"blocks.{i}" for i in range(4)] + ["head"]
    pipe = dipc.compile(model, mbs[0], num_stages=2, chunks=chunks, schedule=schedule, layers=layers)
    pipe.step(mbs)
    for (n, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-9, atol=1e-12, msg=lambda m: f"{n}: {m}")
