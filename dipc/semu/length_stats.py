"""Per-modality length statistics of a microbatch, keyed by module path prefix, for SEMU's
:class:`~dipc.semu.step_model.StepModel` (which layer sees which :class:`LengthStats` is
:func:`~dipc.semu.step_model.stats_for_layer`'s job).

dipc knows the batch layouts of its example models (and the paper models built from them) by
their batch keys; anything else comes from a user hook, ``dipc.compile(..., length_stats=fn)``,
which :func:`pipeline_length_stats` prefers. Nothing here imports model code: what a layout needs
from the model (an audio front-end's time downsampling) is read off the captured model.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from dipc.semu.costs import LengthStats

__all__ = ["batch_length_stats", "pipeline_length_stats"]


def _error(message: str) -> Exception:
    from dipc.semu.step_model import StepModelError

    return StepModelError(message)


def _segments(ids: torch.Tensor, n: int | None = None) -> list[int]:
    if ids.numel() == 0:
        return [0] * (n or 0)
    return torch.bincount(ids.reshape(-1).long(), minlength=n or 0).tolist()


def _time_downsample(captured: Any, key: str, prefix: str, skip: str) -> int:
    """How many of ``key``'s last-dim steps make one position of the first layer under ``prefix``
    (outside ``skip``), read off the captured example batch: e.g. an audio front-end that turns
    ``frames`` mel frames into ``frames / 4`` encoder positions gives 4."""
    gm = captured.graph_module
    frames = None
    for node in gm.graph.nodes:
        if node.op == "placeholder" and node.target == key:
            frames = int(captured.example_values[node.name].shape[-1])
        elif node.op == "call_module" and node.target.startswith(prefix + ".") and \
                not node.target.startswith(skip + ".") and node.target != skip and frames is not None:
            x = captured.example_values.get(node.args[0].name) if node.args and hasattr(node.args[0], "name") else None
            if isinstance(x, torch.Tensor) and x.dim() >= 2 and x.shape[-2] > 0:
                return max(1, round(frames / int(x.shape[-2])))
    raise _error(f"cannot find the first {prefix!r} layer after {skip!r} reading batch key {key!r} in the "
                         "captured model. Fix: pass length_stats= to dipc.compile (per-prefix LengthStats).")


# the keys of a plain text LM's batch (the Hugging Face names): nothing else changes its shapes
_TEXT_KEYS = frozenset({"input_ids", "labels", "attention_mask", "position_ids"})


def batch_length_stats(batch: Mapping[str, Any], captured: Any | None = None) -> dict[str, LengthStats]:
    """Per-modality length statistics of a collated microbatch, keyed by module path prefix, for
    :class:`StepModel`, for the batch layouts dipc knows (the example models' and the paper models
    built from them), recognised by their batch keys:

    - packed images (``image_ids``): ``vision``/``projector``: one packed sequence per image (its
      patch count, from ``image_ids``); ``language_model``/``lm_head``: padded ``input_ids`` ``[B, T]``.
    - padded audio (``input_features [n, mels, frames]``): ``audio.frontend`` padded (n, frames),
      the audio encoder and projector padded (n, frames / r), where the front-end's time
      downsampling ``r`` is read off the ``captured`` model's example values (so ``captured`` is
      required here); the LM as above.
    - packed video (``video_ids``): ``text_encoder``: one packed sequence per caption
      (``text_sample_ids``); ``time_embed``: one token per sample; ``video``, ``blocks``,
      ``final_layer``: one packed sequence per clip, cross-attending to its caption.

    - a text-only LM (``input_ids [B, T]``, plus at most ``labels``, ``attention_mask`` and
      ``position_ids``): every layer padded (B, T), the shape it computes on.
    Any other model: give ``dipc.compile(..., length_stats=fn)`` a function from a microbatch to
    this mapping (:func:`pipeline_length_stats` prefers it).
    """
    if "image_ids" in batch:
        images = [x for x in _segments(batch["image_ids"]) if x > 0]
        b, t = batch["input_ids"].shape
        img, lm = LengthStats.of(images), LengthStats.padded(b, t)
        return {"vision": img, "projector": img, "language_model": lm, "lm_head": lm}
    if "input_features" in batch:
        if captured is None:
            raise _error("an audio batch (input_features) needs the captured model to read the "
                                 "front-end's time downsampling. Fix: batch_length_stats(batch, pipe.captured), "
                                 "or pipeline_length_stats(pipe, batch).")
        n, _, frames = batch["input_features"].shape
        b, t = batch["input_ids"].shape
        enc = LengthStats.padded(n, frames // _time_downsample(captured, "input_features", "audio", "audio.frontend"))
        lm = LengthStats.padded(b, t)
        return {"audio": enc, "audio.frontend": LengthStats.padded(n, frames), "projector": enc,
                "language_model": lm, "lm_head": lm}
    if "video_ids" in batch:
        n = int(batch["timesteps"].shape[0])
        text = _segments(batch["text_sample_ids"], n)
        video = _segments(batch["video_ids"], n)
        vid = LengthStats.of(video, context=text)
        return {"text_encoder": LengthStats.of(text), "time_embed": LengthStats.of([1] * n),
                "video": vid, "blocks": vid, "final_layer": vid}
    ids = batch.get("input_ids")
    if isinstance(ids, torch.Tensor) and ids.dim() == 2 and set(batch) <= _TEXT_KEYS:
        return {"": LengthStats.padded(*ids.shape)}   # a text-only LM: every layer sees [B, T]
    raise _error(f"cannot tell the batch layout from batch keys {sorted(batch)}. Fix: pass "
                         "dipc.compile(..., length_stats=fn) returning per-prefix LengthStats for a microbatch "
                         "(LengthStats.of for packed sequences, LengthStats.padded for [n, T]).")


def pipeline_length_stats(pipe: Any, batch: Mapping[str, Any]) -> dict[str, LengthStats] | LengthStats:
    """The statistics SEMU uses for ``batch`` on ``pipe``: the pipeline's ``length_stats`` hook when
    it has one, else :func:`batch_length_stats` with the pipeline's captured model."""
    hook = getattr(pipe, "length_stats", None)
    if hook is not None:
        return hook(batch)
    return batch_length_stats(batch, pipe.captured)
