"""Paper-scale models (VLM-S, T2V-S) built on the meta device: per-layer costs without memory."""
from __future__ import annotations

import pytest
import torch

from dipc.passes.capture import capture
from dipc.semu.costs import LengthStats, layer_cost_model
from dipc.semu.models import COMPONENTS, PAPER_MODELS, build_paper_model, paper_config, paper_example_batch


def _block_params(d: int, ffn: int, heads: int, kv_heads: int, gated: bool) -> int:
    hd = d // heads
    attn = 2 * d * d + 2 * d * kv_heads * hd
    return attn + (3 if gated else 2) * d * ffn


def test_vlm_s_on_meta_costs_match_closed_forms():
    model = build_paper_model("vlm_s")
    assert all(p.is_meta for p in model.parameters())
    assert 12.0e9 < sum(p.numel() for p in model.parameters()) < 12.6e9      # "VLM 12B"
    captured = capture(model, paper_example_batch("vlm_s", num_images=8))
    cm = layer_cost_model(captured)
    vit, lm = COMPONENTS["vit_5b"], COMPONENTS["llama3_8b"]
    assert sum(p.startswith("vision.blocks.") for p in cm.layers) == vit.num_layers
    assert sum(p.startswith("language_model.layers.") for p in cm.layers) == lm.num_layers
    assert cm.num_traced <= 10                       # spatial reuse: one trace per distinct layer

    images = [169] * 12
    n = sum(images)
    v = cm.cost("vision.blocks.40", LengthStats.of(images))
    matmul = 2 * n * _block_params(vit.hidden_size, vit.ffn_hidden_size, vit.num_heads, vit.num_kv_heads, False)
    assert v.fwd_flops - v.attn_fwd_flops == matmul
    assert v.attn_fwd_flops == 4 * vit.hidden_size * sum(x * x for x in images)
    assert v.bwd_w_flops == matmul
    assert v.param_bytes == 4 * (_block_params(vit.hidden_size, vit.ffn_hidden_size, vit.num_heads,
                                               vit.num_kv_heads, False) + 4 * vit.hidden_size + vit.ffn_hidden_size
                                 + vit.hidden_size + 4 * vit.hidden_size)

    seq = 8192
    c = cm.cost("language_model.layers.7", LengthStats.padded(1, seq))
    matmul = 2 * seq * _block_params(lm.hidden_size, lm.ffn_hidden_size, lm.num_heads, lm.num_kv_heads, True)
    assert c.fwd_flops - c.attn_fwd_flops == matmul
    assert c.attn_fwd_flops == 2 * lm.hidden_size * seq * (seq + 1)          # causal
    assert c.bwd_in_flops == matmul + 2 * c.attn_fwd_flops
    assert c.bwd_w_flops == matmul
    assert c.act_bytes > 0 and c.out_bytes == 4 * seq * lm.hidden_size


def test_t2v_s_on_meta_binds_video_and_text_streams():
    model = build_paper_model("t2v_s")
    assert all(p.is_meta for p in model.parameters())
    captured = capture(model, paper_example_batch("t2v_s", clip_seconds=(2.0, 3.0, 1.0)))
    cm = layer_cost_model(captured)
    cfg = paper_config("t2v_s")
    dit = COMPONENTS["dit_5b"]
    assert int(cfg.hidden_size * cfg.mlp_ratio) == dit.ffn_hidden_size
    video, text = [4096, 2048], [120, 64]
    c = cm.cost("blocks.5", LengthStats.of(video, context=text))
    d = dit.hidden_size
    assert c.attn_fwd_flops == 4 * d * (sum(x * x for x in video) + sum(a * b for a, b in zip(video, text)))
    short = cm.cost("blocks.5", LengthStats.of([1024] * 6, context=[64] * 6))
    assert short.attn_fwd_flops < c.attn_fwd_flops       # same tokens, shorter clips: less attention


@pytest.mark.parametrize("name", sorted(PAPER_MODELS))
def test_every_paper_model_builds_on_meta(name):
    cfg = paper_config(name)
    with torch.device("meta"):
        model = build_paper_model(name)
    assert all(p.is_meta for p in model.parameters())
    assert cfg is not None
