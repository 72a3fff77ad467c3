"""SEMU's step model: per-instruction times and memory of a compiled pipeline from the symbolic
cost model, a device profile and tensor parallelism; and the paper checks built on it."""
from __future__ import annotations

import dataclasses
import itertools
import random
import time
from pathlib import Path

import pytest
import torch
from torch import fx

import dipc
from dipc.ir import Instruction, Op
from dipc.semu.costs import LengthStats, layer_cost_model
from dipc.semu.profiles import EfficiencyCurve, LinkProfile, load_preset
from dipc.semu.step_model import (StepModel, StepModelError, allreduce_time, batch_length_stats,
                                  best_contiguous_split, chain_program)
from dipc.semu.step_model import stats_for_layer as _lookup
from dipc.semu.symbolic import measure_attention_pairs
from examples.data import make_example
from tests.benchmark_loader import load_benchmark

ROOT = Path(__file__).resolve().parents[2]


def flat_cluster(latency: float = 1e-6, bandwidth: float = 1e11, memory_bandwidth: float | None = None):
    """H800 with efficiency 1 everywhere and no launch overhead: times are exactly FLOPs/peak
    (or bytes/bandwidth where that is larger)."""
    h800 = load_preset("h800")
    flat = {k: EfficiencyCurve(points=((1.0, 1.0),)) for k in h800.device.efficiency}
    dev = dataclasses.replace(h800.device, efficiency=flat, launch_overhead=0.0,
                              memory_bandwidth=memory_bandwidth or h800.device.memory_bandwidth)
    link = LinkProfile(latency=latency, bandwidth=bandwidth)
    return dataclasses.replace(h800, device=dev, intra_node=link, inter_node=link)


@pytest.fixture(scope="module")
def vlm():
    ex = make_example("vlm")
    batch = ex.collate(ex.data.samples(3))
    pipe = dipc.compile(ex.model, batch, num_stages=4)
    return ex, pipe, layer_cost_model(pipe.captured)


def test_compute_time_positive_and_scales_with_length(vlm):
    ex, pipe, cm = vlm
    mbs = ex.data.microbatches(4, 2)
    stats = [batch_length_stats(mb) for mb in mbs]
    sm = StepModel.for_pipeline(pipe, cm, load_preset("h800"), stats, tp=1)
    assert sm.layer_dtype(pipe.stages[0].layers[0]) == "float32"
    for s in range(4):
        for op in (Op.FWD, Op.BWD, Op.BWD_I, Op.BWD_W):
            assert sm.compute_time(Instruction(op=op, stage=s, mb=0)) > 0, (s, op)
        st = sm.stage_time(s, 0)
        assert sm.compute_time(Instruction(op=Op.BWD, stage=s, mb=0)) == pytest.approx(st.bwd_in + st.bwd_w)
        for op in (Op.LOAD, Op.OPTIM, Op.REDUCE):
            assert sm.compute_time(Instruction(op=op, stage=s, mb=0)) == 0.0
    dp = StepModel.for_pipeline(pipe, cm, load_preset("h800"), stats, dp=2)
    assert dp.compute_time(Instruction(op=Op.REDUCE, stage=0, mb=0)) > 0

    # longer sequences: every stage gets slower; with flat efficiency a matmul-only layer is linear
    b, t = mbs[0]["input_ids"].shape
    long = {"vision": LengthStats.of([4 * 16] * 6), "projector": LengthStats.of([4 * 16] * 6),
            "language_model": LengthStats.padded(b, 4 * t), "lm_head": LengthStats.padded(b, 4 * t)}
    short = {"vision": LengthStats.of([16] * 6), "projector": LengthStats.of([16] * 6),
             "language_model": LengthStats.padded(b, t), "lm_head": LengthStats.padded(b, t)}
    for cluster in (load_preset("h800"), flat_cluster()):
        sm2 = StepModel.for_pipeline(pipe, cm, cluster, [short, long])
        for s in range(4):
            for op in (Op.FWD, Op.BWD):
                a = sm2.compute_time(Instruction(op=op, stage=s, mb=0))
                z = sm2.compute_time(Instruction(op=op, stage=s, mb=1))
                assert z > a, (cluster.name, s, op)
    flat = StepModel.for_pipeline(pipe, cm, flat_cluster(memory_bandwidth=1e30), [short, long])
    t_short, t_long = flat.layer_time("lm_head", short["lm_head"]), flat.layer_time("lm_head", long["lm_head"])
    assert t_long.fwd == pytest.approx(4 * t_short.fwd)
    # attention makes the transformer block superlinear
    blk = "language_model.layers.0"
    assert (flat.layer_time(blk, long["language_model"]).compute
            > 4 * flat.layer_time(blk, short["language_model"]).compute)


