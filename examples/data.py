"""Seeded synthetic data for the example models, with skewed, realistic size distributions.

Entry point::

    ex = make_example("vlm", seed=0, hidden_size=64)   # overrides go to the model config
    mbs = ex.data.microbatches(num_microbatches=4, samples_per_microbatch=2)
    loss = ex.model(**mbs[0]); w = ex.loss_weight(mbs[0])

Every data source has

* ``samples(n) -> list[sample]``: deterministic given the seed and the call order (one numpy
  ``Generator`` for sizes and one torch ``Generator`` for tensor contents, both seeded).
* ``collate(samples) -> dict[str, Tensor]``: the model's batch (keys = its ``forward`` args).
* ``microbatches(num_microbatches, samples_per_microbatch) -> list[dict]``: ``samples`` then
  ``collate`` per chunk.
* ``edge_case_samples(name, n=1)`` / ``edge_case(name, n=1)`` (collated) for the names in
  ``EDGE_CASES``, e.g. a batch with no images at all or a single huge image.
* ``loss_weight(batch) -> float``: number of loss elements in the batch, so that
  ``sum_mb weight_mb * loss_mb / sum_mb weight_mb`` equals the full-batch mean loss.

Distributions (all sizes are scaled down from real workloads; knobs live in the data configs):

* text tokens per sample (VLM / audio): lognormal, median ``text_median`` (48), sigma 0.8,
  clipped to ``[1, text_max]``; in VLM "caption" mode median 16, sigma 0.5, max 64.
* images per sample (VLM "interleaved"): 35% none, 35% one, 30% a heavy (Zipf a=2) tail
  ``1 + zipf`` capped at ``max_images`` (16). "caption" mode: exactly one image, before the text.
* image resolution in patches: side ``s ~ lognormal(median 4, sigma 0.45)``, aspect ratio
  ``lognormal(0, 0.3)``, ``h = s*sqrt(a)``, ``w = s/sqrt(a)``, rounded and clipped to
  ``[2, 12]`` (grids from 2x2 to 12x12, mostly around 4x4).
* audio clips per sample: 30% none, 50% one, 20% ``1 + zipf(2.5)`` capped at 4; clip length in
  seconds ``lognormal(median 5 s, sigma 0.8)`` clipped to ``[0.5, 30]``; ``frames_per_second``
  (16) mel frames per second (Whisper uses 100; the front-end downsamples by 4).
* video seconds: ``lognormal(median 4 s, sigma 0.7)`` clipped to ``[0.5, 16]``; temporal
  patches = ``ceil(seconds * latent_fps)`` (1 per second by default); spatial latent patch grid:
  side ``lognormal(median 4, sigma 0.35)``, aspect ``lognormal(0, 0.25)``, clipped to ``[2, 8]``.
  Caption tokens: lognormal(median 12, sigma 0.6) clipped to ``[1, 64]``. Timestep: logit-normal
  ``sigmoid(N(0, 1))`` (SD3), clipped into ``(0, 1)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import numpy as np
import torch
from torch import nn

from .models import AudioLLM, AudioLLMConfig, T2VConfig, TextToVideoDiT, VisionLanguageModel, VLMConfig

IGNORE_INDEX = -100
FIRST_TEXT_TOKEN = 4  # ids 0..3 are pad / bos / eos / media placeholder


def _lognormal_int(rng: np.random.Generator, median: float, sigma: float, lo: int, hi: int) -> int:
    return int(np.clip(round(rng.lognormal(math.log(median), sigma)), lo, hi))


def _grid(rng: np.random.Generator, median: float, sigma: float, aspect_sigma: float, lo: int, hi: int):
    side = rng.lognormal(math.log(median), sigma)
    aspect = math.sqrt(rng.lognormal(0.0, aspect_sigma))
    h = int(np.clip(round(side * aspect), lo, hi))
    w = int(np.clip(round(side / aspect), lo, hi))
    return h, w


class _DataBase:
    """Shared RNG handling and microbatching."""

    EDGE_CASES: tuple = ()

    def __init__(self, seed: int):
        self.seed = seed
        self.rng = np.random.default_rng(seed)
        self.gen = torch.Generator().manual_seed(seed)

    # -- to implement ------------------------------------------------------------------------
    def sample(self) -> Any:
        raise NotImplementedError

    def collate(self, samples: list) -> dict:
        raise NotImplementedError

    def loss_weight(self, batch: dict) -> float:
        raise NotImplementedError

    def edge_case_samples(self, name: str, n: int = 1) -> list:
        raise NotImplementedError

    # -- shared ------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """The stream position (both generators), so a resumed run draws the same batches."""
        return {"numpy": self.rng.bit_generator.state, "torch": self.gen.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.rng.bit_generator.state = state["numpy"]
        self.gen.set_state(state["torch"])

    def samples(self, n: int) -> list:
        return [self.sample() for _ in range(n)]

    def microbatches(self, num_microbatches: int, samples_per_microbatch: int) -> list[dict]:
        s = self.samples(num_microbatches * samples_per_microbatch)
        k = samples_per_microbatch
        return [self.collate(s[i * k : (i + 1) * k]) for i in range(num_microbatches)]

    def edge_case(self, name: str, n: int = 1) -> dict:
        return self.collate(self.edge_case_samples(name, n))

    def _text(self, n: int, vocab_size: int) -> torch.Tensor:
        """Text with the statistics a language model can learn: Zipfian unigrams (like real
        tokenised text) and a bigram rule (each token is followed by a fixed successor 60% of the
        time), so a training loss visibly falls below the uniform ``log(vocab)``."""
        span = vocab_size - FIRST_TEXT_TOKEN
        ranks = torch.arange(1, span + 1, dtype=torch.float64)
        zipf = torch.multinomial(1.0 / ranks, max(n, 1), replacement=True, generator=self.gen)
        follow = torch.rand(max(n, 1), generator=self.gen) < 0.6
        out = zipf.clone()
        for i in range(1, n):
            if follow[i]:
                out[i] = (out[i - 1] * 7 + 3) % span
        return (out[:n] + FIRST_TEXT_TOKEN).to(torch.int64)

    def _split_text(self, total: int, parts: int) -> list[int]:
        """Split ``total`` text tokens into ``parts`` (possibly empty) interleaving segments."""
        if parts == 1:
            return [total]
        cuts = np.sort(self.rng.integers(0, total + 1, size=parts - 1))
        bounds = [0, *cuts.tolist(), total]
        return [bounds[i + 1] - bounds[i] for i in range(parts)]


def _pad_stack(seqs: list[torch.Tensor], value: int) -> torch.Tensor:
    t = max(len(s) for s in seqs)
    out = torch.full((len(seqs), t), value, dtype=torch.long)
    for i, s in enumerate(seqs):
        out[i, : len(s)] = s
    return out


def _lm_sequences(samples, placeholder_id: int, media_len, bos: int, eos: int, pad: int):
    """Build right-padded ``input_ids`` / shifted ``labels`` from interleaved segment samples.

    ``media_len(kind, tensor) -> int`` gives the number of placeholder tokens for a media segment.
    ``labels[t]`` is the target for position t (= token t+1), ``-100`` for media, padding and the
    last position.
    """
    ids_list, lab_list = [], []
    for s in samples:
        parts = [torch.tensor([bos])]
        for kind, t in s.segments:
            if kind == "text":
                parts.append(t)
            else:
                parts.append(torch.full((media_len(kind, t),), placeholder_id, dtype=torch.long))
        parts.append(torch.tensor([eos]))
        ids = torch.cat(parts)
        targets = ids.masked_fill(ids == placeholder_id, IGNORE_INDEX)
        labels = torch.cat([targets[1:], torch.tensor([IGNORE_INDEX])])
        ids_list.append(ids)
        lab_list.append(labels)
    return _pad_stack(ids_list, pad), _pad_stack(lab_list, IGNORE_INDEX)


# ---------------------------------------------------------------------------------------------
# VLM
# ---------------------------------------------------------------------------------------------


@dataclass
class VLMDataConfig:
    mode: str = "interleaved"  # "interleaved" | "caption" (exactly one image per sample)
    max_images: int = 16
    min_grid: int = 2
    max_grid: int = 12
    grid_median: float = 4.0
    text_median: float = 48.0
    text_max: int = 512
    huge_grid: tuple = (32, 32)  # the "single_huge_image" edge case


@dataclass
class VLMSample:
    """Interleaved segments: ``("text", LongTensor[L])`` or ``("image", FloatTensor[h, w, 3*p*p])``."""

    segments: list

    @property
    def images(self) -> list[torch.Tensor]:
        return [t for k, t in self.segments if k == "image"]

    @property
    def num_patches(self) -> int:
        return sum(t.shape[0] * t.shape[1] for t in self.images)


class VLMData(_DataBase):
    EDGE_CASES = ("no_images", "single_huge_image")

    def __init__(self, config: VLMConfig, data_config: Optional[VLMDataConfig] = None, seed: int = 0):
        super().__init__(seed)
        self.config = config
        self.dc = data_config or VLMDataConfig()

    def _image(self, h: int, w: int) -> torch.Tensor:
        return torch.randn(h, w, self.config.patch_dim, generator=self.gen)

    def _num_images(self) -> int:
        u = self.rng.random()
        if u < 0.35:
            return 0
        if u < 0.70:
            return 1
        return int(min(self.dc.max_images, 1 + self.rng.zipf(2.0)))

    def _make(self, grids: list[tuple[int, int]], n_text: int, image_first: bool = False) -> VLMSample:
        vocab = self.config.vocab_size
        images = [self._image(h, w) for h, w in grids]
        if image_first:
            segs = [("image", im) for im in images] + [("text", self._text(n_text, vocab))]
            return VLMSample(segs)
        lens = self._split_text(n_text, len(images) + 1)
        segs = []
        for i, n in enumerate(lens):
            if n > 0:
                segs.append(("text", self._text(n, vocab)))
            if i < len(images):
                segs.append(("image", images[i]))
        return VLMSample(segs)

    def sample(self) -> VLMSample:
        dc = self.dc
        if dc.mode == "caption":
            grid = _grid(self.rng, dc.grid_median, 0.45, 0.3, dc.min_grid, dc.max_grid)
            n_text = _lognormal_int(self.rng, 16, 0.5, 1, 64)
            return self._make([grid], n_text, image_first=True)
        if dc.mode != "interleaved":
            raise ValueError(f"unknown VLM data mode {dc.mode!r}")
        k = self._num_images()
        grids = [_grid(self.rng, dc.grid_median, 0.45, 0.3, dc.min_grid, dc.max_grid) for _ in range(k)]
        n_text = _lognormal_int(self.rng, dc.text_median, 0.8, 1, dc.text_max)
        return self._make(grids, n_text)

    def edge_case_samples(self, name: str, n: int = 1) -> list[VLMSample]:
        if name == "no_images":
            return [self._make([], _lognormal_int(self.rng, self.dc.text_median, 0.8, 1, self.dc.text_max)) for _ in range(n)]
        if name == "single_huge_image":
            first = self._make([self.dc.huge_grid], 8, image_first=True)
            return [first] + [self._make([], 8) for _ in range(n - 1)]
        raise ValueError(f"unknown edge case {name!r}; choose from {self.EDGE_CASES}")

    def collate(self, samples: list[VLMSample]) -> dict[str, torch.Tensor]:
        c = self.config
        pix, ids, pos = [], [], []
        img = 0
        for s in samples:
            for im in s.images:
                h, w, d = im.shape
                pix.append(im.reshape(h * w, d))
                ids.append(torch.full((h * w,), img, dtype=torch.long))
                rr, cc = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
                pos.append(torch.stack([rr.reshape(-1), cc.reshape(-1)], dim=-1))
                img += 1
        input_ids, labels = _lm_sequences(
            samples, c.image_token_id, lambda k, t: t.shape[0] * t.shape[1], c.bos_token_id, c.eos_token_id, c.pad_token_id
        )
        return {
            "pixel_values": torch.cat(pix) if pix else torch.zeros(0, c.patch_dim),
            "image_ids": torch.cat(ids) if ids else torch.zeros(0, dtype=torch.long),
            "patch_pos": torch.cat(pos) if pos else torch.zeros(0, 2, dtype=torch.long),
            "input_ids": input_ids,
            "labels": labels,
        }

    def loss_weight(self, batch: dict) -> float:
        return float((batch["labels"] != IGNORE_INDEX).sum())


# ---------------------------------------------------------------------------------------------
# Audio LLM
# ---------------------------------------------------------------------------------------------


@dataclass
class AudioDataConfig:
    max_clips: int = 4
    seconds_median: float = 5.0
    max_seconds: float = 30.0
    frames_per_second: int = 16
    text_median: float = 48.0
    text_max: int = 512


@dataclass
class AudioSample:
    """Interleaved segments: ``("text", LongTensor[L])`` or ``("audio", FloatTensor[n_mels, frames])``."""

    segments: list

    @property
    def clips(self) -> list[torch.Tensor]:
        return [t for k, t in self.segments if k == "audio"]


class AudioData(_DataBase):
    EDGE_CASES = ("no_clips", "single_long_clip")

    def __init__(self, config: AudioLLMConfig, data_config: Optional[AudioDataConfig] = None, seed: int = 0):
        super().__init__(seed)
        self.config = config
        self.dc = data_config or AudioDataConfig()

    def _clip(self, seconds: float) -> torch.Tensor:
        frames = max(1, math.ceil(seconds * self.dc.frames_per_second))
        return torch.randn(self.config.n_mels, frames, generator=self.gen)

    def _num_clips(self) -> int:
        u = self.rng.random()
        if u < 0.3:
            return 0
        if u < 0.8:
            return 1
        return int(min(self.dc.max_clips, 1 + self.rng.zipf(2.5)))

    def _make(self, seconds: list[float], n_text: int) -> AudioSample:
        clips = [self._clip(s) for s in seconds]
        lens = self._split_text(n_text, len(clips) + 1)
        segs = []
        for i, n in enumerate(lens):
            if n > 0:
                segs.append(("text", self._text(n, self.config.vocab_size)))
            if i < len(clips):
                segs.append(("audio", clips[i]))
        return AudioSample(segs)

    def _seconds(self) -> float:
        return float(np.clip(self.rng.lognormal(math.log(self.dc.seconds_median), 0.8), 0.5, self.dc.max_seconds))

    def _n_text(self) -> int:
        return _lognormal_int(self.rng, self.dc.text_median, 0.8, 1, self.dc.text_max)

    def sample(self) -> AudioSample:
        k = self._num_clips()
        secs = [self._seconds() for _ in range(k)]
        return self._make(secs, self._n_text())

    def edge_case_samples(self, name: str, n: int = 1) -> list[AudioSample]:
        if name == "no_clips":
            return [self._make([], self._n_text()) for _ in range(n)]
        if name == "single_long_clip":
            return [self._make([self.dc.max_seconds], 8)] + [self._make([], 8) for _ in range(n - 1)]
        raise ValueError(f"unknown edge case {name!r}; choose from {self.EDGE_CASES}")

    def padded_frames(self, samples: list[AudioSample]) -> int:
        """Frames every clip of the microbatch is padded to: longest clip, rounded up to x4, >= 4."""
        ds = AudioLLMConfig.downsample
        longest = max([c.shape[1] for s in samples for c in s.clips], default=0)
        return max(ds, -(-longest // ds) * ds)

    def collate(self, samples: list[AudioSample]) -> dict[str, torch.Tensor]:
        c = self.config
        frames = self.padded_frames(samples)
        clips = [clip for s in samples for clip in s.clips]
        feats = torch.zeros(len(clips), c.n_mels, frames)
        for i, clip in enumerate(clips):
            feats[i, :, : clip.shape[1]] = clip
        tokens_per_clip = frames // AudioLLMConfig.downsample
        input_ids, labels = _lm_sequences(
            samples, c.audio_token_id, lambda k, t: tokens_per_clip, c.bos_token_id, c.eos_token_id, c.pad_token_id
        )
        return {"input_features": feats, "input_ids": input_ids, "labels": labels}

    def loss_weight(self, batch: dict) -> float:
        return float((batch["labels"] != IGNORE_INDEX).sum())


# ---------------------------------------------------------------------------------------------
# Text-to-video DiT
# ---------------------------------------------------------------------------------------------


@dataclass
class T2VDataConfig:
    seconds_median: float = 4.0
    max_seconds: float = 16.0
    latent_fps: float = 1.0  # temporal latent patches per second of video
    grid_median: float = 4.0
    min_grid: int = 2
    max_grid: int = 8
    caption_median: float = 12.0
    caption_max: int = 64


@dataclass
class T2VSample:
    text_ids: torch.Tensor  # [L]
    latents: torch.Tensor  # [t, h, w, C*pt*ph*pw] (patchified)
    noise: torch.Tensor  # same shape
    timestep: float


class T2VData(_DataBase):
    EDGE_CASES = ("single_long_video", "single_frame")

    def __init__(self, config: T2VConfig, data_config: Optional[T2VDataConfig] = None, seed: int = 0):
        super().__init__(seed)
        self.config = config
        self.dc = data_config or T2VDataConfig()

    def _make(self, t: int, h: int, w: int, n_text: int) -> T2VSample:
        text = self._text(n_text, self.config.text_vocab_size)
        shape = (t, h, w, self.config.patch_dim)
        latents = torch.randn(shape, generator=self.gen)
        noise = torch.randn(shape, generator=self.gen)
        ts = float(np.clip(1.0 / (1.0 + math.exp(-self.rng.normal())), 1e-3, 1 - 1e-3))
        return T2VSample(text, latents, noise, ts)

    def sample(self) -> T2VSample:
        dc = self.dc
        secs = float(np.clip(self.rng.lognormal(math.log(dc.seconds_median), 0.7), 0.5, dc.max_seconds))
        t = max(1, math.ceil(secs * dc.latent_fps))
        h, w = _grid(self.rng, dc.grid_median, 0.35, 0.25, dc.min_grid, dc.max_grid)
        n_text = _lognormal_int(self.rng, dc.caption_median, 0.6, 1, dc.caption_max)
        return self._make(t, h, w, n_text)

    def edge_case_samples(self, name: str, n: int = 1) -> list[T2VSample]:
        dc = self.dc
        if name == "single_long_video":
            first = self._make(max(1, math.ceil(dc.max_seconds * dc.latent_fps)), dc.max_grid, dc.max_grid, dc.caption_max)
            return [first] + [self._make(1, dc.min_grid, dc.min_grid, 1) for _ in range(n - 1)]
        if name == "single_frame":
            return [self._make(1, dc.min_grid, dc.min_grid, 1) for _ in range(n)]
        raise ValueError(f"unknown edge case {name!r}; choose from {self.EDGE_CASES}")

    def collate(self, samples: list[T2VSample]) -> dict[str, torch.Tensor]:
        text_ids, text_sid, text_pos = [], [], []
        lat, noi, vid, vpos = [], [], [], []
        for i, s in enumerate(samples):
            n = s.text_ids.shape[0]
            text_ids.append(s.text_ids)
            text_sid.append(torch.full((n,), i, dtype=torch.long))
            text_pos.append(torch.arange(n))
            t, h, w, d = s.latents.shape
            lat.append(s.latents.reshape(-1, d))
            noi.append(s.noise.reshape(-1, d))
            vid.append(torch.full((t * h * w,), i, dtype=torch.long))
            grid = torch.stack(torch.meshgrid(torch.arange(t), torch.arange(h), torch.arange(w), indexing="ij"), dim=-1)
            vpos.append(grid.reshape(-1, 3))
        return {
            "text_ids": torch.cat(text_ids),
            "text_sample_ids": torch.cat(text_sid),
            "text_pos": torch.cat(text_pos),
            "latents": torch.cat(lat),
            "noise": torch.cat(noi),
            "video_ids": torch.cat(vid),
            "video_pos": torch.cat(vpos),
            "timesteps": torch.tensor([s.timestep for s in samples], dtype=torch.float32),
        }

    def loss_weight(self, batch: dict) -> float:
        return float(batch["latents"].numel())


# ---------------------------------------------------------------------------------------------
# make_example
# ---------------------------------------------------------------------------------------------


@dataclass
class Example:
    name: str
    model: nn.Module
    config: Any
    data: _DataBase
    collate: Callable[[list], dict] = field(repr=False)
    loss_weight: Callable[[dict], float] = field(repr=False)


_REGISTRY = {
    "vlm": (VLMConfig, VisionLanguageModel, VLMData, VLMDataConfig),
    "audio_llm": (AudioLLMConfig, AudioLLM, AudioData, AudioDataConfig),
    "t2v": (T2VConfig, TextToVideoDiT, T2VData, T2VDataConfig),
}
EXAMPLE_NAMES = tuple(_REGISTRY)


def make_example(name: str, seed: int = 0, data_config: Optional[dict] = None, **config_overrides) -> Example:
    """Build example ``name`` ("vlm" | "audio_llm" | "t2v").

    ``config_overrides`` are fields of the model config (e.g. ``num_layers=8``); ``data_config``
    is a dict of data-config fields (e.g. ``{"mode": "caption"}`` for the VLM). The model is built
    under ``torch.manual_seed(seed)`` and the data source is seeded with ``seed``.
    """
    if name not in _REGISTRY:
        raise ValueError(f"unknown example {name!r}; choose from {EXAMPLE_NAMES}")
    config_cls, model_cls, data_cls, data_config_cls = _REGISTRY[name]
    config = config_cls(**config_overrides)
    torch.manual_seed(seed)
    model = model_cls(config)
    data = data_cls(config, data_config_cls(**(data_config or {})), seed=seed)
    return Example(name, model, config, data, data.collate, data.loss_weight)
