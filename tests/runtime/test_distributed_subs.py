"""Two gloo ranks run a VLM pipeline with image sub-microbatches: gradients equal the reference."""
import pytest
import torch

from dipc.runtime.launch import spawn
from tests.runtime.helpers import assert_grads_equal, independent_weights, reference_grads
from tests.runtime.test_subs_equivalence import _example

pytestmark = pytest.mark.dist

CASES = [("1f1b", 1), ("dual_queue", 2)]   # (schedule, images per vision sub)


def _build(schedule: str, per_sub: int):
    import dipc

    ex, mbs = _example("vlm")
    pipe = dipc.compile(ex.model, mbs[0], num_stages=2, schedule=schedule, loss_weight=ex.loss_weight,
                        sub_microbatches={"vision": per_sub})
    return ex, pipe, mbs


def _rank_case(rank: int, world: int) -> dict:
    from dipc.runtime.distributed import run_step_distributed

    out = {}
    for schedule, per_sub in CASES:
        ex, pipe, mbs = _build(schedule, per_sub)
        result = run_step_distributed(pipe, mbs, timeout_s=60)
        owned = {id(p) for p in pipe.rank_parameters(rank)}
        grads = {n: p.grad for n, p in ex.model.named_parameters() if id(p) in owned and p.grad is not None}
        out[schedule] = (result.loss, grads, result.program.subs)
    return out


@pytest.mark.timeout(300)
def test_gloo_two_ranks_with_image_subs_equal_reference():
    per_rank = spawn(_rank_case, 2, timeout_s=240)
    for schedule, per_sub in CASES:
        ex, pipe, mbs = _build(schedule, per_sub)
        weights = independent_weights(ex, mbs)
        want = reference_grads(ex.model, mbs, weights)
        with torch.no_grad():
            ref_loss = sum(w * float(ex.model(**mb)) for w, mb in zip(weights, mbs))
        got = {}
        for r in range(2):
            loss, grads, subs = per_rank[r][schedule]
            assert subs == pipe.sub_counts(mbs) and max(subs[0][1]) > 1
            assert loss == pytest.approx(ref_loss, rel=1e-12), f"rank {r} loss"
            got.update(grads)
        assert_grads_equal(got, want, rtol=1e-9, atol=1e-12, where=f"vlm/{schedule}/gloo/subs")
