"""Pipelined training of Hugging Face LLaVA and Qwen2-VL (tiny random configs, float64): exact gradients."""
from __future__ import annotations

import copy

import pytest

pytest.importorskip("transformers")

import torch  # noqa: E402

import dipc  # noqa: E402
from dipc.errors import RuntimeStepError, TraceError  # noqa: E402
from transformers import (CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration,  # noqa: E402
                          Qwen2VLConfig, Qwen2VLForConditionalGeneration)


def llava():
    torch.manual_seed(0)
    tc = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, max_position_embeddings=256, use_cache=False)
    vc = CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                          image_size=16, patch_size=8, num_channels=3)
    cfg = LlavaConfig(text_config=tc, vision_config=vc, image_token_id=3, vision_feature_layer=-2,
                      vision_feature_select_strategy="default", projector_hidden_act="gelu", use_cache=False,
                      tie_word_embeddings=False)
    cfg._attn_implementation = "eager"
    return LlavaForConditionalGeneration(cfg).double()


def llava_batch(gen, images_per_sample, text_len=6):
    n_patch = 4  # (16 / 8) ** 2 image tokens per image
    ids, pix = [], []
    for k in images_per_sample:
        seq = []
        for _ in range(k):
            seq += [3] * n_patch
            pix.append(torch.randn(3, 16, 16, generator=gen, dtype=torch.float64))
        seq += torch.randint(4, 64, (text_len,), generator=gen).tolist()
        ids.append(seq)
    return _collate(ids, None, {"pixel_values": torch.stack(pix)})


def qwen2vl():
    torch.manual_seed(0)
    cfg = Qwen2VLConfig(
        text_config=dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, use_cache=False,
                         rope_parameters={"rope_type": "default", "mrope_section": [1, 1, 2], "rope_theta": 10000.0}),
        vision_config=dict(depth=2, embed_dim=16, hidden_size=32, num_heads=2, mlp_ratio=2, in_channels=3,
                           patch_size=2, spatial_merge_size=2, temporal_patch_size=1),
        image_token_id=3, video_token_id=5, vision_start_token_id=1, vision_end_token_id=2, use_cache=False,
        bos_token_id=None, eos_token_id=None)
    for c in (cfg, cfg.text_config, cfg.vision_config):
        c._attn_implementation = "eager"
    return Qwen2VLForConditionalGeneration(cfg).double()


def qwen_batch(gen, images_per_sample, text_len=5):
    """images_per_sample: per sample, the (h, w) patch grids of its images (even sides)."""
    ids, types, pix, thw = [], [], [], []
    for imgs in images_per_sample:
        seq, tt = [], []
        for h, w in imgs:
            n = h * w // 4
            seq += [1] + [3] * n + [2]
            tt += [0] + [1] * n + [0]
            pix.append(torch.randn(h * w, 3 * 2 * 2, generator=gen, dtype=torch.float64))
            thw.append([1, h, w])
        seq += torch.randint(6, 64, (text_len,), generator=gen).tolist()
        tt += [0] * text_len
        ids.append(seq)
        types.append(tt)
    return _collate(ids, types, {"pixel_values": torch.cat(pix), "image_grid_thw": torch.tensor(thw)})


def _collate(ids, types, extra):
    L = max(len(s) for s in ids)
    input_ids = torch.zeros(len(ids), L, dtype=torch.long)
    mask = torch.zeros(len(ids), L, dtype=torch.long)
    mtt = torch.zeros(len(ids), L, dtype=torch.long)
    for i, s in enumerate(ids):
        input_ids[i, :len(s)] = torch.tensor(s)
        mask[i, :len(s)] = 1
        if types is not None:
            mtt[i, :len(s)] = torch.tensor(types[i])
    labels = input_ids.clone()
    labels[mask == 0] = -100
    labels[input_ids == 3] = -100
    batch = {"input_ids": input_ids, "attention_mask": mask, **extra, "labels": labels}
    if types is not None:
        batch["mm_token_type_ids"] = mtt
    return batch


