"""Vision-language model: NaViT-style ViT over packed variable-resolution patches + LLaMA LLM.

Batch keys (see ``examples.data.VLMData.collate``):

* ``pixel_values`` float ``[total_patches, 3*p*p]``: all patches of all images in the microbatch.
* ``image_ids`` int64 ``[total_patches]``: image index of each patch (encoder attention is
  block-diagonal over images).
* ``patch_pos`` int64 ``[total_patches, 2]``: (row, col) of each patch in its image grid.
* ``input_ids`` int64 ``[B, T]``: right-padded text with ``image_token_id`` once per patch.
* ``labels`` int64 ``[B, T]``: already shifted targets, ``-100`` = ignore.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .layers import EncoderBlock, GELUMLP, language_model_from_config, merged_lm_loss


@dataclass
class VLMConfig:
    # special tokens / vocab
    vocab_size: int = 256
    pad_token_id: int = 0
    bos_token_id: int = 1
    eos_token_id: int = 2
    image_token_id: int = 3
    # vision tower
    patch_size: int = 4
    num_channels: int = 3
    vision_hidden_size: int = 32
    vision_num_layers: int = 4
    vision_num_heads: int = 2
    vision_intermediate_size: int = 64
    max_grid_size: int = 64  # max patches per image side (learned 2D position table size)
    # language model
    hidden_size: int = 64
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 128
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6

    @property
    def patch_dim(self) -> int:
        return self.num_channels * self.patch_size * self.patch_size


class PatchPositionEmbedding2D(nn.Module):
    """Learned factorized 2D position embedding: ``row_embed[r] + col_embed[c]``."""

    def __init__(self, max_grid_size: int, dim: int):
        super().__init__()
        self.row_embed = nn.Embedding(max_grid_size, dim)
        self.col_embed = nn.Embedding(max_grid_size, dim)

    def forward(self, patch_pos: torch.Tensor) -> torch.Tensor:
        return self.row_embed(patch_pos[:, 0]) + self.col_embed(patch_pos[:, 1])


class VisionTransformer(nn.Module):
    """ViT encoder over packed patches of many images (NaViT "patch n' pack")."""

    def __init__(self, config: VLMConfig):
        super().__init__()
        d = config.vision_hidden_size
        self.patch_embed = nn.Linear(config.patch_dim, d)
        self.pos_embed = PatchPositionEmbedding2D(config.max_grid_size, d)
        self.blocks = nn.ModuleList(
            [EncoderBlock(d, config.vision_num_heads, config.vision_intermediate_size) for _ in range(config.vision_num_layers)]
        )
        self.norm = nn.LayerNorm(d, eps=1e-6)

    def forward(self, pixel_values: torch.Tensor, image_ids: torch.Tensor, patch_pos: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(pixel_values) + self.pos_embed(patch_pos)
        # block-diagonal: a patch only attends to patches of the same image
        attn_mask = image_ids[:, None] == image_ids[None, :]
        for block in self.blocks:
            x = block(x, attn_mask)
        return self.norm(x)


class VisionLanguageModel(nn.Module):
    def __init__(self, config: VLMConfig):
        super().__init__()
        self.config = config
        self.vision = VisionTransformer(config)
        self.projector = GELUMLP(config.vision_hidden_size, config.hidden_size, out_dim=config.hidden_size)
        self.language_model = language_model_from_config(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    def forward(
        self,
        pixel_values: torch.Tensor,
        image_ids: torch.Tensor,
        patch_pos: torch.Tensor,
        input_ids: torch.Tensor,
        labels: torch.Tensor,
    ) -> torch.Tensor:
        image_features = self.vision(pixel_values, image_ids, patch_pos)
        image_features = self.projector(image_features)  # [total_patches, hidden]
        return merged_lm_loss(self.language_model, self.lm_head, input_ids, image_features,
                              self.config.image_token_id, labels)