def test_tensor_parallel_halves_compute_and_adds_ring_allreduces(vlm):
    ex, pipe, cm = vlm
    cluster = flat_cluster(latency=2e-6, bandwidth=5e10)
    stats = [batch_length_stats(ex.collate(ex.data.samples(2)))]
    one = StepModel.for_pipeline(pipe, cm, cluster, stats, tp=1)
    two = StepModel.for_pipeline(pipe, cm, cluster, stats, tp=2)
    four = StepModel.for_pipeline(pipe, cm, cluster, stats, tp=4)
    checked = 0
    for path in cm.layers:
        s = _lookup(stats[0], path)
        t1, t2, t4 = one.layer_time(path, s), two.layer_time(path, s), four.layer_time(path, s)
        for f in ("fwd", "bwd_in", "bwd_w"):
            assert getattr(t2, f) == pytest.approx(getattr(t1, f) / 2), (path, f)
            assert getattr(t4, f) == pytest.approx(getattr(t1, f) / 4), (path, f)
        assert t1.comm == 0.0
        n = two.num_allreduces(path)
        out = cm.cost(path, s).out_bytes
        assert t2.tp_fwd == pytest.approx(n * (2e-6 + 2 * (1 / 2) * out / 5e10))
        assert t4.tp_bwd == pytest.approx(n * (2e-6 + 2 * (3 / 4) * out / 5e10))
        checked += n > 0
    assert two.num_allreduces("language_model.layers.0") == 2      # attention + MLP
    assert two.num_allreduces("vision.patch_embed") == 0
    assert checked >= 8                                           # 4 ViT + 4 LM blocks
    assert allreduce_time(1e9, 1, cluster.intra_node) == 0.0


def test_memory_model_peak_of_1f1b_stage0_is_p_activations(vlm):
    ex, pipe, cm = vlm
    P, M = 4, 8
    mbs = ex.data.microbatches(M, 2)
    stats = batch_length_stats(mbs[0])
    for tp in (1, 2):
        sm = StepModel.for_pipeline(pipe, cm, load_preset("h800"), [stats] * M, tp=tp)
        res = sm.simulate(pipe.plan(mbs, schedule="1f1b"))
        for s in range(P):
            act = sm.activation_bytes(s, 0)
            assert act > 0 and sm.static_bytes(s) > 0
            in_flight = min(P - s, M)                               # 1F1B warmup depth of rank s
            # the peak is inside a backward with every warm-up stash alive: the first one makes the
            # stage's gradients as it goes, later ones find them made
            bwd = Instruction(op=Op.BWD, stage=s, mb=0)
            held = sm.static_bytes(s) + in_flight * act
            want = max(held - sm.grad_bytes(s) + sm.workspace_bytes(bwd, first=True),
                       held + sm.workspace_bytes(bwd))
            assert sm.workspace_bytes(bwd) > 0
            assert res.peak_memory[s] == pytest.approx(want, rel=1e-9), (tp, s)
        if tp == 2:
            assert sm.static_bytes(0) == pytest.approx(base_static / 2)
            assert sm.activation_bytes(0, 0) == pytest.approx(base_act / 2)
        base_static, base_act = sm.static_bytes(0), sm.activation_bytes(0, 0)
    c = sm.stage_cost(0, 0)
    assert c.param_bytes / 2 + c.grad_bytes / 2 + c.optim_bytes / 2 == pytest.approx(sm.static_bytes(0))


class _LayerInputs(fx.Interpreter):
    def __init__(self, gm, layers):
        super().__init__(gm)
        self.layers, self.seen = layers, {}

    def call_module(self, target, args, kwargs):
        if target in self.layers:
            self.seen[target] = (args, kwargs)
        return super().call_module(target, args, kwargs)