# Every microbatch has >= 1 image (samples without images included): neither model runs eagerly on a
# microbatch with no image at all while keeping the image keys (CLIP's attention cannot reshape 0
# images; Qwen2-VL's get_vision_position_ids does torch.cat([])) — passing pixel_values=None instead
# changes the batch keys, which one captured graph cannot serve.
MODELS = {
    "llava": (llava, lambda g: [llava_batch(g, k) for k in ([1, 2], [0, 1], [3, 1, 0])]),
    "qwen2_vl": (qwen2vl, lambda g: [qwen_batch(g, k) for k in (
        [[(2, 4)], [(4, 4), (2, 2)]], [[], [(2, 2)]], [[(4, 2), (2, 2), (2, 6)], []])]),
}


def hf_loss_weight(mb):
    """HF causal-LM losses shift labels inside the model: position 0 of each row never counts."""
    return float((mb["labels"][..., 1:] != -100).sum())


@pytest.mark.parametrize("schedule", ["1f1b", "interleaved_1f1b"])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_hf_pipeline_gradients_exact(name, schedule):
    make, data = MODELS[name]
    model = make()
    mbs = data(torch.Generator().manual_seed(0))
    pipe = dipc.compile(model, mbs[0], num_stages=2, schedule=schedule, loss_weight=hf_loss_weight)
    mods = [s.modality for s in pipe.stages]
    assert mods[0] == "vision" and set(mods[1:]) == {"backbone"}, pipe.describe()
    vision = {p for s in pipe.stages if s.modality == "vision" for p in s.layers}
    assert all(".layers." not in p or "vision" in p for p in vision)
    assert any(".blocks." in p or ".layers." in p for p in vision)      # vision blocks are their own layers
    assert any("language_model.layers." in p for s in pipe.stages[1:] for p in s.layers)

    ref = copy.deepcopy(model)
    counts = [hf_loss_weight(mb) for mb in mbs]
    w = [c / sum(counts) for c in counts]         # full-batch token mean, computed independently
    assert pipe.loss_weights(mbs) == pytest.approx(w, rel=1e-15)
    ref_losses = []
    for wi, mb in zip(w, mbs):
        loss = ref(**mb).loss
        ref_losses.append(float(loss.detach()))
        (loss * wi).backward()
    result = pipe.step(mbs)
    assert result.microbatch_losses == pytest.approx(ref_losses, rel=1e-12)
    for (n, p), q in zip(model.named_parameters(), ref.parameters()):
        if q.grad is None:
            assert p.grad is None, n
            continue
        assert p.grad is not None, n
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-9, atol=1e-12, msg=n)


# -- the general capture mechanisms the HF models rely on, on a toy model --------------------------
def _lengths_to_offsets(lengths):
    out, acc = [], 0
    for n in lengths.tolist():     # data-dependent Python loop: runs as one opaque call per microbatch
        out.append(acc)
        acc += n
    return torch.tensor(out)


class _Toy(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = torch.nn.ModuleList([torch.nn.Linear(4, 4) for _ in range(2)])

    def forward(self, x, lengths, labels):
        offsets = _lengths_to_offsets(lengths)
        h = self.layers[0](x) + offsets.sum().to(x.dtype)
        if h.shape[0] == 3:        # branch in code that also calls layers: example's branch + guard
            h = h * 2
        h = self.layers[1](h)
        return torch.nn.functional.mse_loss(h, labels)


def test_opaque_helper_and_branch_guard():
    torch.manual_seed(0)
    model = _Toy().double()

    def mb(n, lengths):
        return {"x": torch.randn(n, 4, dtype=torch.float64), "lengths": torch.tensor(lengths),
                "labels": torch.randn(n, 4, dtype=torch.float64)}
    mbs = [mb(3, [1, 2]), mb(3, [4, 1, 1])]
    pipe = dipc.compile(model, mbs[0], num_stages=2)
    assert any("_lengths_to_offsets" in s for s in pipe.captured.graph_module.meta["dipc.opaque"])
    ref = copy.deepcopy(model)
    for wi, m in zip(pipe.loss_weights(mbs), mbs):
        (ref(**m) * wi).backward()
    pipe.step(mbs)
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-9, atol=1e-12)
    with pytest.raises((RuntimeStepError, TraceError), match="other branch"):   # at plan time already
        pipe.step([mb(2, [1])])
