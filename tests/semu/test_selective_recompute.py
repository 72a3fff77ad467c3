"""Selective checkpointing in SEMU (``<layer>~sel``): the traced stash equals what torch's selective
checkpointing really keeps, phase 3 ranks it before full recomputation, its two accountings (the
ILP's candidate vectors and the emulator's memory/time model) agree, and it fits a limit faster
than whole-layer recomputation."""
import functools
import random

import pytest
import sympy
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from dipc.ir.recompute import SELECTIVE_SAVED_OPS, recompute_plan, selective, split_entry
from dipc.runtime.measure import LiveMemory
from dipc.semu.memory_opt import Phase3Tables, optimize_memory, stage_candidates
from dipc.semu.recompute_costs import (Footprint, forward_extra_seconds, recompute_seconds, stash_bytes,
                                      workspace_bytes)
from dipc.semu.symbolic import trace_layer
from examples.models.layers import EncoderBlock, LlamaBlock, RotaryEmbedding

from tests.semu.test_memory_opt import MiB, RandomCosts, chain

# ------------------------------------------------------------------------------------------------
# the symbolic trace against torch's selective checkpointing


def _policy(ctx, func, *args, **kwargs):
    return (CheckpointPolicy.MUST_SAVE if func.overloadpacket.__name__ in SELECTIVE_SAVED_OPS
            else CheckpointPolicy.PREFER_RECOMPUTE)


def _stash_after_forward(layer, args, mode: str) -> float:
    """Bytes a forward leaves allocated besides its output (the inputs existed before)."""
    mem = LiveMemory(1)
    with mem:
        if mode == "none":
            out = layer(*args)
        else:
            out = checkpoint(layer, *args, use_reentrant=False,
                             context_fn=functools.partial(create_selective_checkpoint_contexts, _policy))
    stash = mem.live[0] - out.untyped_storage().nbytes()
    out.sum().backward()     # the recomputation runs (and must work)
    return stash


def _llama():
    torch.manual_seed(0)
    x = torch.randn(2, 48, 64, requires_grad=True)
    cos, sin = RotaryEmbedding(16)(torch.arange(48)[None].expand(2, 48))
    return LlamaBlock(64, 4, 2, 172), (x, cos, sin)


def _encoder():
    torch.manual_seed(0)
    return EncoderBlock(64, 4, 256), (torch.randn(2, 40, 64, requires_grad=True),)


@pytest.mark.parametrize("make", [_llama, _encoder], ids=["llama_block", "encoder_block"])
def test_traced_selective_stash_is_what_torch_keeps(make):
    layer, args = make()
    local = trace_layer(layer, args)
    at = dict(zip(local.dim_symbols, local.example_dims))
    e = {k: float(sympy.sympify(v).subs(at)) for k, v in local.exprs.items()}
    # the traced stash counts the layer's stream input (checkpointing keeps a reference to it)
    measured = _stash_after_forward(layer, args, "selective") + e["in_bytes"]
    assert e["sel_act_bytes"] == pytest.approx(measured, rel=0.02)
    assert e["in_bytes"] < e["sel_act_bytes"] < 0.8 * e["act_bytes"]   # frees a real share, not all
    assert 0 < e["sel_rerun_bytes"] < e["fwd_bytes"]
    assert 0 < local.ops["sel_fwd"] < local.ops["fwd"]
    # and plain autograd keeps more than selective checkpointing does
    assert _stash_after_forward(layer, args, "none") > measured - e["in_bytes"]


# ------------------------------------------------------------------------------------------------
# phase 3's candidates and accounting


def _fp(act, inp, secs, sel=0.0, sel_secs=0.0, sel_fwd=0.0):
    return Footprint(act * MiB, inp * MiB, secs, sel * MiB, sel_secs, sel_fwd)


def _costs(footprints: dict[str, Footprint], mbs: int = 2) -> RandomCosts:
    layers = list(footprints)
    return RandomCosts([layers], [0.0], {(0, m, p): f for m in range(mbs) for p, f in footprints.items()})


