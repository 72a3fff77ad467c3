"""The paper's evaluation models (PipeWeaver/DIP §7.2) as configs of dipc's example model classes,
built on the ``meta`` device so paper-scale plans need no memory.

Components (Table 2 of the paper)::

    ViT 5B     63 layers  d 1792  FFN 15360  16 heads
    ViT 22B    48 layers  d 6144  FFN 24576  48 heads
    Llama3 8B  32 layers  d 4096  FFN 14336  32 heads, 8 KV groups
    Qwen2 32B  64 layers  d 5120  FFN 27648  40 heads, 8 KV groups
    Qwen2 72B  80 layers  d 8192  FFN 29568  64 heads, 8 KV groups
    DiT 5B     28 layers  d 3584  FFN 10240  28 heads
    DiT 30B    48 layers  d 6144  FFN 24576  48 heads

Combinations (Table 3): VLM-S (ViT 5B + Llama3 8B, TP4 PP4), VLM-M (ViT 5B + Qwen2 32B, TP8 PP4),
VLM-L (ViT 22B + Qwen2 72B, TP8 PP8), T2V-S (Llama3 8B + DiT 5B, TP4 PP4), T2V-L (Qwen2 32B +
DiT 30B, TP8 PP8).

Where dipc's example classes differ from the paper's models (the costs follow the classes):
- the ViT is the example NaViT (pre-LN, GELU MLP, learned 2D positions) over the 169 *merged*
  tokens per image that the paper's Qwen2-VL ViT hands to the LM (patch 14 px, 3 channels); the
  real Qwen2-VL ViT runs on 2704 patches per 728 px image before its 4×4 merge;
- the LMs have no QKV bias (Qwen2 has one: ~0.01% of FLOPs); the T2V text encoder is
  bidirectional and uses as many KV heads as query heads (the example class has no GQA knob), so
  its Llama3 8B is ~0.8B parameters larger than Llama3's;
- the DiT's MLP is GELU ``d -> FFN -> d`` and its cross-attention reads the text encoder's width.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

__all__ = ["Component", "PaperModel", "COMPONENTS", "PAPER_MODELS", "paper_config", "build_paper_model",
           "paper_example_batch", "video_tokens"]


@dataclass(frozen=True, kw_only=True, slots=True)
class Component:
    name: str
    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_heads: int
    num_kv_heads: int
    vocab_size: int = 0


@dataclass(frozen=True, kw_only=True, slots=True)
class PaperModel:
    name: str
    kind: str            # "vlm" | "t2v"
    encoder: str         # ViT (VLM) or text LM (T2V)
    backbone: str        # LM (VLM) or DiT (T2V)
    tp: int
    pp: int
    num_gpus: int


COMPONENTS: dict[str, Component] = {c.name: c for c in (
    Component(name="vit_5b", num_layers=63, hidden_size=1792, ffn_hidden_size=15360, num_heads=16, num_kv_heads=16),
    Component(name="vit_22b", num_layers=48, hidden_size=6144, ffn_hidden_size=24576, num_heads=48, num_kv_heads=48),
    Component(name="llama3_8b", num_layers=32, hidden_size=4096, ffn_hidden_size=14336, num_heads=32, num_kv_heads=8,
              vocab_size=128256),
    Component(name="qwen2_32b", num_layers=64, hidden_size=5120, ffn_hidden_size=27648, num_heads=40, num_kv_heads=8,
              vocab_size=152064),
    Component(name="qwen2_72b", num_layers=80, hidden_size=8192, ffn_hidden_size=29568, num_heads=64, num_kv_heads=8,
              vocab_size=152064),
    Component(name="dit_5b", num_layers=28, hidden_size=3584, ffn_hidden_size=10240, num_heads=28, num_kv_heads=28),
    Component(name="dit_30b", num_layers=48, hidden_size=6144, ffn_hidden_size=24576, num_heads=48, num_kv_heads=48),
    # GPT-3 175B's shape (96 x 12288, 96 heads) in the LLaMA-style block the example LM uses: SwiGLU with
    # 2/3 of GPT-3's 4d FFN width keeps the parameter count (3 matrices instead of 2)
    Component(name="gpt_175b", num_layers=96, hidden_size=12288, ffn_hidden_size=32768, num_heads=96, num_kv_heads=96,
              vocab_size=50257),
)}

PAPER_MODELS: dict[str, PaperModel] = {m.name: m for m in (
    PaperModel(name="vlm_s", kind="vlm", encoder="vit_5b", backbone="llama3_8b", tp=4, pp=4, num_gpus=16),
    PaperModel(name="vlm_m", kind="vlm", encoder="vit_5b", backbone="qwen2_32b", tp=8, pp=4, num_gpus=32),
    PaperModel(name="vlm_l", kind="vlm", encoder="vit_22b", backbone="qwen2_72b", tp=8, pp=8, num_gpus=64),
    PaperModel(name="t2v_s", kind="t2v", encoder="llama3_8b", backbone="dit_5b", tp=4, pp=4, num_gpus=16),
    PaperModel(name="t2v_l", kind="t2v", encoder="qwen2_32b", backbone="dit_30b", tp=8, pp=8, num_gpus=64),
    # the large-scale simulations (paper §7.7, H100): data parallelism on top of TP x PP
    PaperModel(name="vlm_xl_8k", kind="vlm", encoder="vit_22b", backbone="gpt_175b", tp=8, pp=8, num_gpus=8192),
    PaperModel(name="t2v_xl_3k", kind="t2v", encoder="qwen2_72b", backbone="dit_30b", tp=8, pp=4, num_gpus=3072),
)}

IMAGE_TOKENS = 169        # 728 px, patch 14, spatial merge 4 -> 13 x 13
SEQ_LEN = 8192            # VLM samples are packed to 8192 tokens (<= 48 images)
VIDEO_FPS = 16            # MovieGen: 16 FPS, <= 16 s, <= 8 clips per microbatch
LATENT_CHANNELS = 16      # MovieGen TAE: 16 channels, 8x temporal and 8x spatial compression


def _get(name: str, table: dict[str, Any], what: str) -> Any:
    if name not in table:
        raise KeyError(f"unknown {what} {name!r}. Fix: use one of {sorted(table)}.")
    return table[name]


def paper_config(name: str) -> Any:
    """The example-model config (``VLMConfig`` / ``T2VConfig``) of paper model ``name``."""
    from examples.models import T2VConfig, VLMConfig

    m = _get(name, PAPER_MODELS, "paper model")
    enc, bb = COMPONENTS[m.encoder], COMPONENTS[m.backbone]
    if m.kind == "vlm":
        return VLMConfig(vocab_size=bb.vocab_size, patch_size=14, num_channels=3,
                         vision_hidden_size=enc.hidden_size, vision_num_layers=enc.num_layers,
                         vision_num_heads=enc.num_heads, vision_intermediate_size=enc.ffn_hidden_size,
                         max_grid_size=64, hidden_size=bb.hidden_size, num_layers=bb.num_layers,
                         num_heads=bb.num_heads, num_kv_heads=bb.num_kv_heads,
                         intermediate_size=bb.ffn_hidden_size, rope_theta=500000.0)
    mlp_ratio = bb.ffn_hidden_size / bb.hidden_size
    cfg = T2VConfig(text_vocab_size=enc.vocab_size, text_hidden_size=enc.hidden_size,
                    text_num_layers=enc.num_layers, text_num_heads=enc.num_heads,
                    text_intermediate_size=enc.ffn_hidden_size, latent_channels=LATENT_CHANNELS,
                    patch_t=1, patch_h=2, patch_w=2, max_t=64, max_h=128, max_w=128,
                    hidden_size=bb.hidden_size, num_layers=bb.num_layers, num_heads=bb.num_heads,
                    mlp_ratio=mlp_ratio, frequency_embedding_size=256)
    if int(cfg.hidden_size * cfg.mlp_ratio) != bb.ffn_hidden_size:   # float ratio rounding
        cfg.mlp_ratio = (bb.ffn_hidden_size + 0.5) / bb.hidden_size
    return cfg


def build_paper_model(name: str, device: str | torch.device = "meta") -> nn.Module:
    """Paper model ``name`` on ``device`` (default ``meta``: no parameter memory)."""
    from examples.models import TextToVideoDiT, VisionLanguageModel

    cfg = paper_config(name)
    cls = VisionLanguageModel if PAPER_MODELS[name].kind == "vlm" else TextToVideoDiT
    with torch.device(device):
        return cls(cfg)


def video_tokens(seconds: float, height: int = 768, width: int = 768) -> tuple[int, int, int]:
    """(t, h, w) latent patch grid of a clip: 16 FPS, 8x temporal / 8x spatial TAE, 1x2x2 patches."""
    frames = max(1, round(seconds * VIDEO_FPS))
    return max(1, frames // 8), height // 16, width // 16


def paper_example_batch(name: str, *, num_images: int = 8, seq_len: int = SEQ_LEN, num_seqs: int = 1,
                        clip_seconds: tuple[float, ...] = (4.0, 4.0), caption_tokens: int = 128,
                        resolution: tuple[int, int] = (256, 256), device: str = "meta") -> dict[str, torch.Tensor]:
    """A batch with the paper's shapes (values are placeholders on ``device``; only shapes matter
    for tracing). VLM: ``num_images`` images of 169 tokens in ``num_seqs`` sequences of ``seq_len``.
    T2V: one sample per clip (``clip_seconds``), captions of ``caption_tokens``."""
    m = _get(name, PAPER_MODELS, "paper model")
    cfg = paper_config(name)
    dev = torch.device(device)
    if m.kind == "vlm":
        n = num_images * IMAGE_TOKENS
        return {
            "pixel_values": torch.empty(n, cfg.patch_dim, device=dev),
            "image_ids": torch.empty(n, dtype=torch.long, device=dev),
            "patch_pos": torch.empty(n, 2, dtype=torch.long, device=dev),
            "input_ids": torch.empty(num_seqs, seq_len, dtype=torch.long, device=dev),
            "labels": torch.empty(num_seqs, seq_len, dtype=torch.long, device=dev),
        }
    grids = [video_tokens(s, *resolution) for s in clip_seconds]
    nv = sum(t * h * w for t, h, w in grids)
    nt = caption_tokens * len(clip_seconds)
    return {
        "text_ids": torch.empty(nt, dtype=torch.long, device=dev),
        "text_sample_ids": torch.empty(nt, dtype=torch.long, device=dev),
        "text_pos": torch.empty(nt, dtype=torch.long, device=dev),
        "latents": torch.empty(nv, cfg.patch_dim, device=dev),
        "noise": torch.empty(nv, cfg.patch_dim, device=dev),
        "video_ids": torch.empty(nv, dtype=torch.long, device=dev),
        "video_pos": torch.empty(nv, 3, dtype=torch.long, device=dev),
        "timesteps": torch.empty(len(clip_seconds), device=dev),
    }
