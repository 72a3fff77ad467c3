"""Tiny, randomly initialized multimodal example models (pure torch, fx-traceable glue)."""

from .audio_llm import AudioLLM, AudioLLMConfig
from .t2v_dit import T2VConfig, TextToVideoDiT
from .vlm import VisionLanguageModel, VLMConfig

__all__ = [
    "VLMConfig",
    "VisionLanguageModel",
    "AudioLLMConfig",
    "AudioLLM",
    "T2VConfig",
    "TextToVideoDiT",
]