def test_selective_ranks_before_full_and_full_follows_it():
    costs = _costs({"a": _fp(10, 1, 1.0, sel=4, sel_secs=0.05),   # to selective: 120 MiB/s, then 3.2 MiB/s
                    "b": _fp(10, 2, 0.1),                          # no selective choice: 80 MiB/s
                    "c": _fp(10, 1, 0.2, sel=9, sel_secs=1.0)})    # selective slower than full: full only, 45 MiB/s
    assert stage_candidates(costs, 0, 2) == [(), ("a~sel",), ("a~sel", "b"), ("a~sel", "b", "c"), ("a", "b", "c")]
    assert stage_candidates(costs, 0, 2, selective=False) == [(), ("b",), ("b", "c"), ("a", "b", "c")]


def _random_selective_costs(seed: int, layers: int, mbs: int) -> RandomCosts:
    rng = random.Random(seed)
    table = {}
    paths = [f"l{i}" for i in range(layers)]
    for p in paths:
        act = rng.uniform(1, 100)
        inp = act * rng.uniform(0.05, 1.2)
        sel = act * rng.uniform(0.2, 1.1) if rng.random() < 0.8 else 0.0
        secs, sel_secs, sel_fwd = rng.uniform(1e-4, 1e-2), rng.uniform(1e-6, 1e-3), rng.uniform(0, 1e-3)
        for m in range(mbs):
            k = rng.uniform(0.5, 2.0)
            table[(0, m, p)] = _fp(act * k, inp * k, secs * k, sel * k, sel_secs * k, sel_fwd * k)
    return RandomCosts([paths], [0.0], table)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), layers=st.integers(1, 6), mbs=st.integers(1, 3))
def test_candidate_vectors_agree_with_the_memory_model(seed, layers, mbs):
    """The ILP's per-candidate stash, workspace, re-run and forward seconds are the emulator's numbers."""
    costs = _random_selective_costs(seed, layers, mbs)
    tables = Phase3Tables(costs, mbs)
    cands = tables.candidates(0)
    for m in range(mbs):
        stash, work, secs, fwd = tables.vectors(0, m)
        for k, cand in enumerate(cands):
            units = frozenset(cand)
            assert fwd[k] == pytest.approx(forward_extra_seconds(costs, 0, m, units), rel=1e-9, abs=1e-15)
            assert stash[k] * MiB == pytest.approx(stash_bytes(costs, 0, m, units), rel=1e-9)
            assert work[k] * MiB == pytest.approx(workspace_bytes(costs, 0, m, units), rel=1e-9, abs=1e-6)
            assert secs[k] == pytest.approx(recompute_seconds(costs, 0, m, units), rel=1e-9, abs=1e-15)
    # each candidate frees at least what the one before it freed, and no layer is named twice
    stashes = [sum(stash_bytes(costs, 0, m, frozenset(c)) for m in range(mbs)) for c in cands]
    assert all(b <= a * (1 + 1e-12) for a, b in zip(stashes, stashes[1:]))
    for c in cands:
        paths = [split_entry(e)[0] for e in c]
        assert len(paths) == len(set(paths))


def test_fitting_a_limit_with_selective_costs_less_time_than_whole_layers():
    """A pipeline whose memory is over its limit: phase 3 fits it either way, and the plan that
    may checkpoint selectively adds less re-run time, while the emulator's peak stays in bounds."""
    rng = random.Random(3)
    num_ranks, mbs, layers = 2, 4, 4
    program = chain(num_ranks, 1, mbs, "1f1b")
    stage_layers = [[f"s{s}.l{i}" for i in range(layers)] for s in range(num_ranks)]
    table = {}
    for s, paths in enumerate(stage_layers):
        for p in paths:
            for m in range(mbs):
                # a transformer block's shape: selective frees ~45% for 5% of the forward
                table[(s, m, p)] = _fp(20, 1, 2e-3, sel=11, sel_secs=1e-4 * rng.uniform(0.8, 1.2))
    costs = RandomCosts(stage_layers, [0.0, 0.0], table)
    unfitted = costs.simulate(program)
    limit = 0.7 * max(unfitted.peak_memory)
    both = optimize_memory(program, costs, limit)
    whole = optimize_memory(program, costs, limit, selective=False)
    for plan in (both, whole):
        assert max(costs.simulate(plan.program).peak_memory) <= limit * (1 + 1e-9)
    entries = {e for layers_ in recompute_plan(both.program).values() for e in layers_}
    assert any(split_entry(e)[1] for e in entries) and selective("s0.l0").endswith("~sel")
    assert not any(split_entry(e)[1] for layers_ in recompute_plan(whole.program).values() for e in layers_)
    assert sum(both.added_seconds) < 0.5 * sum(whole.added_seconds)


