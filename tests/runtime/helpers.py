"""Shared by the equivalence tests: batches with varied modality mixes and the reference step."""
from __future__ import annotations

import copy

import torch

import dipc
from examples.data import make_example

SCHEDULES = [("gpipe", 1), ("1f1b", 1), ("interleaved_1f1b", 2), ("zb_h1", 1), ("dual_queue", 1)]


def varied_microbatches(ex, n: int = 3) -> list[dict]:
    """Ordinary microbatches plus every edge case the data source knows (no images, one huge image...)."""
    mbs = ex.data.microbatches(n, 2)
    mbs += [ex.data.edge_case(name) for name in ex.data.EDGE_CASES]
    return mbs


_FLOAT64_EXAMPLES: dict = {}


def float64_example(name: str, seed: int):
    """An example model in float64 (exact gradient comparisons), built once per (name, seed)."""
    if (name, seed) not in _FLOAT64_EXAMPLES:
        ex = make_example(name, seed=seed)
        ex.model.double()
        _FLOAT64_EXAMPLES[(name, seed)] = ex
    return _FLOAT64_EXAMPLES[(name, seed)]


def float64_batch(ex, seed: int, sizes: list[int]) -> list[dict]:
    """Microbatches of ``sizes`` samples each from ``ex``'s data source reseeded with ``seed``, in float64."""
    data = type(ex.data)(ex.config, ex.data.dc, seed=seed)
    mbs = [data.microbatches(1, n)[0] for n in sizes]
    return [{k: v.double() if v.is_floating_point() else v for k, v in mb.items()} for mb in mbs]


def independent_weights(ex, microbatches) -> list[float]:
    """Full-batch mean: each microbatch's mean loss weighted by its share of the loss elements,
    computed from the example's own count, not from dipc."""
    counts = [ex.loss_weight(mb) for mb in microbatches]
    return [c / sum(counts) for c in counts]


def reference_grads(model: torch.nn.Module, microbatches, weights) -> dict[str, torch.Tensor]:
    """Single-process reference: one backward of sum_m w_m * loss_m on an untouched copy."""
    ref = copy.deepcopy(model)
    ref.zero_grad(set_to_none=True)
    for w, mb in zip(weights, microbatches):
        (ref(**mb) * w).backward()
    return {n: p.grad for n, p in ref.named_parameters() if p.grad is not None}


def build(name: str, dtype: torch.dtype, stages: int, schedule: str, chunks: int, seed: int = 0):
    ex = make_example(name, seed=seed)
    ex.model.to(dtype)
    mbs = [{k: v.to(dtype) if v.is_floating_point() else v for k, v in mb.items()} for mb in varied_microbatches(ex)]
    pipe = dipc.compile(ex.model, mbs[0], num_stages=stages, chunks=chunks, schedule=schedule,
                        loss_weight=ex.loss_weight)
    return ex, pipe, mbs


def step_matches_reference(ex, pipe, mbs, program, where: str):
    """One local ``pipe.step(mbs, program)`` from zero gradients; its float64 gradients must equal
    :func:`reference_grads` under :func:`independent_weights`. Returns the step's result."""
    want = reference_grads(ex.model, mbs, independent_weights(ex, mbs))
    ex.model.zero_grad(set_to_none=True)
    result = pipe.step(mbs, program)
    got = {n: p.grad for n, p in ex.model.named_parameters() if p.grad is not None}
    ex.model.zero_grad(set_to_none=True)
    assert_grads_equal(got, want, rtol=1e-9, atol=1e-12, where=where)
    return result


def assert_grads_equal(got: dict, want: dict, rtol: float, atol: float, where: str) -> None:
    assert set(got) == set(want), f"{where}: parameters with grads differ: {set(got) ^ set(want)}"
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=rtol, atol=atol, msg=lambda m: f"{where} {n}: {m}")


def distributed_recompute_grads(rank: int, world: int, plan: dict | None = None,
                                num_microbatches: int | None = None) -> tuple[float, dict]:
    """One gloo zb_h1 step of the float64 example VLM recomputing ``plan`` (``None``: every layer of
    every stage) on its first ``num_microbatches`` microbatches (``None``: all): the loss and this
    rank's parameter gradients, for :func:`reference_grads` (run under ``spawn``)."""
    from dipc.ir.recompute import with_recompute
    from dipc.runtime.distributed import run_step_distributed

    ex, pipe, mbs = build("vlm", torch.float64, world, "zb_h1", 1)
    mbs = mbs[:num_microbatches]
    plan = {s.id: s.layers for s in pipe.stages} if plan is None else plan
    result = run_step_distributed(pipe, mbs, with_recompute(pipe.plan(mbs), plan), timeout_s=60)
    owned = {id(p) for p in pipe.rank_parameters(rank)}
    return result.loss, {n: p.grad for n, p in ex.model.named_parameters() if id(p) in owned and p.grad is not None}
