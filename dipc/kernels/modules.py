"""Thin ``nn.Module`` faces of the fused ops, built from the module they replace and sharing its
``Parameter`` objects (so optimizers, gradients and ``state_dict`` keys are unchanged).

Each ``forward`` runs the fused op when it can and the replaced module's exact semantics
otherwise (e.g. a bf16 input with fp32 weights under autocast-style mixed precision).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .activations import gelu
from .layer_norm import layer_norm
from .rms_norm import rms_norm, rms_norm_reference

__all__ = ["FusedGELU", "FusedLayerNorm", "FusedRMSNorm"]


class FusedRMSNorm(nn.Module):
    """LLaMA RMSNorm on the fused kernel. ``FusedRMSNorm.from_module(m)`` shares ``m.weight``."""

    def __init__(self, weight: nn.Parameter, eps: float):
        super().__init__()
        self.weight = weight
        self.eps = float(eps)

    @classmethod
    def from_module(cls, module: nn.Module) -> "FusedRMSNorm":
        eps = getattr(module, "eps", getattr(module, "variance_epsilon", None))
        return cls(module.weight, eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != self.weight.dtype or x.device != self.weight.device:
            return rms_norm_reference(x, self.weight, self.eps)
        return rms_norm(x, self.weight, self.eps)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


class FusedLayerNorm(nn.Module):
    """``nn.LayerNorm`` over the last dim on the fused kernel; weight/bias shared (or None)."""

    def __init__(self, normalized_shape: tuple[int, ...], weight: nn.Parameter | None,
                 bias: nn.Parameter | None, eps: float):
        super().__init__()
        self.normalized_shape = tuple(normalized_shape)
        self.weight = weight
        self.bias = bias
        self.eps = float(eps)

    @classmethod
    def from_module(cls, module: nn.LayerNorm) -> "FusedLayerNorm":
        return cls(module.normalized_shape, module.weight, module.bias, module.eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        params = [p for p in (self.weight, self.bias) if p is not None]
        if len(self.normalized_shape) != 1 or any(p.dtype != x.dtype or p.device != x.device for p in params):
            return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return layer_norm(x, self.weight, self.bias, self.eps)

    def extra_repr(self) -> str:
        return f"{self.normalized_shape}, eps={self.eps}, affine={self.weight is not None}"


class FusedGELU(nn.Module):
    def __init__(self, approximate: str = "none"):
        super().__init__()
        self.approximate = approximate

    @classmethod
    def from_module(cls, module: nn.GELU) -> "FusedGELU":
        return cls(module.approximate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return gelu(x, self.approximate)

    def extra_repr(self) -> str:
        return f"approximate={self.approximate!r}"
