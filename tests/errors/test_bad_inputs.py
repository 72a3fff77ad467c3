"""Bad input gets a clear error that names the culprit and says how to fix it."""
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dipc
from dipc.errors import BatchError, DipcError, InfeasibleMemoryError, PartitionError, ScheduleError, TraceError
from dipc.semu.memory_opt import MemoryLimitError
from examples.data import make_example


class _Router(nn.Module):
    """Glue with data-dependent control flow (no parameters, so it is traced through)."""

    def forward(self, x):
        if x.sum() > 0:
            return x * 2
        return x


class _RoutedModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(16, 8)
        self.blocks = nn.ModuleList(nn.Linear(8, 8) for _ in range(3))
        self.router = _Router()
        self.head = nn.Linear(8, 16)

    def forward(self, input_ids, labels):
        h = self.embed(input_ids)
        for b in self.blocks:
            h = b(h)
        h = self.router(h)
        return F.cross_entropy(self.head(h).flatten(0, 1), labels.flatten())


def _routed_batch():
    ids = torch.randint(0, 16, (2, 5))
    return {"input_ids": ids, "labels": ids}


def _vlm():
    ex = make_example("vlm")
    return ex, ex.data.microbatches(2, 2)


def test_untraceable_module_names_module_and_leaf_fix():
    with pytest.raises(TraceError, match=r"'router'.*leaf_modules=\['router'\]"):
        dipc.compile(_RoutedModel(), _routed_batch(), num_stages=2)
    pipe = dipc.compile(_RoutedModel(), _routed_batch(), num_stages=2, leaf_modules=["router"])
    pipe.step([_routed_batch(), _routed_batch()])


def test_missing_batch_key_names_key():
    ex, mbs = _vlm()
    pipe = dipc.compile(ex.model, mbs[0], num_stages=2, loss_weight=ex.loss_weight)
    bad = dict(mbs[1])
    del bad["pixel_values"]
    with pytest.raises(BatchError, match=r"microbatch 1 lacks batch key 'pixel_values'.*Fix:"):
        pipe.plan([mbs[0], bad])


CASES = [
    ("more stages than layers", lambda ex, mb: dipc.compile(ex.model, mb, num_stages=64),
     PartitionError, r"64 stages .* only \d+ layers.*Fix:"),
    ("unknown schedule", lambda ex, mb: dipc.compile(ex.model, mb, schedule="2f2b"),
     ScheduleError, r"2f2b.*Fix: use one of"),
    ("1f1b with virtual stages", lambda ex, mb: dipc.compile(ex.model, mb, schedule="1f1b", chunks=2),
     ScheduleError, r"chunks=2.*Fix:.*interleaved_1f1b"),
    ("unknown batch key", lambda ex, mb: dipc.compile(ex.model, {**mb, "pixels": mb["pixel_values"]}),
     BatchError, r"\['pixels'\] are not arguments.*Fix:"),
    ("missing forward argument", lambda ex, mb: dipc.compile(ex.model, {k: v for k, v in mb.items() if k != "labels"}),
     BatchError, r"requires argument 'labels'.*Fix:"),
    ("unknown leaf module", lambda ex, mb: dipc.compile(ex.model, mb, leaf_modules=["vision.nope"]),
     TraceError, r"'vision.nope' does not exist.*Fix:"),
    ("no microbatches", lambda ex, mb: dipc.compile(ex.model, mb).plan([]),
     BatchError, r"no microbatches.*Fix:"),
    ("memory limit nothing fits", lambda ex, mb: dipc.compile(ex.model, mb).plan([mb, mb], memory_limit=2**20),
     InfeasibleMemoryError, r"rank \d: needs .* MiB parameters/gradients/optimizer .* over its 1.00 MiB limit.*Fix:"),
    ("memory limit per rank of the wrong length",
     lambda ex, mb: dipc.compile(ex.model, mb).plan([mb], memory_limit=[1e9]),
     MemoryLimitError, r"memory_limit=\[1000000000.0\] for 2 ranks.*Fix:"),
    ("recompute plan naming a foreign layer",
     lambda ex, mb: _step_with_plan(dipc.compile(ex.model, mb), [mb], {0: ["lm_head"]}),
     ScheduleError, r"recomputes \['lm_head'\] in stage 0.*Fix:"),
]


def _step_with_plan(pipe, mbs, plan):
    from dipc.ir.recompute import with_recompute

    return pipe.step(mbs, with_recompute(pipe.plan(mbs), plan))


@pytest.mark.parametrize("what,call,exc,pattern", CASES, ids=[c[0] for c in CASES])
def test_bad_input_table(what, call, exc, pattern):
    ex, mbs = _vlm()
    with pytest.raises(exc) as info:
        call(ex, mbs[0])
    assert re.search(pattern, str(info.value), re.S), str(info.value)


