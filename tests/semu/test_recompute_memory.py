"""SEMU's memory for programs that recompute layers, against what the runtime allocates.

A re-run layer's rebuilt activations exist while that layer's backward runs, after the layers
above it have freed their stashes; charging the largest re-run on top of the loss head's peak
(the model before) over-predicted the loss rank by 16-19%. These tests pin the layer walk: its
per-candidate form (what phase 3's ILP reads) equals the emulator's per-instruction one, and on
the example VLM the predicted peaks of fitted programs match the measured ones within 10%."""
import dataclasses

import numpy as np
import pytest
import torch

import dipc
from dipc.ir import Op
from dipc.ir.recompute import expand_recompute, recompute_plan
from dipc.runtime.measure import measured_peak_memory
from dipc.semu.compare import step_model
from dipc.semu.memory_opt import Phase3Tables, optimize_memory
from dipc.semu.profiles import load_profile
from dipc.semu.recompute_costs import recomputes_in
from dipc.semu.step_model import first_weight_backwards
from examples.data import make_example

RANKS, MICROBATCHES, SAMPLES = 2, 4, 2


@pytest.fixture(scope="module")
def vlm():
    torch.manual_seed(0)
    ex = make_example("vlm", seed=0)
    mbs = ex.data.microbatches(MICROBATCHES, SAMPLES)
    pipe = dipc.compile(ex.model, mbs[0], num_stages=RANKS, schedule="1f1b", loss_weight=ex.loss_weight,
                        optimizer=lambda ps: torch.optim.Adam(ps, lr=1e-4))
    plain = pipe.plan(mbs)
    pipe.step(mbs, plain)      # Adam's states exist, as the static bytes assume
    # a CPU-like device: masked attention materialises its probabilities, as torch's CPU kernel does
    cluster = load_profile("h800")
    cluster = dataclasses.replace(cluster, device=dataclasses.replace(cluster.device, dense_masked_attention=True))
    return pipe, mbs, plain, step_model(pipe, mbs, cluster)


def _fitted(pipe, plain, model, fraction: float):
    static = [sum(model.static_bytes(s.id) for s in pipe.stages if s.rank == r) for r in range(RANKS)]
    peak = model.simulate(plain, record=False).peak_memory
    limit = [st + fraction * (pk - st) for st, pk in zip(static, peak)]
    return optimize_memory(plain, model, limit, selective=False)


@pytest.mark.parametrize("fraction", [0.8, 0.6])
def test_predicted_peaks_of_recomputed_plans_match_measured(vlm, fraction):
    pipe, mbs, plain, model = vlm
    fitted = _fitted(pipe, plain, model, fraction)
    assert recompute_plan(fitted.program), "the limit should force some recomputation"
    measured = measured_peak_memory(pipe, mbs, fitted.program)
    errors = [p / m - 1 for p, m in zip(fitted.peak_memory, measured)]
    assert max(map(abs, errors)) <= 0.10, f"predicted / measured - 1 per rank: {errors}"


def test_candidate_workspaces_equal_the_emulators_per_instruction_walk(vlm):
    pipe, _, plain, model = vlm
    program = _fitted(pipe, plain, model, 0.6).program
    tables = Phase3Tables(model, program.num_microbatches, selective=False)
    units = expand_recompute(recompute_plan(program), program.num_microbatches)
    firsts = first_weight_backwards(program)
    checked = 0
    for stream in program.streams:
        for ins in stream:
            if ins.op not in (Op.BWD, Op.BWD_I, Op.BWD_W):
                continue
            first, reruns = (ins.stage, ins.mb, ins.sub) in firsts, recomputes_in(ins, program)
            walked = tables.workspaces(ins, first, reruns, selective=False)
            for j, cand in enumerate(tables.candidates(ins.stage, False)):
                layers = frozenset(cand)
                one = model.workspace_bytes(ins, first=first, rewalk=bool(layers),
                                            recompute=layers if reruns else frozenset())
                assert walked[j] * 2**20 == pytest.approx(one, rel=1e-9, abs=1e-3)
                checked += 1
            chosen = units.get((ins.stage, ins.mb), frozenset())
            assert chosen in {frozenset(c) for c in tables.candidates(ins.stage, False)}
    assert checked > 0


def test_rerun_is_charged_at_its_layer_not_on_the_loss_heads_peak(vlm):
    """On the loss stage, recomputing the first layer must not raise the backward's workspace above
    the loss head's (the layers after it have freed more than its re-run rebuilds)."""
    pipe, _, plain, model = vlm
    loss_stage = max(model.loss_stages)
    first_layer = next(p for p in model.stage_layers[loss_stage] if model.layer_footprint(loss_stage, 1, p).saved_bytes > 0)
    bwd = next(i for i in plain.streams[pipe.stages[loss_stage].rank] if i.op is Op.BWD and i.stage == loss_stage
               and i.mb == 1)
    plain_ws = model.workspace_bytes(bwd)
    rerun = model.layer_footprint(loss_stage, 1, first_layer).workspace(2)
    assert rerun > 0.5 * plain_ws        # big enough that adding it would show
    assert model.workspace_bytes(bwd, rewalk=True, recompute=frozenset({first_layer})) == pytest.approx(plain_ws)
    full, sel = model._mode_masks(loss_stage, [frozenset(), frozenset({first_layer})])
    both = model.workspace_choices(bwd, False, full, sel, np.array([False, True]), True)
    assert both[1] == pytest.approx(both[0])
