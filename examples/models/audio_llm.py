"""Audio LLM: Whisper-style conv front-end + bidirectional encoder + LLaMA LLM (Qwen2-Audio-like).

Batch keys (see ``examples.data.AudioData.collate``):

* ``input_features`` float ``[N_clips, n_mels, frames]``: log-mel features, every clip zero-padded
  to the longest clip of the microbatch (rounded up to a multiple of 4, at least 4 frames).
* ``input_ids`` int64 ``[B, T]``: right-padded text with ``audio_token_id`` exactly
  ``frames // 4`` times per clip (the front-end downsamples time by 4).
* ``labels`` int64 ``[B, T]``: already shifted targets, ``-100`` = ignore.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from .layers import EncoderBlock, GELUMLP, language_model_from_config, merged_lm_loss, sinusoidal_embedding


@dataclass
class AudioLLMConfig:
    vocab_size: int = 256
    pad_token_id: int = 0
    bos_token_id: int = 1
    eos_token_id: int = 2
    audio_token_id: int = 3
    # audio encoder
    n_mels: int = 16
    audio_hidden_size: int = 32
    audio_num_layers: int = 2
    audio_num_heads: int = 2
    audio_intermediate_size: int = 64
    # language model
    hidden_size: int = 64
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 128
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    # time downsampling of the front-end (two stride-2 convs); fixed, not a knob
    downsample: ClassVar[int] = 4


class AudioFrontend(nn.Module):
    """Two stride-2 Conv1d + GELU (x4 time downsampling) and sinusoidal positions.

    ``[N, n_mels, F] -> [N, F // 4, D]`` for ``F`` a multiple of 4.
    """

    def __init__(self, n_mels: int, dim: int):
        super().__init__()
        self.conv1 = nn.Conv1d(n_mels, dim, kernel_size=3, stride=2, padding=1)
        self.conv2 = nn.Conv1d(dim, dim, kernel_size=3, stride=2, padding=1)
        self.dim = dim

    def forward(self, input_features: torch.Tensor) -> torch.Tensor:
        x = F.gelu(self.conv1(input_features))
        x = F.gelu(self.conv2(x))
        x = x.transpose(1, 2)  # [N, F/4, D]
        pos = torch.arange(x.shape[1], device=x.device)
        return x + sinusoidal_embedding(pos, self.dim).to(x.dtype)


class AudioEncoder(nn.Module):
    def __init__(self, config: AudioLLMConfig):
        super().__init__()
        d = config.audio_hidden_size
        self.frontend = AudioFrontend(config.n_mels, d)
        self.layers = nn.ModuleList(
            [EncoderBlock(d, config.audio_num_heads, config.audio_intermediate_size) for _ in range(config.audio_num_layers)]
        )
        self.norm = nn.LayerNorm(d, eps=1e-5)

    def forward(self, input_features: torch.Tensor) -> torch.Tensor:
        x = self.frontend(input_features)
        # Whisper-style: padded frames are attended to (no mask), clips are independent (batch dim).
        for layer in self.layers:
            x = layer(x)
        return self.norm(x)


class AudioLLM(nn.Module):
    def __init__(self, config: AudioLLMConfig):
        super().__init__()
        self.config = config
        self.audio = AudioEncoder(config)
        self.projector = GELUMLP(config.audio_hidden_size, config.hidden_size, out_dim=config.hidden_size)
        self.language_model = language_model_from_config(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    def forward(self, input_features: torch.Tensor, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        audio_features = self.audio(input_features)  # [N_clips, F/4, D_audio]
        audio_features = self.projector(audio_features).flatten(0, 1)  # [N_clips * F/4, hidden]
        return merged_lm_loss(self.language_model, self.lm_head, input_ids, audio_features,
                              self.config.audio_token_id, labels)
