"""Text-to-video DiT (rectified flow) over packed video latent patches, with a packed text encoder.

Batch keys (see ``examples.data.T2VData.collate``), with ``B`` samples per microbatch:

* ``text_ids`` int64 ``[total_text_tokens]``: all captions concatenated.
* ``text_sample_ids`` int64 ``[total_text_tokens]``: sample index of each text token.
* ``text_pos`` int64 ``[total_text_tokens]``: position of each text token inside its caption.
* ``latents`` float ``[total_video_tokens, C*pt*ph*pw]``: patchified clean video latents.
* ``noise`` float, same shape: the Gaussian noise (in the batch so training is deterministic).
* ``video_ids`` int64 ``[total_video_tokens]``: sample index of each video token.
* ``video_pos`` int64 ``[total_video_tokens, 3]``: (t, h, w) patch coordinates.
* ``timesteps`` float ``[B]`` in (0, 1).

Objective: ``x_t = (1-t)*latents + t*noise``, the model predicts the velocity
``noise - latents``; loss = MSE mean over all video tokens and channels.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .layers import Attention, GELUMLP, LlamaBlock, RMSNorm, RotaryEmbedding, sinusoidal_embedding


@dataclass
class T2VConfig:
    # text encoder (T5/UMT5-like, bidirectional, packed)
    text_vocab_size: int = 256
    text_pad_token_id: int = 0
    text_hidden_size: int = 32
    text_num_layers: int = 2
    text_num_heads: int = 2
    text_intermediate_size: int = 64
    # latent video / patchification
    latent_channels: int = 4
    patch_t: int = 1
    patch_h: int = 2
    patch_w: int = 2
    max_t: int = 64  # max temporal patches (learned position table sizes)
    max_h: int = 64
    max_w: int = 64
    # DiT
    hidden_size: int = 64
    num_layers: int = 4
    num_heads: int = 4
    mlp_ratio: float = 4.0
    frequency_embedding_size: int = 64
    # Faithful DiT zero-initializes the adaLN modulation and the output layer, which makes every
    # block parameter's gradient exactly zero on the first step. Off by default so gradient
    # checks are meaningful; set True for the faithful init.
    adaln_zero_init: bool = False

    @property
    def patch_dim(self) -> int:
        return self.latent_channels * self.patch_t * self.patch_h * self.patch_w


class TextEncoder(nn.Module):
    """Bidirectional LLaMA-style encoder over packed captions (block-diagonal attention)."""

    def __init__(self, config: T2VConfig):
        super().__init__()
        d = config.text_hidden_size
        self.embed_tokens = nn.Embedding(config.text_vocab_size, d)
        self.rotary_emb = RotaryEmbedding(d // config.text_num_heads)
        self.layers = nn.ModuleList(
            [
                LlamaBlock(d, config.text_num_heads, config.text_num_heads, config.text_intermediate_size, causal=False)
                for _ in range(config.text_num_layers)
            ]
        )
        self.norm = RMSNorm(d)

    def forward(self, text_ids: torch.Tensor, text_sample_ids: torch.Tensor, text_pos: torch.Tensor) -> torch.Tensor:
        x = self.embed_tokens(text_ids)
        cos, sin = self.rotary_emb(text_pos)
        attn_mask = text_sample_ids[:, None] == text_sample_ids[None, :]
        for layer in self.layers:
            x = layer(x, cos, sin, attn_mask)
        return self.norm(x)


class VideoPatchEmbed(nn.Module):
    """Linear patch embedding + learned factorized 3D (t, h, w) position embedding."""

    def __init__(self, config: T2VConfig):
        super().__init__()
        d = config.hidden_size
        self.patch_embed = nn.Linear(config.patch_dim, d)
        self.pos_embed_t = nn.Embedding(config.max_t, d)
        self.pos_embed_h = nn.Embedding(config.max_h, d)
        self.pos_embed_w = nn.Embedding(config.max_w, d)

    def forward(self, x: torch.Tensor, video_pos: torch.Tensor) -> torch.Tensor:
        pos = self.pos_embed_t(video_pos[:, 0]) + self.pos_embed_h(video_pos[:, 1]) + self.pos_embed_w(video_pos[:, 2])
        return self.patch_embed(x) + pos


class TimestepEmbedder(nn.Module):
    """Sinusoidal embedding of ``t * 1000`` followed by an MLP (DiT)."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int):
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size),
        )

    def forward(self, timesteps: torch.Tensor) -> torch.Tensor:
        freq = sinusoidal_embedding(timesteps * 1000.0, self.frequency_embedding_size)
        return self.mlp(freq.to(self.mlp[0].weight.dtype))


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale) + shift


