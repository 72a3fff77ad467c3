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


# -- property: random glue recipes ---------------------------------------------------------------
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_GLUE_OPS = {
    "sin": lambda g, buf: g.sin(),
    "cos": lambda g, buf: torch.cos(g),
    "scale": lambda g, buf: g * buf,                       # a buffer (get_attr)
    "shift": lambda g, buf: g + 0.5,
    "square": lambda g, buf: g.pow(2),
    "cat_half": lambda g, buf: torch.cat([g[..., : g.shape[-1] // 2], g[..., g.shape[-1] // 2:]], dim=-1),
    "where": lambda g, buf: torch.where(g > 0, g, -g),
}


class _GlueChain(nn.Module):
    """Linear blocks ``h = block(h) + glue`` where ``glue`` is a random chain of cheap ops on
    positions (from the ids, or HF-style from the hidden state's shape and device); optionally one
    block also reads ``glue * weight`` (a trainable scale: that value must travel)."""

    def __init__(self, recipe: list[str], hf_positions: bool, scaled_block: int | None, blocks: int = 4):
        super().__init__()
        self.embed = nn.Embedding(16, 8)
        self.blocks = nn.ModuleList(nn.Linear(8, 8) for _ in range(blocks))
        self.head = nn.Linear(8, 16)
        self.register_buffer("freq", torch.linspace(0.1, 1.0, 8), persistent=False)
        self.weight = nn.Parameter(torch.full((8,), 0.5)) if scaled_block is not None else None
        self.recipe, self.hf_positions, self.scaled_block = recipe, hf_positions, scaled_block

    def forward(self, input_ids, labels):
        h = self.embed(input_ids)
        src = h if self.hf_positions else input_ids
        g = torch.arange(src.shape[1], device=src.device).unsqueeze(-1).float() * self.freq
        for op in self.recipe:
            g = _GLUE_OPS[op](g, self.freq)
        scaled = g * self.weight if self.weight is not None else None
        for k, block in enumerate(self.blocks):
            h = torch.tanh(block(h)) + (scaled if k == self.scaled_block else g)
        return F.cross_entropy(self.head(h).flatten(0, 1), labels.flatten())


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(recipe=st.lists(st.sampled_from(sorted(_GLUE_OPS)), max_size=5),
       hf_positions=st.booleans(),
       scaled_block=st.one_of(st.none(), st.integers(0, 3)),
       sched=st.sampled_from([("1f1b", 2, 1), ("gpipe", 4, 1), ("interleaved_1f1b", 2, 2), ("zb_h1", 3, 1)]),
       lengths=st.lists(st.integers(2, 7), min_size=1, max_size=4))
def test_random_glue_is_recomputed_or_sent_and_gradients_match(recipe, hf_positions, scaled_block, sched, lengths):
    schedule, stages, chunks = sched
    torch.manual_seed(0)
    model = _GlueChain(recipe, hf_positions, scaled_block).double()
    g = torch.Generator().manual_seed(len(recipe))
    mbs = [{"input_ids": torch.randint(0, 16, (2, n), generator=g), "labels": torch.randint(0, 16, (2, n), generator=g)}
           for n in lengths]
    layers = ["embed"] + [f"blocks.{i}" for i in range(4)] + ["head"]
    pipe = dipc.compile(model, mbs[0], num_stages=stages, chunks=chunks, schedule=schedule, layers=layers)
    values = pipe.captured.example_values
    for s in pipe.stages:   # across ranks travel only layer outputs, values with gradients and scalars
        for v, p in s.input_values:
            if pipe.stages[p].rank == s.rank:
                continue
            value = values[v]
            assert (v.startswith("blocks_") or v == "embed" or isinstance(value, int)
                    or (isinstance(value, torch.Tensor) and value.requires_grad)), f"stage {s.id} receives {v}"
    ref = copy.deepcopy(model)
    counts = [float(mb["labels"].numel()) for mb in mbs]
    for c, mb in zip(counts, mbs):
        (ref(**mb) * c / sum(counts)).backward()
    pipe.step(mbs)
    for (n, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
        if q.grad is None:
            assert p.grad is None or not p.grad.any(), n
            continue
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-9, atol=1e-12, msg=lambda m: f"{n}: {m}")


class _CostlyGlue(nn.Module):
    """Glue from positions that is not cheap (pairwise distances: O(T^2 d)) or not reproducible
    (uninitialised memory) must travel, not be recomputed."""

    def __init__(self, kind: str):
        super().__init__()
        self.blocks = nn.ModuleList(nn.Linear(4, 4) for _ in range(2))
        self.kind = kind

    def forward(self, x, labels):
        pos = torch.arange(x.shape[0], dtype=x.dtype).unsqueeze(-1)
        if self.kind == "cdist":
            glue = torch.cdist(pos, pos).sum(-1, keepdim=True)
        else:
            glue = torch.empty_like(pos).zero_() if self.kind == "empty_inplace" else torch.empty_like(pos) * 0
        h = self.blocks[0](x + glue)                  # read in stage 0 ...
        return F.mse_loss(self.blocks[1](h + glue), labels)   # ... and in stage 1


@pytest.mark.parametrize("kind", ["cdist", "empty", "empty_inplace"])
def test_costly_or_unreproducible_glue_travels(kind):
    pipe = dipc.compile(_CostlyGlue(kind), {"x": torch.randn(3, 4), "labels": torch.randn(3, 4)}, num_stages=2)
    assert len(pipe.stages[1].input_values) == 2, pipe.stages[1].input_values   # blocks_0 and the glue
