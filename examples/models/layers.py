"""Shared transformer building blocks for the example models.

Written the way ordinary model code is written (HF/timm style), with one constraint: no
Python control flow on tensor *values*, so every module can be traced with ``torch.fx`` and
shape-propagated with FakeTensors. Control flow on config values / module attributes is fine.

Packed ("varlen") inputs are handled by giving attention an explicit boolean mask (``True`` =
may attend) of shape ``[N, M]`` (or ``[B, N, M]``) that broadcasts over heads.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    """LLaMA RMSNorm (computed in float32)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dtype)


class RotaryEmbedding(nn.Module):
    """Rotary position embedding (no parameters, one non-persistent buffer).

    ``forward(position_ids)`` maps integer positions ``[..., T]`` to ``(cos, sin)`` of shape
    ``[..., T, head_dim]`` (HF "rotate_half" layout).
    """

    def __init__(self, head_dim: int, theta: float = 10000.0):
        super().__init__()
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, position_ids: torch.Tensor):
        freqs = position_ids.unsqueeze(-1).float() * self.inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos(), emb.sin()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary_pos_emb(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``x``: ``[..., H, T, hd]``; ``cos``/``sin``: ``[..., T, hd]`` (broadcast over heads)."""
    cos = cos.unsqueeze(-3).to(x.dtype)
    sin = sin.unsqueeze(-3).to(x.dtype)
    return x * cos + rotate_half(x) * sin


class Attention(nn.Module):
    """Multi-head (optionally grouped-query, optionally cross-) attention via SDPA.

    Works on any leading batch shape: ``x`` is ``[..., N, dim]`` (``[N, dim]`` for packed
    sequences), ``context`` is ``[..., M, kv_dim]``. ``attn_mask`` is boolean ``[..., N, M]``
    (``True`` = attend) and is broadcast over heads; ``rope`` is an optional ``(cos, sin)``
    pair applied to q and k (self-attention only).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        num_kv_heads: Optional[int] = None,
        kv_dim: Optional[int] = None,
        bias: bool = False,
    ):
        super().__init__()
        assert dim % num_heads == 0, "dim must be divisible by num_heads"
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads or num_heads
        assert num_heads % self.num_kv_heads == 0
        self.head_dim = dim // num_heads
        kv_dim = kv_dim or dim
        self.q_proj = nn.Linear(dim, num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(kv_dim, self.num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(kv_dim, self.num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(num_heads * self.head_dim, dim, bias=bias)

    def forward(
        self,
        x: torch.Tensor,
        context: Optional[torch.Tensor] = None,
        attn_mask: Optional[torch.Tensor] = None,
        is_causal: bool = False,
        rope: Optional[tuple] = None,
    ) -> torch.Tensor:
        kv_input = x if context is None else context
        # [..., N, H*hd] -> [..., H, N, hd]
        q = self.q_proj(x).unflatten(-1, (self.num_heads, self.head_dim)).transpose(-2, -3)
        k = self.k_proj(kv_input).unflatten(-1, (self.num_kv_heads, self.head_dim)).transpose(-2, -3)
        v = self.v_proj(kv_input).unflatten(-1, (self.num_kv_heads, self.head_dim)).transpose(-2, -3)
        if rope is not None:
            cos, sin = rope
            q = apply_rotary_pos_emb(q, cos, sin)
            k = apply_rotary_pos_emb(k, cos, sin)
        if self.num_kv_heads != self.num_heads:
            rep = self.num_heads // self.num_kv_heads
            k = k.repeat_interleave(rep, dim=-3)
            v = v.repeat_interleave(rep, dim=-3)
        if attn_mask is not None:
            attn_mask = attn_mask.unsqueeze(-3)  # broadcast over heads
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal)
        out = out.transpose(-2, -3).flatten(-2)
        return self.o_proj(out)


class SwiGLUMLP(nn.Module):
    """LLaMA feed-forward: ``down(silu(gate(x)) * up(x))``."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden_dim, bias=False)
        self.up_proj = nn.Linear(dim, hidden_dim, bias=False)
        self.down_proj = nn.Linear(hidden_dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class GELUMLP(nn.Module):
    """ViT / Whisper feed-forward: ``fc2(gelu(fc1(x)))``."""

    def __init__(self, dim: int, hidden_dim: int, out_dim: Optional[int] = None):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden_dim, out_dim or dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class EncoderBlock(nn.Module):
    """Pre-LN ViT / Whisper encoder block: LayerNorm, MHA (bidirectional), GELU MLP."""

    def __init__(self, dim: int, num_heads: int, mlp_dim: int, eps: float = 1e-6):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, num_heads, bias=True)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = GELUMLP(dim, mlp_dim)

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), attn_mask=attn_mask)
        x = x + self.mlp(self.norm2(x))
        return x


class LlamaBlock(nn.Module):
    """LLaMA decoder block: RMSNorm, (causal) GQA attention with RoPE, SwiGLU MLP.

    With ``causal=False`` it is a bidirectional encoder block (used by the T2V text encoder,
    together with a block-diagonal ``attn_mask`` for packed sequences).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        num_kv_heads: int,
        intermediate_size: int,
        eps: float = 1e-6,
        causal: bool = True,
    ):
        super().__init__()
        self.causal = causal
        self.input_layernorm = RMSNorm(dim, eps)
        self.self_attn = Attention(dim, num_heads, num_kv_heads=num_kv_heads)
        self.post_attention_layernorm = RMSNorm(dim, eps)
        self.mlp = SwiGLUMLP(dim, intermediate_size)

    def forward(
        self,
        hidden_states: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        attn_mask: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        h = self.input_layernorm(hidden_states)
        h = self.self_attn(h, attn_mask=attn_mask, is_causal=self.causal and attn_mask is None, rope=(cos, sin))
        hidden_states = hidden_states + h
        hidden_states = hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))
        return hidden_states