def test_model_returning_logits_says_to_return_loss():
    class Logits(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList(nn.Linear(4, 4) for _ in range(2))

        def forward(self, x):
            for b in self.blocks:
                x = b(x)
            return x

    with pytest.raises(TraceError, match=r"not a scalar loss.*Fix:"):
        dipc.compile(Logits(), {"x": torch.randn(3, 4)})


def test_world_size_mismatch_is_a_clear_error(monkeypatch):
    import torch.distributed as dist

    from dipc.runtime.distributed import run_step_distributed

    ex, mbs = _vlm()
    pipe = dipc.compile(ex.model, mbs[0], num_stages=2, loss_weight=ex.loss_weight)
    monkeypatch.setattr(dist, "get_rank", lambda: 0)
    monkeypatch.setattr(dist, "get_world_size", lambda: 3)
    with pytest.raises(DipcError, match=r"world size 3 is not divisible by the pipeline depth 2.*Fix:"):
        run_step_distributed(pipe, mbs)


def test_program_for_other_microbatches_is_rejected():
    ex, mbs = _vlm()
    pipe = dipc.compile(ex.model, mbs[0], num_stages=2, loss_weight=ex.loss_weight)
    program = pipe.plan(mbs)
    with pytest.raises(BatchError, match=r"planned for 2 microbatches .* got 3 .*Fix:"):
        pipe.step(mbs + mbs[:1], program)


def test_unfreezing_after_compile_is_rejected():
    ex, mbs = _vlm()
    for p in ex.model.vision.parameters():
        p.requires_grad_(False)
    pipe = dipc.compile(ex.model, mbs[0], num_stages=2, loss_weight=ex.loss_weight)
    pipe.step(mbs)   # a frozen encoder trains fine
    for p in ex.model.vision.parameters():
        p.requires_grad_(True)
    with pytest.raises(PartitionError, match=r"requires_grad changed.*Fix: call dipc.compile again"):
        pipe.step(mbs)


def test_microbatch_without_loss_tokens_does_not_poison_the_loss():
    ex, mbs = _vlm()
    pipe = dipc.compile(ex.model, mbs[0], num_stages=2, loss_weight=ex.loss_weight)
    empty = dict(mbs[1], labels=torch.full_like(mbs[1]["labels"], -100))
    result = pipe.step([mbs[0], empty])
    assert torch.isfinite(torch.tensor(result.loss))
    assert all(torch.isfinite(p.grad).all() for p in ex.model.parameters() if p.grad is not None)


class _ComplexRope(nn.Module):
    def __init__(self, random_phase: bool):
        super().__init__()
        self.blocks = nn.ModuleList(nn.Linear(4, 4) for _ in range(2))
        self.random_phase = random_phase

    def forward(self, x, labels):
        phase = torch.rand_like(x[0]) if self.random_phase else x[0]
        freqs = torch.polar(torch.ones_like(x[0]), phase)   # complex, made in the glue
        h = self.blocks[0](x * freqs.real)           # used in stage 0 ...
        h = self.blocks[1](h) * freqs.imag           # ... and in stage 1
        return F.mse_loss(h, labels)


def test_complex_value_between_stages_names_the_value():
    # a random phase must not be recomputed (stage 1 would draw other numbers), so it has to travel
    with pytest.raises(PartitionError, match=r"value 'polar' flows from stage 0 to stage 1.*Fix:"):
        dipc.compile(_ComplexRope(random_phase=True), {"x": torch.randn(3, 4), "labels": torch.randn(3, 4)},
                     num_stages=2)
    with pytest.raises(PartitionError, match=r"value 'polar' flows from stage 0 to stage 1.*Fix:"):
        dipc.compile(_ComplexRope(random_phase=False), {"x": torch.randn(3, 4), "labels": torch.randn(3, 4)},
                     num_stages=2, remat_glue=False)


def test_cheap_complex_glue_is_recomputed_instead_of_sent():
    pipe = dipc.compile(_ComplexRope(random_phase=False), {"x": torch.randn(3, 4), "labels": torch.randn(3, 4)},
                        num_stages=2)
    assert pipe.stages[1].input_values == [("blocks_0", 0)]
    assert "polar" not in pipe.stages[0].output_values


@pytest.mark.parametrize("kwargs", [{"chunks": 0}, {"num_stages": 2.0}, {"num_stages": 0}])
def test_bad_stage_counts(kwargs):
    ex, mbs = _vlm()
    with pytest.raises(PartitionError, match=r"Fix: pass a whole number >= 1"):
        dipc.compile(ex.model, mbs[0], **kwargs)