def test_split_backward_stages_recompute_whole_layers_only():
    """torch's selective checkpointing allows one backward per forward; the zero-bubble split
    re-runs checkpointed layers twice (BWD_I, BWD_W) where the stage takes input gradients, so
    those stages get whole-layer choices (stage 0's BWD_I runs no graph task: it may)."""
    num_ranks, mbs = 2, 4
    stage_layers = [[f"s{s}.l{i}" for i in range(3)] for s in range(num_ranks)]
    table = {(s, m, p): _fp(20, 1, 2e-3, sel=11, sel_secs=1e-4)
             for s, paths in enumerate(stage_layers) for p in paths for m in range(mbs)}
    costs = RandomCosts(stage_layers, [0.0, 0.0], table)
    tables = Phase3Tables(costs, mbs)          # shared by both programs, as a planner shares it
    for schedule, allowed in (("zb_h1", False), ("1f1b", True)):
        program = chain(num_ranks, 1, mbs, schedule)
        limit = [0.7 * peak for peak in costs.simulate(program).peak_memory]   # every rank must recompute
        fitted = optimize_memory(program, costs, limit, tables=tables)
        assert all(p <= lim * (1 + 1e-9) for p, lim in zip(costs.simulate(fitted.program).peak_memory, limit))
        plan = recompute_plan(fitted.program)
        stage1 = [e for key, layers in plan.items() if (key if isinstance(key, int) else key[0]) == 1 for e in layers]
        assert stage1 and any(split_entry(e)[1] for e in stage1) == allowed, (schedule, plan)


def test_costly_selective_dispatch_makes_phase_3_recompute_whole_layers():
    """Where torch's dispatch modes cost more than they save (small layers on one CPU thread),
    the ranking puts full recomputation first: selective's forward extra counts against it."""
    cheap = _costs({"a": _fp(10, 1, 1.0, sel=4, sel_secs=0.05)})
    costly = _costs({"a": _fp(10, 1, 1.0, sel=4, sel_secs=0.05, sel_fwd=2.0)})
    assert stage_candidates(cheap, 0, 2) == [(), ("a~sel",), ("a",)]
    assert stage_candidates(costly, 0, 2) == [(), ("a",)]
    # a layer whose selective stash is its input (a norm: nothing kept) takes the faster of the two
    norm = {"n": _fp(4, 1, 0.1, sel=1, sel_secs=0.05)}
    assert stage_candidates(_costs(norm), 0, 2) == [(), ("n~sel",)]
    norm["n"] = _fp(4, 1, 0.1, sel=1, sel_secs=0.05, sel_fwd=0.1)
    assert stage_candidates(_costs(norm), 0, 2) == [(), ("n",)]


def test_full_rerun_charges_checkpointing_per_forward_op(vlm_2stage):
    """A fully recomputed layer's re-run costs its forward plus the profile's ckpt_op_overhead
    per forward op of the layer (what torch's checkpointing adds on a CPU thread); the layer's
    stash and selective costs do not change."""
    import dataclasses

    from dipc.semu.compare import step_model
    from dipc.semu.profiles import load_preset

    ex, pipe, cm = vlm_2stage
    mbs = ex.data.microbatches(2, 2)
    base = load_preset("h800")
    costly = dataclasses.replace(base, device=dataclasses.replace(base.device, ckpt_op_overhead=1e-3))
    plain, charged = step_model(pipe, mbs, base), step_model(pipe, mbs, costly)
    layers = pipe.stages[1].layers
    for path in layers:
        a, b = plain.layer_footprint(1, 0, path), charged.layer_footprint(1, 0, path)
        ops = plain.cost_model.expr(path).local.ops.get("fwd", 0)
        assert b.fwd_seconds == pytest.approx(a.fwd_seconds + ops * 1e-3)
        assert (b.act_bytes, b.in_bytes, b.sel_seconds) == (a.act_bytes, a.in_bytes, a.sel_seconds)
    assert any(plain.cost_model.expr(p).local.ops.get("fwd", 0) > 0 for p in layers)
    rerun = frozenset(layers)
    assert recompute_seconds(charged, 1, 0, rerun) > recompute_seconds(plain, 1, 0, rerun) + 1e-3