class DiTBlock(nn.Module):
    """DiT block with adaLN-zero (per-token conditioning), self-attn, cross-attn to text, MLP."""

    def __init__(self, config: T2VConfig):
        super().__init__()
        d = config.hidden_size
        self.norm1 = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(d, config.num_heads, bias=True)
        self.norm_cross = nn.LayerNorm(d, eps=1e-6)
        self.cross_attn = Attention(d, config.num_heads, kv_dim=config.text_hidden_size, bias=True)
        self.norm2 = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.mlp = GELUMLP(d, int(d * config.mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(d, 6 * d))
        if config.adaln_zero_init:
            nn.init.zeros_(self.adaLN_modulation[-1].weight)
            nn.init.zeros_(self.adaLN_modulation[-1].bias)

    def forward(
        self,
        x: torch.Tensor,
        c: torch.Tensor,
        self_attn_mask: torch.Tensor,
        text: torch.Tensor,
        cross_attn_mask: torch.Tensor,
    ) -> torch.Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=-1)
        x = x + gate_msa * self.attn(modulate(self.norm1(x), shift_msa, scale_msa), attn_mask=self_attn_mask)
        x = x + self.cross_attn(self.norm_cross(x), context=text, attn_mask=cross_attn_mask)
        x = x + gate_mlp * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x


class FinalLayer(nn.Module):
    def __init__(self, config: T2VConfig):
        super().__init__()
        d = config.hidden_size
        self.norm_final = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(d, 2 * d))
        self.linear = nn.Linear(d, config.patch_dim)
        if config.adaln_zero_init:
            for lin in (self.adaLN_modulation[-1], self.linear):
                nn.init.zeros_(lin.weight)
                nn.init.zeros_(lin.bias)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class TextToVideoDiT(nn.Module):
    def __init__(self, config: T2VConfig):
        super().__init__()
        self.config = config
        self.text_encoder = TextEncoder(config)
        self.video = VideoPatchEmbed(config)
        self.time_embed = TimestepEmbedder(config.hidden_size, config.frequency_embedding_size)
        self.blocks = nn.ModuleList([DiTBlock(config) for _ in range(config.num_layers)])
        self.final_layer = FinalLayer(config)

    def forward(
        self,
        text_ids: torch.Tensor,
        text_sample_ids: torch.Tensor,
        text_pos: torch.Tensor,
        latents: torch.Tensor,
        noise: torch.Tensor,
        video_ids: torch.Tensor,
        video_pos: torch.Tensor,
        timesteps: torch.Tensor,
    ) -> torch.Tensor:
        # rectified flow interpolation, per token
        t = timesteps[video_ids].unsqueeze(-1).to(latents.dtype)
        x_t = (1 - t) * latents + t * noise
        target = noise - latents

        text = self.text_encoder(text_ids, text_sample_ids, text_pos)
        c = self.time_embed(timesteps)[video_ids]  # per-token conditioning [N_video, D]
        x = self.video(x_t, video_pos)
        self_attn_mask = video_ids[:, None] == video_ids[None, :]
        cross_attn_mask = video_ids[:, None] == text_sample_ids[None, :]
        for block in self.blocks:
            x = block(x, c, self_attn_mask, text, cross_attn_mask)
        pred = self.final_layer(x, c)
        return F.mse_loss(pred.float(), target.float())