@pytest.mark.parametrize("name", ["vlm", "audio_llm", "t2v"])
def test_batch_length_stats_give_the_costs_of_the_concrete_layer_inputs(name):
    ex = make_example(name)
    rng = random.Random(5)
    pipe = dipc.compile(ex.model, ex.collate(ex.data.samples(3)), num_stages=2)
    cm = layer_cost_model(pipe.captured)
    gm = pipe.captured.graph_module
    for _ in range(5):
        batch = ex.collate(ex.data.samples(rng.randint(1, 4)))
        stats = batch_length_stats(batch, pipe.captured)
        interp = _LayerInputs(gm, set(pipe.captured.layers))
        interp.run(*[batch[k] for k in pipe.captured.input_keys])
        for path in cm.layers:
            args, kwargs = interp.seen[path]
            at = cm.cost_at(path, args, kwargs, pairs=measure_attention_pairs(gm.get_submodule(path), args, kwargs))
            assert cm.cost(path, _lookup(stats, path)) == at, path


def test_errors_name_the_problem(vlm):
    ex, pipe, cm = vlm
    with pytest.raises(StepModelError, match="language_model"):
        StepModel.for_pipeline(pipe, cm, load_preset("h800"), [{"vision": LengthStats.of([4])}]).stage_time(2, 0)
    with pytest.raises(StepModelError, match="not in the cost model"):
        StepModel(cm, load_preset("h800"), [["nope"]], [LengthStats.of([4])])
    with pytest.raises(StepModelError, match="microbatch 3"):
        StepModel.for_pipeline(pipe, cm, load_preset("h800"), [LengthStats.of([4])]).stage_time(0, 3)
    with pytest.raises(StepModelError, match="batch keys.*length_stats="):
        batch_length_stats({"x": None})


def test_best_contiguous_split_is_optimal():
    assert best_contiguous_split([1, 1, 1, 1, 2, 2], 3) == [3, 2, 1]
    rng = random.Random(0)
    for _ in range(30):
        n, k = rng.randint(3, 9), rng.randint(1, 4)
        k = min(k, n)
        times = [rng.choice([1.0, 1.5, 2.0, 3.5]) for _ in range(n)]
        sizes = best_contiguous_split(times, k)
        assert sum(sizes) == n and len(sizes) == k and min(sizes) >= 1

        def stages(cuts):
            b = [0, *cuts, n]
            return [sum(times[x:y]) for x, y in zip(b[:-1], b[1:])]
        best = min((max(stages(c)), -min(stages(c))) for c in itertools.combinations(range(1, n), k - 1))
        got = stages(list(itertools.accumulate(sizes))[:-1])
        assert (max(got), -min(got)) == pytest.approx(best)


def test_chain_program_messages_follow_the_last_layer(vlm):
    ex, pipe, cm = vlm
    stats = batch_length_stats(ex.collate(ex.data.samples(2)))
    layers = [pipe.stages[0].layers, pipe.stages[1].layers]
    sm = StepModel(cm, load_preset("h800"), layers, [stats] * 3, tp=2, dtype="float32")
    prog = chain_program(sm, 3, message_dtype="float32")
    recv = [i for i in prog.streams[1] if i.op is Op.RECV_ACT]
    out = cm.cost(layers[0][-1], _lookup(stats, layers[0][-1])).out_bytes
    assert len(recv) == 3 and recv[0].specs[0].numel * 4 == pytest.approx(out / 2, abs=4)
    assert sm.simulate(prog).step_time > 0


def test_simulate_uses_the_p2p_model_the_profile_was_fitted_under(vlm):
    # a slow link: gloo's handshake (the receive's notice crosses it first) shows in the step time
    ex, pipe, cm = vlm
    stats = batch_length_stats(ex.collate(ex.data.samples(2)))
    layers = [pipe.stages[0].layers, pipe.stages[1].layers]
    eager = flat_cluster(latency=5e-3)
    gloo = dataclasses.replace(eager, p2p="handshake", recv_lookahead=3)
    prog = chain_program(StepModel(cm, eager, layers, [stats] * 4, dtype="float32"), 4, schedule="1f1b",
                         message_dtype="float32")
    on = {c.p2p: StepModel(cm, c, layers, [stats] * 4, dtype="float32") for c in (eager, gloo)}
    assert on["handshake"].simulate(prog).step_time == pytest.approx(
        on["eager"].simulate(prog, p2p="handshake", recv_lookahead=3).step_time)
    assert on["handshake"].simulate(prog).step_time > on["eager"].simulate(prog).step_time
    assert on["handshake"].simulate(prog, p2p="eager", recv_lookahead=0).step_time == pytest.approx(
        on["eager"].simulate(prog).step_time)   # an explicit model wins