class LanguageModel(nn.Module):
    """LLaMA-style decoder trunk (no LM head): ``embed_tokens``, ``rotary_emb``, ``layers``, ``norm``.

    ``forward(inputs_embeds)`` takes already-merged embeddings ``[B, T, D]`` (right-padded, so a
    plain causal mask suffices: padding only ever comes after real tokens) and returns the final
    normed hidden states.
    """

    def __init__(
        self,
        vocab_size: int,
        hidden_size: int,
        num_layers: int,
        num_heads: int,
        num_kv_heads: int,
        intermediate_size: int,
        rope_theta: float = 10000.0,
        eps: float = 1e-6,
    ):
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab_size, hidden_size)
        self.rotary_emb = RotaryEmbedding(hidden_size // num_heads, rope_theta)
        self.layers = nn.ModuleList(
            [LlamaBlock(hidden_size, num_heads, num_kv_heads, intermediate_size, eps) for _ in range(num_layers)]
        )
        self.norm = RMSNorm(hidden_size, eps)

    def forward(self, inputs_embeds: torch.Tensor) -> torch.Tensor:
        position_ids = torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device)
        cos, sin = self.rotary_emb(position_ids)
        hidden_states = inputs_embeds
        for layer in self.layers:
            hidden_states = layer(hidden_states, cos, sin)
        return self.norm(hidden_states)


def sinusoidal_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Standard sinusoidal embedding of a float tensor ``[...]`` -> ``[..., dim]``."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float().unsqueeze(-1) * freqs
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def language_model_from_config(config) -> LanguageModel:
    """The LLaMA trunk an LLM-backed example config (VLM, audio LLM) describes."""
    return LanguageModel(config.vocab_size, config.hidden_size, config.num_layers, config.num_heads,
                         config.num_kv_heads, config.intermediate_size, config.rope_theta, config.rms_norm_eps)


def merged_lm_loss(language_model: LanguageModel, lm_head: nn.Module, input_ids: torch.Tensor,
                   media_features: torch.Tensor, media_token_id: int, labels: torch.Tensor) -> torch.Tensor:
    """Scatter encoder features into the text embeddings at the media-token positions (one token
    per feature row, LLaVA-style), run the trunk and return the token cross-entropy."""
    inputs_embeds = language_model.embed_tokens(input_ids)
    media_mask = (input_ids == media_token_id).unsqueeze(-1)
    inputs_embeds = inputs_embeds.masked_scatter(media_mask, media_features)
    logits = lm_head(language_model(inputs_embeds))
    return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100)
