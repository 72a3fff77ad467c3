"""Modality sub-microbatches end to end on the local executor: pipelined gradients with the vision
(or audio) segment run per sub-microbatch equal the single-process reference, and bad split
options fail at compile time with a clear error."""
import pytest
import torch

import dipc
from dipc.errors import PartitionError
from dipc.ir import dump_program, parse_program, validate
from dipc.passes.submicrobatch import SplitByGroup, SplitLeadingDim, SubMicrobatches, even_groups
from examples.data import make_example
from tests.runtime.helpers import assert_grads_equal, independent_weights, reference_grads, varied_microbatches


def _example(name: str):
    ex = make_example(name, seed=0)
    ex.model.to(torch.float64)
    mbs = [{k: v.to(torch.float64) if v.is_floating_point() else v for k, v in mb.items()}
           for mb in varied_microbatches(ex)]
    return ex, mbs


def _check_step(ex, mbs, pipe, where: str):
    weights = independent_weights(ex, mbs)
    want = reference_grads(ex.model, mbs, weights)
    program = pipe.plan(mbs)
    assert program.subs and max(max(c) for _, c in program.subs) > 1, "some microbatch must really be split"
    assert parse_program(dump_program(program)) == program
    result = pipe.step(mbs, program)
    got = {n: p.grad for n, p in ex.model.named_parameters() if p.grad is not None}
    assert_grads_equal(got, want, rtol=1e-9, atol=1e-12, where=where)
    with torch.no_grad():
        ref_loss = sum(w * float(ex.model(**mb)) for w, mb in zip(weights, mbs))
    assert result.loss == pytest.approx(ref_loss, rel=1e-12)
    return program


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b", "dual_queue"])
def test_vlm_image_subs_gradients_equal_reference(schedule):
    ex, mbs = _example("vlm")
    pipe = dipc.compile(ex.model, mbs[0], num_stages=2, schedule=schedule, loss_weight=ex.loss_weight,
                        sub_microbatches={"vision": 1})
    program = _check_step(ex, mbs, pipe, f"vlm/{schedule}/subs")
    images = [len(torch.unique(mb["image_ids"])) for mb in mbs]
    assert program.subs == (("vision", tuple(max(1, n) for n in images)),)


def test_two_vision_stages_sub_to_sub_edges():
    """Two vision stages on two ranks: sub j of the second reads sub j of the first."""
    ex, mbs = _example("vlm")
    pipe = dipc.compile(ex.model, mbs[0], num_stages=4, schedule="dual_queue", loss_weight=ex.loss_weight,
                        segments={"vision": 2, "backbone": 2}, sub_microbatches={"vision": 2})
    program = _check_step(ex, mbs, pipe, "vlm/dual_queue/4 stages/subs")
    assert any(i.sub >= 0 and i.op.value == "RECV_ACT" and program.stages[i.stage].modality == "vision"
               for s in program.streams for i in s)


def test_audio_clip_subs_gradients_equal_reference():
    ex, mbs = _example("audio_llm")
    pipe = dipc.compile(ex.model, mbs[0], num_stages=2, schedule="1f1b", loss_weight=ex.loss_weight,
                        sub_microbatches={"audio": 1})
    assert isinstance(pipe.sub_microbatcher.config["audio"].splitter, SplitLeadingDim)
    _check_step(ex, mbs, pipe, "audio_llm/1f1b/subs")


def test_plan_for_other_microbatches_is_refused():
    ex, mbs = _example("vlm")
    pipe = dipc.compile(ex.model, mbs[0], num_stages=2, loss_weight=ex.loss_weight, sub_microbatches={"vision": 1})
    program = pipe.plan(mbs)
    with pytest.raises(dipc.errors.BatchError, match="sub-microbatches"):
        pipe.step(list(reversed(mbs)), program)


def test_even_groups():
    assert even_groups(0, 4) == [0]
    assert even_groups(5, 2) == [2, 2, 1]
    assert even_groups(7, 3) == [3, 2, 2]


@pytest.mark.parametrize("option,pattern", [
    # rows (patches) as items: the block-diagonal encoder mixes the patches of one image
    ({"vision": SubMicrobatches(items_per_sub=1, splitter=SplitLeadingDim())},
     r"splitting modality 'vision', stage 0 output 'projector' .* is not exact.*Fix: pass sub_microbatches="),
    ({"vision": SubMicrobatches(items_per_sub=1, splitter=SplitByGroup("patch_pos"))},
     r"'patch_pos' is not a 1-D key.*Fix:"),
    ({"images": 2}, r"names modality 'images'.*Fix: use one of"),
    ({"backbone": 2}, r"cannot split 'backbone'.*Fix:"),
    ({"vision": 0}, r"items_per_sub=0.*Fix:"),
])
def test_bad_split_options_are_clear_errors(option, pattern):
    ex, mbs = _example("vlm")
    with pytest.raises(PartitionError, match=pattern):
        dipc.compile(ex.model, mbs[0], num_stages=2, loss_weight=ex.loss_weight, sub_microbatches=option)


@pytest.mark.parametrize("schedule", ["gpipe", "dual_queue"])
def test_same_rank_encoder_and_backbone(schedule):
    """Vision and backbone stages on one rank: subs are joined and gradients cut without messages."""
    ex, mbs = _example("vlm")
    pipe = dipc.compile(ex.model, mbs[0], num_stages=1, chunks=2, schedule=schedule, loss_weight=ex.loss_weight,
                        segments={"vision": 1, "backbone": 1}, sub_microbatches={"vision": 1})
    program = _check_step(ex, mbs, pipe, f"vlm/{schedule}/1 rank/subs")
    assert not any(i.is_comm for s in program.streams for i in s)