def test_paper_checks_run_fast_and_land_near_the_paper():
    pc = load_benchmark("paper_checks")
    t0 = time.perf_counter()
    vlm = pc.vlm37b_semu()
    t2v = pc.t2v_check()
    assert time.perf_counter() - t0 < 30
    # the paper: 6.75 / 10.5 ms per layer, stages 63-73.5 ms, 22.8% bubble, T2V ratio 4.15x
    assert 4.0 < vlm["vit_layer_ms"] < 9.0 and 8.0 < vlm["lm_layer_ms"] < 14.0
    assert 55 < vlm["stage_min_ms"] <= vlm["stage_max_ms"] < 85
    assert sum(vlm["split_layers"]) == 128 and len(vlm["split_layers"]) == 16
    assert 0.15 < vlm["bubble"] < 0.30
    assert vlm["bubble"] >= vlm["bubble_balanced"] - 1e-9
    assert 2.0 < t2v["ratio"] < 10.0
    assert all(len(b) <= 8 and sum(c[0] for c in b) <= 16 for b in pc.pack_t2v_batches())


def test_length_stats_need_no_example_code_and_honour_a_user_hook():
    """dipc reads the audio front-end's downsampling off the captured model (it used to import the
    example model's config), and a pipeline's ``length_stats`` hook replaces the built-in layouts."""
    import ast

    for module in ("step_model.py", "length_stats.py"):
        src = (ROOT / "dipc" / "semu" / module).read_text()
        imported = {n.module for n in ast.walk(ast.parse(src)) if isinstance(n, ast.ImportFrom)}
        imported |= {a.name for n in ast.walk(ast.parse(src)) if isinstance(n, ast.Import) for a in n.names}
        assert not any(m and m.startswith("examples") for m in imported), module

    ex = make_example("audio_llm")
    mbs = ex.data.microbatches(2, 2)
    pipe = dipc.compile(ex.model, mbs[0], num_stages=2)
    stats = batch_length_stats(mbs[1], pipe.captured)
    n, _, frames = mbs[1]["input_features"].shape
    assert stats["audio.frontend"] == LengthStats.padded(n, frames)
    assert stats["audio"] == LengthStats.padded(n, frames // 4)      # AudioLLMConfig.downsample
    with pytest.raises(StepModelError, match="captured"):
        batch_length_stats(mbs[1])

    from dipc.semu.compare import step_model
    from dipc.semu.step_model import pipeline_length_stats

    seen = []

    def hook(batch):
        seen.append(batch)
        return LengthStats.padded(1, 7)

    custom = dipc.compile(ex.model, mbs[0], num_stages=2, length_stats=hook)
    assert pipeline_length_stats(custom, mbs[1]) == LengthStats.padded(1, 7) and seen[-1] is mbs[1]
    assert step_model(custom, mbs).microbatch_stats == [LengthStats.padded(1, 7)] * 2
    assert pipeline_length_stats(pipe, mbs[1]) == stats


def test_a_text_only_lm_needs_no_length_stats_hook():
    """The commonest batch, ``input_ids``/``labels`` of a text LM, is understood without a hook:
    every layer costs as at its concrete inputs, and ``schedule="dip"`` plans it."""
    from dipc.ir.validate import validate

    bench = load_benchmark("runtime_vs_torch_pipelining")
    model = bench.TinyLlama(64, 32, 4, 4, 2, 64)
    ids = torch.randint(0, 64, (2, 12))
    layers = ["embed_tokens"] + [f"layers.{i}" for i in range(4)] + ["norm", "lm_head"]
    pipe = dipc.compile(model, {"input_ids": ids, "labels": ids}, num_stages=2, layers=layers, schedule="dip",
                        profile="h800")
    cm = layer_cost_model(pipe.captured)
    batch = {"input_ids": torch.randint(0, 64, (3, 20)), "labels": torch.randint(0, 64, (3, 20))}
    stats = batch_length_stats(batch, pipe.captured)
    interp = _LayerInputs(pipe.captured.graph_module, set(pipe.captured.layers))
    interp.run(*[batch[k] for k in pipe.captured.input_keys])
    for path in cm.layers:
        args, kwargs = interp.seen[path]
        gm = pipe.captured.graph_module
        assert cm.cost(path, _lookup(stats, path)) == cm.cost_at(
            path, args, kwargs, pairs=measure_attention_pairs(gm.get_submodule(path), args, kwargs)), path
    validate(pipe.plan([batch, {k: v[:, :7] for k, v in batch.items()}]))
    with pytest.raises(StepModelError, match="batch keys"):   # another key: the layout is not known
        batch_length_stats({**batch, "pixel_values": torch.zeros(1)})
