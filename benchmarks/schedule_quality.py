"""Schedule quality at paper scale: DIP against the paper's baselines, on SEMU, over skewed batches.

Issue 5's benchmark (item 6). **Simulated, not measured**: every number is SEMU's step emulator on
a cluster profile (H800 by default; §7.7's large-scale configs on H100), not a GPU run. The JSON
says so too (``honesty``).

Workloads (``--models``): VLM-S/M/L (ViT + LM) and T2V-S/L (LM text encoder + DiT) at the paper's
TP x PP, plus the large-scale VLM-XL-8k / T2V-XL-3k with data parallelism; all built on ``meta``.

- VLM batches come from three regimes (one per batch, cycled): ``interleaved`` (OBELICS-like
  documents: text lognormal(median 700, sigma 0.9), images ``zipf(2)`` per document, 35% with
  none), ``caption`` (LAION-like pairs: one image, caption lognormal(24, 0.6)) and ``mixed`` (runs
  of geometric length, mean 8 samples, from interleaved / caption / text-only (lognormal(1200, 1.0))
  / ScienceQA-like sources, 35/30/20/15%), greedily packed into 8192-token sequences of <= 48 images
  (169 LM tokens per image), one sequence per microbatch; plus the paper's rise-and-fall image-count
  trace (:func:`rise_and_fall`). The ViT sees ``--vit-tokens`` per image: 2704 by default (Qwen2-VL's
  728 px / patch 14 before the 4x4 merge — what reproduces the paper's ViT layer time in
  ``paper_checks.py``), or 169.
- T2V batches: paper_checks.py's clips (lognormal seconds, MovieGen aspects, 16 FPS, <= 8 clips and
  <= 16 s per microbatch), grouped by aspect and duration (``video-caption``) or not (``mixed-video``).
- The distributions are assumptions: the paper does not publish them.

Schedules (one row each; ``role`` baseline / ablation / dip):

- ``megatron interleaved`` (the reference of every ratio): Megatron-LM VPP, V=2, chunks of equal
  parameter count over the mixed model; ``nnscaler* 1f1b``: one mixed segment, the best static split
  (SEMU time) for a representative batch, 1F1B; ``optimus* coarse``: every encoder forward first,
  the backbone's (interleaved) 1F1B, every encoder backward last, on DIP's layout; plus gpipe, 1f1b,
  zb_h1 and interleaved 1F1B on a modality split.
- ``DIP planner`` (role ``dip``): :func:`dip_planner`, what a training job runs per batch, timed as
  a whole from empty SEMU caches (wall and CPU time; the machine may be shared, so the batch's
  load average is recorded): the microbatch order (as drawn, or lightest first where the
  compute-order bound says it pays: :func:`microbatch_order`), then candidates on DIP's fixed
  layout — its interleaved 1F1B with and without sub-microbatches, the dual queue under two
  priority rules, the encoder-first order and bounded encoder look-ahead orders over
  sub-microbatches (optionally MCTS, ``--planner-budget``) — each simulated once as it is, then
  phase 3 by branch and bound on that lower bound.
- DIP ablation (role ``ablation``; ``--no-ablation`` skips them), cumulative (each row adds
  candidates and keeps the fastest by SEMU): ``partitioner only`` (the K_i layout under interleaved
  1F1B), ``+interleaving`` (phase 2: the dual queue under three priority rules), ``+reordering``
  (phase 1: MCTS over (modality, microbatch) segment rankings), ``+zero-bubble split`` (beyond the
  paper), ``+sub-microbatches`` (§4: the encoder's items split into ceil(N_i / B_i) subs scheduled
  as their own tasks), ``+encoder-first order`` (the coarse order Optimus* uses, with the batch's
  sub-microbatches; ``picked`` counts how often it wins). Their ``plan_ms`` is each row's own
  time with phase 3 run on it, not a planner latency.
- Memory: every schedule whose program overflows the device goes through phase 3
  (:func:`dipc.semu.memory_opt.optimize_memory`: the per-rank recompute ILP), baselines too — a
  practitioner would recompute to fit rather than run out of memory. Phase 2 holds forwards back
  at the frugal stash (every memory-saving layer recomputed, the paper's assumption).

Metrics per schedule over batches: throughput relative to Megatron (mean, p10, max), against the
best baseline on the same batch (mean, worst), bubble fraction, no-bubble bound fraction, peak
memory vs capacity, planner latency (median / p99 ms; DIP rows sum their candidates' time).

Run::

    python benchmarks/schedule_quality.py [--models vlm_s,t2v_s] [--batches 100] [--budget 0.4]
"""
from __future__ import annotations

import argparse
import os
import functools
import re
import json
import math
import statistics
from collections import Counter
import sys
import time
from collections.abc import Callable, Mapping, Sequence
import dataclasses
from dataclasses import dataclass, field
from typing import Any
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from dipc.errors import DipcError, ScheduleError  # noqa: E402
from dipc.ir import Op, StageInfo, TensorSpec  # noqa: E402
from dipc.ir.validate import validate  # noqa: E402
from dipc.passes.capture import capture  # noqa: E402
from dipc.passes.codegen import lower  # noqa: E402
from dipc.passes.dual_queue import TaskCosts, dual_queue_schedule  # noqa: E402
from dipc.passes.encoder_ahead import ENCODER_AHEAD, encoder_ahead_orders  # noqa: E402
from dipc.passes.schedules import SCHEDULES, ComputeAction, expand_subs  # noqa: E402
from dipc.ir.recompute import recompute_plan, with_recompute  # noqa: E402
from dipc.semu.memory_opt import Phase3Tables, optimize_memory, refine_per_microbatch  # noqa: E402
from dipc.passes.priorities import critical_path_priority, grouped_priority, microbatch_priority  # noqa: E402
from dipc.passes.segment_order import mcts_order, priority_from_order  # noqa: E402
from dipc.semu.costs import CostModel, LengthStats, layer_cost_model  # noqa: E402
from dipc.semu.models import IMAGE_TOKENS, PAPER_MODELS, SEQ_LEN, build_paper_model, paper_example_batch  # noqa: E402
from dipc.semu.profiles import DTYPE_BYTES, load_preset  # noqa: E402
from dipc.semu.step_model import StepModel, best_contiguous_split, stats_for_layer  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "schedule_quality.json"

PROFILE = "h800"
MAX_IMAGES = SEQ_LEN // IMAGE_TOKENS          # 48
VIT_PATCHES = 52 * 52                          # Qwen2-VL: 728 px / patch 14, before the 4x4 merge
REGIMES = ("interleaved", "caption", "mixed")
MIXED_SOURCES = (("interleaved", 0.35), ("caption", 0.30), ("text", 0.20), ("scienceqa", 0.15))
MIXED_RUN_MEAN = 8                             # mean samples per same-source run in "mixed"
MESSAGE_DTYPE = "bfloat16"

HONESTY = {
    "dip_phases_implemented": [
        "offline partitioner: per-module K_i segments (K_i = floor(T_i / T_1) at B_i, capped at 2 blocks per chunk)",
        "sub-microbatches: M_i = ceil(N_i / B_i) per microbatch, scheduled as separate dual-queue tasks",
        "phase 1: MCTS over (modality, microbatch) segment rankings, seeded with heuristic rankings",
        "phase 2: greedy dual-queue interleaving (+ zero-bubble split, + critical-path / grouped priority rules)",
        "phase 3: per-rank recompute ILP (scipy HiGHS, 5% gap) over none / selective / full checkpointing per "
        "layer, per stage while candidates are compared, then the winner refitted per (stage, microbatch) in "
        "what is left of the planner's budget (the runtime switches checkpointing per microbatch)",
        "planner: best-first branch and bound over three bounds (compute orders without messages, the "
        "unfitted simulation, phase 3), at most 4 ILP rounds per batch, cyclic GC paused while planning; MCTS "
        "rollouts score the all-recompute bound",
        "beyond the paper: bounded encoder look-ahead orders (encoder_ahead_orders), also around a ZB-H1 backbone",
        "planner: the batch's microbatches run lightest first (phase 1's lightest-first seed ranking) where that lowers "
        "the encoder look-ahead orders' compute-order bound by >= 2% (microbatch_order); baselines run them as drawn",
        "offline interleaving depth: every K_i times v, v chosen by simulating DIP's planner on 4 sample batches of the "
        "run's own data (choose_interleave); the rise-and-fall trace is a run of its own, so its DIP placement is "
        "chosen on samples of the trace (other draws, at iterations 2, 7, 12, 17); baselines keep their layouts"],
    "not_implemented": ["B_i from profiled efficiency (here from SEMU's modelled efficiency curve, "
                        "choose_sub_size; --b-enc fixes it)", "offloading",
                        "MCTS inside the timed planner by default (--planner-budget 0)"],
    "simulated_not_measured": True,
    "simulator": "SEMU StepModel + step emulator (analytical, uncalibrated GPU efficiency curves)",
}


# ------------------------------------------------------------------------------------------------
# data: skewed samples packed into 8192-token sequences


@dataclass(frozen=True, slots=True)
class Microbatch:
    """One packed sequence: per-sample text tokens and image counts, and where they came from."""

    text: tuple[int, ...]
    images: tuple[int, ...]
    regime: str

    @property
    def num_images(self) -> int:
        return sum(self.images)

    @property
    def tokens(self) -> int:
        return sum(self.text) + IMAGE_TOKENS * self.num_images


def _lognormal(rng: np.random.Generator, median: float, sigma: float, lo: int, hi: int) -> int:
    return int(np.clip(round(rng.lognormal(math.log(median), sigma)), lo, hi))


def draw_sample(rng: np.random.Generator, source: str) -> tuple[int, int]:
    """(text tokens, images) of one sample from ``source`` (see the module docstring)."""
    if source == "interleaved":
        images = 0 if rng.random() < 0.35 else min(int(rng.zipf(2.0)), MAX_IMAGES)
        return _lognormal(rng, 700, 0.9, 32, SEQ_LEN), images
    if source == "caption":
        return _lognormal(rng, 24, 0.6, 4, 256), 1
    if source == "text":
        return _lognormal(rng, 1200, 1.0, 16, SEQ_LEN), 0
    if source == "scienceqa":
        return _lognormal(rng, 250, 0.5, 16, 2048), int(rng.random() < 0.5)
    raise ValueError(f"unknown source {source!r}")


def _sample_stream(rng: np.random.Generator, regime: str):
    names = [s for s, _ in MIXED_SOURCES]
    probs = [p for _, p in MIXED_SOURCES]
    while True:
        if regime == "mixed":
            source = names[int(rng.choice(len(names), p=probs))]
            for _ in range(int(rng.geometric(1 / MIXED_RUN_MEAN))):
                yield draw_sample(rng, source)
        else:
            yield draw_sample(rng, regime)


def pack_batch(rng: np.random.Generator, regime: str, num_microbatches: int) -> list[Microbatch]:
    """``num_microbatches`` greedily packed sequences (<= 8192 tokens, <= 48 images). A sample that
    does not fit closes the sequence and opens the next; one longer than a sequence is cut."""
    out: list[Microbatch] = []
    text: list[int] = []
    images: list[int] = []
    for t, n in _sample_stream(rng, regime):
        n = min(n, MAX_IMAGES)
        t = max(1, min(t, SEQ_LEN - IMAGE_TOKENS * n))
        used = sum(text) + IMAGE_TOKENS * sum(images)
        if text and (used + t + IMAGE_TOKENS * n > SEQ_LEN or sum(images) + n > MAX_IMAGES):
            out.append(Microbatch(tuple(text), tuple(images), regime))
            text, images = [], []
            if len(out) == num_microbatches:
                return out
        text.append(t)
        images.append(n)
    raise AssertionError("unreachable")


def microbatch_stats(mb: Microbatch, vit_tokens: int) -> dict[str, LengthStats]:
    """Per-prefix statistics: the ViT sees one sequence of ``vit_tokens`` per image, the projector
    the 169 merged tokens per image, the LM one packed sequence of the microbatch's tokens."""
    n = mb.num_images
    lm = LengthStats.padded(1, mb.tokens)
    return {"vision": LengthStats.of([vit_tokens] * n), "projector": LengthStats.of([IMAGE_TOKENS] * n),
            "language_model": lm, "lm_head": lm}


# ------------------------------------------------------------------------------------------------
# T2V data: video clips grouped by aspect ratio and duration into <= 8 clips, < 16 s per microbatch


@dataclass(frozen=True, slots=True)
class Clips:
    """One T2V microbatch: per clip (seconds, aspect, caption tokens)."""

    clips: tuple[tuple[float, str, int], ...]
    regime: str


def pack_clips(rng: np.random.Generator, regime: str, num_microbatches: int) -> list[Clips]:
    """``video-caption``: clips grouped by (aspect, duration bucket) as MovieGen-style loaders do
    (paper_checks.py's packing); ``mixed-video``: the same clips without grouping."""
    from paper_checks import pack_t2v_batches

    seed = int(rng.integers(0, 2**31 - 1))
    return [Clips(tuple(b), regime) for b in pack_t2v_batches(num_microbatches, seed=seed,
                                                              group=regime == "video-caption")]


# ------------------------------------------------------------------------------------------------
# workloads: a paper model, its modalities and its data


@dataclass(frozen=True)
class Workload:
    """What the benchmark needs of one paper workload: which layers are the encoder module, how to
    draw a batch per regime and turn a microbatch into per-module length statistics."""

    model: str
    encoder: str                                  # modality name of the encoder module
    encoder_prefixes: tuple[str, ...]             # layer path prefixes of the encoder module
    regimes: tuple[str, ...]
    draw: Callable[[np.random.Generator, str, int, int], list]   # (rng, regime, iteration, M) -> mbs
    stats: Callable[[Any], dict[str, LengthStats]]
    unit_stats: Callable[[int], dict[str, LengthStats]]       # B encoder items + one backbone sequence
    describe_mb: Callable[[list], dict]
    example_batch: Callable[[], dict]
    unit: str                                     # what an encoder item is (for B_i)
    default_b: int
    num_items: Callable[[Any], int]               # encoder items (images, captions) of a microbatch
    part_stats: Callable[[Any, int, int], dict[str, LengthStats]]   # stats with encoder items [a, b) only

    def sub_counts(self, mbs: Sequence[Any], b: int) -> tuple[int, ...]:
        """M_i = ceil(N_i / B_i) sub-microbatches per microbatch (at least one)."""
        return tuple(max(1, math.ceil(self.num_items(mb) / b)) for mb in mbs)

    def sub_stats(self, mbs: Sequence[Any], counts: Sequence[int]) -> dict[tuple[int, int], dict[str, LengthStats]]:
        """Per (mb, sub): the microbatch's statistics with its encoder items spread evenly over its subs."""
        out = {}
        for m, (mb, n) in enumerate(zip(mbs, counts)):
            items = self.num_items(mb)
            bounds = [round(items * j / n) for j in range(n + 1)]
            for j in range(n):
                out[(m, j)] = self.part_stats(mb, bounds[j], bounds[j + 1])
        return out

    def is_encoder(self, path: str) -> bool:
        return path.startswith(self.encoder_prefixes)

    @property
    def paper(self):
        return PAPER_MODELS[self.model]


def vlm_workload(model: str = "vlm_s", vit_tokens: int = VIT_PATCHES) -> Workload:
    """A VLM: the ViT (+ projector) is the encoder; image-text regimes plus the rise-and-fall trace."""
    def stats(mb: Microbatch) -> dict[str, LengthStats]:
        return microbatch_stats(mb, vit_tokens)

    def unit(b: int) -> dict[str, LengthStats]:
        lm = LengthStats.padded(1, SEQ_LEN)
        return {"vision": LengthStats.of([vit_tokens] * b), "projector": LengthStats.of([IMAGE_TOKENS] * b),
                "language_model": lm, "lm_head": lm}

    def draw(rng, regime, i, M):
        return rise_and_fall(rng, i, M) if regime == "rise_fall" else pack_batch(rng, regime, M)

    return Workload(model=model, encoder="vision", encoder_prefixes=("vision", "projector"), regimes=REGIMES,
                    draw=draw, stats=stats, unit_stats=unit,
                    describe_mb=lambda mbs: {"images": [mb.num_images for mb in mbs], "tokens": [mb.tokens for mb in mbs]},
                    example_batch=lambda: paper_example_batch(model, num_images=8), unit="images", default_b=12,
                    num_items=lambda mb: mb.num_images,
                    part_stats=lambda mb, a, b: {**stats(mb), "vision": LengthStats.of([vit_tokens] * (b - a)),
                                                 "projector": LengthStats.of([IMAGE_TOKENS] * (b - a))})


def t2v_workload(model: str = "t2v_s") -> Workload:
    """A T2V model: the LM text encoder is the encoder, the DiT the backbone; video-caption regimes."""
    from paper_checks import t2v_batch_stats

    def unit(b: int) -> dict[str, LengthStats]:   # b captions of 128 tokens; one 8-clip, 16 s microbatch
        return t2v_batch_stats([(2.0, "1:1", 128)] * b)

    return Workload(model=model, encoder="text", encoder_prefixes=("text_encoder",),
                    regimes=("video-caption", "mixed-video"),
                    draw=lambda rng, regime, i, M: pack_clips(rng, regime, M),
                    stats=lambda mb: t2v_batch_stats(list(mb.clips)), unit_stats=unit,
                    describe_mb=lambda mbs: {"clips": [len(mb.clips) for mb in mbs],
                                             "seconds": [round(sum(c[0] for c in mb.clips), 2) for mb in mbs]},
                    example_batch=lambda: paper_example_batch(model, clip_seconds=(2.0, 3.0, 1.0)),
                    unit="captions", default_b=8, num_items=lambda mb: len(mb.clips),
                    part_stats=lambda mb, a, b: {**t2v_batch_stats(list(mb.clips)), "text_encoder": LengthStats.of(
                        [c[2] for c in mb.clips[a:b]] or [1])})


WORKLOADS: dict[str, Callable[..., Workload]] = {
    "vlm_s": lambda **kw: vlm_workload("vlm_s", **kw), "vlm_m": lambda **kw: vlm_workload("vlm_m", **kw),
    "vlm_l": lambda **kw: vlm_workload("vlm_l", **kw),
    "t2v_s": lambda **kw: t2v_workload("t2v_s"), "t2v_l": lambda **kw: t2v_workload("t2v_l"),
    "vlm_xl_8k": lambda **kw: vlm_workload("vlm_xl_8k", **kw), "t2v_xl_3k": lambda **kw: t2v_workload("t2v_xl_3k"),
}


@functools.lru_cache(maxsize=None)
def _cost_model(model: str) -> CostModel:
    wl = WORKLOADS[model]()
    net = build_paper_model(model).to(torch.bfloat16)
    batch = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in wl.example_batch().items()}
    return layer_cost_model(capture(net, batch))


def cost_model(wl: "Workload") -> CostModel:
    return _cost_model(wl.model)


_BLOCK = re.compile(r"(^|\.)(blocks|layers)\.\d+$")


@dataclass(frozen=True)
class Layout:
    """A stage layout: ``stage_layers[s]`` on rank ``s % P``; ``stage_modality[s]`` is ``vision``,
    ``backbone`` or ``mixed`` (a stage holding layers of both)."""

    name: str
    P: int
    stage_layers: tuple[tuple[str, ...], ...]
    stage_modality: tuple[str, ...]
    stage_ms: tuple[float, ...]          # fwd+bwd at the representative microbatch (mean)
    rule: str                            # how it was cut, for the JSON / table
    is_encoder: Callable[[str], bool]
    candidates: dict = field(default_factory=dict)   # k -> slowest stage ms (modality split search)

    @property
    def V(self) -> int:
        return len(self.stage_layers) // self.P

    @property
    def vit_stages(self) -> int:
        return sum(m == "vision" for m in self.stage_modality)

    @property
    def stages(self) -> list[StageInfo]:
        S = len(self.stage_layers)
        first_lm = next(s for s, ls in enumerate(self.stage_layers) if any(not self.is_encoder(p) for p in ls))
        out = []
        for s in range(S):
            loads = ("encoder_inputs",) if s == 0 else ()
            if s == first_lm:
                loads = loads + ("backbone_inputs",)
            out.append(StageInfo(id=s, rank=s % self.P, modality=self.stage_modality[s],
                                 producers=(s - 1,) if s else (), grad_producers=(s - 1,) if s else (),
                                 loads=loads, has_loss=s == S - 1))
        return out

    def describe(self) -> str:
        parts = []
        for s, layers in enumerate(self.stage_layers):
            enc = sum(1 for p in layers if self.is_encoder(p) and _BLOCK.search(p))
            bb = sum(1 for p in layers if not self.is_encoder(p) and _BLOCK.search(p))
            vit, lm = enc, bb
            kind = "+".join(k for k, n in (("enc", vit), ("backbone", lm)) if n) or "glue"
            parts.append(f"s{s}@r{s % self.P} {kind} {vit + lm} blocks ({self.stage_ms[s]:.0f} ms)")
        return "; ".join(parts)


def _layer_ms(cm: CostModel, cluster, tp: int, rep: Sequence[dict[str, LengthStats]]) -> dict[str, float]:
    layers = list(cm.layers)
    step = StepModel(cm, cluster, [layers], list(rep), tp=tp, dtype="bfloat16")
    return {p: statistics.fmean(step.layer_time(p, stats_for_layer(s, p)).total for s in rep) * 1e3 for p in layers}


def _cut(seq: Sequence[str], weights: Sequence[float], n: int) -> list[tuple[str, ...]]:
    sizes = best_contiguous_split(list(weights), n)
    out, i = [], 0
    for size in sizes:
        out.append(tuple(seq[i:i + size]))
        i += size
    return out


def _modality(wl: Workload, layers: Sequence[str]) -> str:
    kinds = {wl.is_encoder(p) for p in layers}
    return "mixed" if len(kinds) == 2 else (wl.encoder if True in kinds else "backbone")


def _make(wl: Workload, name: str, P: int, parts: Sequence[tuple[str, ...]], ms: Mapping[str, float], rule: str,
          candidates: dict | None = None, modality: Sequence[str] | None = None) -> Layout:
    return Layout(name=name, P=P, stage_layers=tuple(parts),
                  stage_modality=tuple(modality or [_modality(wl, x) for x in parts]),
                  stage_ms=tuple(sum(ms[p] for p in x) for x in parts), rule=rule, is_encoder=wl.is_encoder,
                  candidates=candidates or {})


def choose_layout(wl: Workload, cm: CostModel, cluster, tp: int, rep: Sequence[dict[str, LengthStats]], P: int,
                  V: int) -> Layout:
    """ViT on ``k`` contiguous stages, LM on the rest, each segment balanced by SEMU's per-layer
    fwd+bwd time averaged over the representative microbatches; ``k`` minimises the slowest stage."""
    ms = _layer_ms(cm, cluster, tp, rep)
    layers = list(cm.layers)
    vit = [p for p in layers if wl.is_encoder(p)]
    lm = [p for p in layers if not wl.is_encoder(p)]
    S = P * V
    best, cands = None, {}
    for k in range(1, S):
        parts = _cut(vit, [ms[p] for p in vit], k) + _cut(lm, [ms[p] for p in lm], S - k)
        slowest = max(sum(ms[p] for p in x) for x in parts)
        cands[k] = slowest
        if best is None or slowest < best[0] - 1e-12:
            best = (slowest, k, parts)
    _, k, parts = best
    return _make(wl, f"modality split V={V}", P, parts, ms, f"encoder on {k} of {S} stages; min slowest stage",
                 cands, [wl.encoder] * k + ["backbone"] * (S - k))


def mixed_layout(wl: Workload, cm: CostModel, cluster, tp: int, rep: Sequence[dict[str, LengthStats]], P: int, V: int,
                 by: str) -> Layout:
    """One mixed segment over all layers in model order, cut into ``P*V`` contiguous chunks:
    ``by="params"`` equal parameter counts (Megatron-LM's VPP as the paper ran it), ``by="time"``
    the best static split for the representative batch (nnScaler*)."""
    ms = _layer_ms(cm, cluster, tp, rep)
    layers = list(cm.layers)
    if by == "params":
        stat = rep[0]
        w = [float(cm.cost(p, stats_for_layer(stat, p)).num_params) for p in layers]
        rule = "equal parameters per chunk"
    else:
        w = [ms[p] for p in layers]
        rule = "best static split (SEMU time) for the representative batch"
    parts = _cut(layers, w, P * V)
    return _make(wl, f"mixed {by} V={V}", P, parts, ms, rule)


def choose_sub_size(wl: Workload, cm: CostModel, cluster, tp: int, sizes: Sequence[int] = tuple(range(1, 49)),
                    threshold: float = 0.95) -> dict:
    """DIP's offline B_i (paper §4): the smallest sub-microbatch size whose encoder efficiency
    (fwd+bwd FLOPs per second on SEMU's profile) reaches ``threshold`` of the best over ``sizes``."""
    layers = [p for p in cm.layers if wl.is_encoder(p)]
    eff = {}
    for b in sizes:
        stats = wl.unit_stats(b)
        ms = _layer_ms(cm, cluster, tp, [stats])
        flops = sum((lambda c: c.fwd_flops + c.bwd_in_flops + c.bwd_w_flops)(cm.cost(p, stats_for_layer(stats, p)))
                    for p in layers) / tp
        eff[b] = flops / (sum(ms[p] for p in layers) / 1e3)
    best = max(eff.values())
    chosen = min(b for b in sizes if eff[b] >= threshold * best)
    return {"B": chosen, "tflops_per_gpu": {b: eff[b] / 1e12 for b in sizes}, "threshold": threshold}


def segment_counts(wl: Workload, cm: CostModel, cluster, tp: int, b_enc: int, *, min_layers: int = 2,
                   P: int = 4) -> dict:
    """DIP's offline K_i (paper §4): T_i = module i's fwd+bwd time at its sub-microbatch size
    (``b_vit`` images for the ViT; one packed 8192-token sequence for the LM); the faster module gets
    K = 1 and the other ``floor(T_i / T_1)``, capped so that every chunk keeps ``min_layers`` blocks."""
    layers = list(cm.layers)
    ms = _layer_ms(cm, cluster, tp, [wl.unit_stats(b_enc)])
    enc = wl.encoder
    t = {enc: sum(ms[p] for p in layers if wl.is_encoder(p)), "backbone": sum(ms[p] for p in layers if not wl.is_encoder(p))}
    blocks = {enc: sum(1 for p in layers if wl.is_encoder(p) and _BLOCK.search(p)),
              "backbone": sum(1 for p in layers if not wl.is_encoder(p) and _BLOCK.search(p))}
    fast = min(t, key=t.get)
    cap = {m: max(1, blocks[m] // (min_layers * P)) for m in t}
    k = {m: min(max(1, int(t[m] // t[fast])), cap[m]) for m in t}
    return {"K": k, "T_ms": t, "B": b_enc, "unit": wl.unit, "K_cap": cap}


def ki_layout(wl: Workload, cm: CostModel, cluster, tp: int, rep: Sequence[dict[str, LengthStats]], P: int, K: Mapping[str, int]) -> Layout:
    """DIP's modality-aware partition: module i cut into ``P*K_i`` chunks balanced by SEMU time at the
    representative batch, placed round-robin (chunk c on rank c % P); ViT chunks first."""
    ms = _layer_ms(cm, cluster, tp, rep)
    layers = list(cm.layers)
    enc = wl.encoder
    vit = [p for p in layers if wl.is_encoder(p)]
    lm = [p for p in layers if not wl.is_encoder(p)]
    parts = _cut(vit, [ms[p] for p in vit], P * K[enc]) + _cut(lm, [ms[p] for p in lm], P * K["backbone"])
    return _make(wl, f"DIP K_{enc}={K[enc]} K_backbone={K['backbone']}", P, parts, ms,
                 f"{enc} in {P * K[enc]} chunks, backbone in {P * K['backbone']} chunks, round-robin",
                 modality=[enc] * (P * K[enc]) + ["backbone"] * (P * K["backbone"]))


# ------------------------------------------------------------------------------------------------
# one batch


@dataclass
class BatchCosts:
    """SEMU's numbers for one batch on one layout, per (stage, microbatch[, sub]), cached by the
    step model: times, stashes (``frugal``: every layer that saves memory recomputed, phase 2's
    assumption), message bytes, static bytes per rank."""

    step: StepModel
    layout: Layout
    stats: list[dict]
    tp: int
    cluster: Any
    static: list[float]
    subs: tuple = ()                     # Program.subs
    frugal: bool = False
    _msg: dict = field(default_factory=dict)
    _act: dict = field(default_factory=dict)
    _specs: dict = field(default_factory=dict)
    _saving_layers: dict | None = None

    def time(self, s: int, m: int, j: int = -1):
        return self.step.stage_time(s, m, j)

    def act(self, s: int, m: int, j: int = -1) -> float:
        key = (s, m, j)
        hit = self._act.get(key)
        if hit is None:     # the dual queue asks for the same task's stash many times
            if not self.frugal:
                hit = self.step.activation_bytes(s, m, j)
            else:
                hit = sum(min(f.act_bytes, f.in_bytes) for f in
                          (self.step.layer_footprint(s, m, p, j) for p in self.layout.stage_layers[s]))
            self._act[key] = hit
        return hit

    def msg_bytes(self, s: int, m: int, j: int = -1) -> float:
        key = (s, m, j)
        if key not in self._msg:
            last = self.layout.stage_layers[s][-1]
            stats = self.step._stats(m, j)
            self._msg[key] = self.step.cost_model.cost(last, stats_for_layer(stats, last)).out_bytes / self.tp
        return self._msg[key]

    def comm(self, p: int, c: int, m: int, j: int = -1) -> float:
        # the emulator moves whole elements of MESSAGE_DTYPE; same rounding as the specs below
        width = DTYPE_BYTES[MESSAGE_DTYPE]
        nbytes = max(1, int(self.msg_bytes(p, m, j) // width)) * width
        P = self.layout.P
        return self.cluster.transfer_time(p % P, c % P, nbytes, self.tp)

    def task_costs(self, split: bool) -> TaskCosts:
        t = self.time
        if split:
            return TaskCosts(fwd=lambda s, m, j=-1: t(s, m, j).fwd, bwd=lambda s, m, j=-1: t(s, m, j).bwd_in,
                             wgrad=lambda s, m, j=-1: t(s, m, j).bwd_w, act=self.act, comm=self.comm)
        return TaskCosts(fwd=lambda s, m, j=-1: t(s, m, j).fwd, bwd=lambda s, m, j=-1: t(s, m, j).bwd,
                         act=self.act, comm=self.comm)

    def units(self, s: int, m: int) -> tuple[int, ...]:
        from dipc.ir.program import sub_indices

        return tuple(sub_indices(self.subs, self.layout.stage_modality[s], m))

    def mb_work(self, m: int) -> float:
        return sum(self.time(s, m, j).fwd + self.time(s, m, j).bwd for s in range(len(self.layout.stage_layers))
                   for j in self.units(s, m))

    def work(self, P: int, stages: Sequence[StageInfo]) -> list[float]:
        w = [0.0] * P
        for st in stages:
            for m in range(len(self.stats)):
                w[st.rank] += sum(self.time(st.id, m, j).fwd + self.time(st.id, m, j).bwd for j in self.units(st.id, m))
        return w


def batch_costs(cm: CostModel, cluster, tp: int, layout: Layout, stats: Sequence[dict],
                layer_cache: dict | None = None, *, dp: int = 1, sub_stats: dict | None = None,
                subs: tuple = (), frugal: bool = False) -> BatchCosts:
    step = StepModel(cm, cluster, [list(x) for x in layout.stage_layers], list(stats), tp=tp, dp=dp,
                     dtype="bfloat16", sub_stats=sub_stats)
    if layer_cache is not None:   # layer times depend only on (layer, stats): share across layouts
        step._layer_cache = layer_cache
    static = [0.0] * layout.P
    for s in range(len(layout.stage_layers)):
        static[s % layout.P] += step.static_bytes(s)
    return BatchCosts(step=step, layout=layout, stats=list(stats), tp=tp, cluster=cluster, static=static,
                      subs=subs, frugal=frugal)


def _specs(costs: BatchCosts):
    width = DTYPE_BYTES[MESSAGE_DTYPE]
    made = costs._specs           # one spec tuple per message size, shared by a batch's candidates

    def specs(kind: str, mb: int, producer: int, consumer: int, sub: int = -1):
        key = (producer, mb, sub)
        hit = made.get(key)
        if hit is None:
            n = max(1, int(costs.msg_bytes(producer, mb, sub) // width))
            hit = made[key] = (TensorSpec(kind="tensor", dtype=MESSAGE_DTYPE, shape=(n,)),)
        return hit
    return specs


def _static(name: str):
    def build(layout, stages, P, M, costs, limits):
        orders = SCHEDULES[name](stages, P, M)
        return expand_subs(orders, stages, costs.subs) if costs.subs else orders
    return build


def _score_orders(layout, stages, P, M, costs, limits, orders) -> float:
    """SEMU's step time of compute orders. If they overflow memory as they are, the score is the
    step with every memory-saving layer recomputed — phase 2's assumption, an upper bound on what
    phase 3 (run on the winner only: ~0.1 s per ILP round is too slow per rollout) reaches; inf
    if even that overflows or they do not lower."""
    try:
        program = lower(stages, P, M, orders, schedule="dip", specs=_specs(costs), subs=costs.subs)
    except DipcError:
        return math.inf
    capacity = [limits[r] + costs.static[r] for r in range(P)]
    res = costs.step.simulate(program, record=False)
    if all(p <= c for p, c in zip(res.peak_memory, capacity)):
        return res.step_time
    res = costs.step.simulate(with_recompute(program, _all_saving_layers(costs)), record=False)
    return res.step_time if all(p <= c for p, c in zip(res.peak_memory, capacity)) else math.inf


def _all_saving_layers(costs: BatchCosts) -> dict[int, list[str]]:
    """Per stage, the layers whose recomputation saves memory (on the first microbatch)."""
    if costs._saving_layers is None:
        costs._saving_layers = {s: [p for p in layers if costs.step.layer_footprint(s, 0, p).saved_bytes > 0]
                                for s, layers in enumerate(costs.layout.stage_layers)}
    return costs._saving_layers


def dq_rules(layout, stages, P, M, costs, limits, *, split: bool):
    """Phase 2 under the cheap priority rules (:mod:`dipc.passes.priorities`): the fastest by SEMU,
    with the name of the rule that won."""
    tc = costs.task_costs(split)
    rules = {"microbatch": microbatch_priority, f"groups of {P}": grouped_priority(P),
             "critical path": critical_path_priority(stages, M, lambda s, m: costs.time(s, m).fwd,
                                                     lambda s, m: costs.time(s, m).bwd)}
    best = (math.inf, None, None)
    for name, prio in rules.items():
        try:
            orders = dual_queue_schedule(stages, P, M, tc, priority=prio, memory_limit=limits, split_backward=split,
                                         subs=costs.subs)
        except DipcError:
            continue
        t = _score_orders(layout, stages, P, M, costs, limits, orders)
        if best[1] is None or t < best[0]:
            best = (t, orders, name)
    if best[1] is None:
        raise DipcError("no priority rule gave a schedule within the memory limit")
    return best


def _dq(split: bool):
    def build(layout, stages, P, M, costs, limits):
        build.rule = None
        t, orders, name = dq_rules(layout, stages, P, M, costs, limits, split=split)
        build.rule = name
        return orders
    return build


def optimus_orders(layout, stages, P, M, costs, limits):
    """Optimus*'s coarse-grained schedule (the paper re-implemented only this part, inside DIP):
    every encoder forward of the batch first, then the backbone's (interleaved) 1F1B, then every
    encoder backward — the encoder's work is kept out of the backbone's steady state."""
    return encoder_ahead_orders(stages, P, M, costs.subs)


def _item_of(layout: Layout):
    mods = layout.stage_modality
    return lambda s, m: (mods[s], m)


def dip_search(layout, stages, P, M, costs, limits, *, split: bool, budget_s: float, seed: int = 0,
               seeds: bool = True):
    """DIP phases 1 + 2: MCTS over (modality, microbatch) segment priorities, each ranking
    interleaved by the dual queue and scored by SEMU's emulator; seeded (``seeds``) with the
    in-order, heaviest-first, lightest-first and encoder-first rankings. Returns (orders, SearchResult)."""
    tc = costs.task_costs(split)
    item_of = _item_of(layout)
    mods = list(dict.fromkeys(layout.stage_modality))
    items = [(mod, m) for m in range(M) for mod in mods]

    def orders_for(order):
        return dual_queue_schedule(stages, P, M, tc, priority=priority_from_order(order, item_of),
                                   memory_limit=limits, split_backward=split, subs=costs.subs)

    def score(order) -> float:
        try:
            orders = orders_for(order)
        except DipcError:
            return math.inf
        return _score_orders(layout, stages, P, M, costs, limits, orders)

    work = [costs.mb_work(m) for m in range(M)]
    heavy = sorted(range(M), key=lambda m: -work[m])
    rankings = [items, [(mod, m) for m in heavy for mod in mods], [(mod, m) for m in reversed(heavy) for mod in mods],
                [(mod, m) for mod in mods for m in range(M)]]   # every encoder segment first (Optimus-like)
    res = mcts_order(items, score, budget_s=budget_s, seeds=rankings if seeds else (), seed=seed, rollouts=4)
    return orders_for(res.order), res


def _dip(split: bool, budget_s: float, rules: bool = False):
    """MCTS (phase 1 + 2); with ``rules`` also the cheap priority rules, the faster kept."""
    def build(layout, stages, P, M, costs, limits):
        build.last = build.rule = None
        best = dq_rules(layout, stages, P, M, costs, limits, split=split) if rules else (math.inf, None, None)
        try:
            orders, res = dip_search(layout, stages, P, M, costs, limits, split=split, budget_s=budget_s)
        except DipcError:
            if best[1] is None:
                raise
            build.rule = best[2]
            return best[1]
        build.last = res
        if best[1] is not None and best[0] < res.score:
            build.rule = best[2]
            return best[1]
        build.rule = "mcts"
        return orders
    return build


# ------------------------------------------------------------------------------------------------
# DIP's planner as one function: what a training job would run per batch


ZB_FITS = 2                                    # phase-3 runs for the ZB-H1-backbone orders, beside max_fits
# the planner runs the batch lightest microbatch first when that lowers the encoder look-ahead
# orders' compute-order bound by at least this fraction (see microbatch_order)
ORDER_MARGIN = 0.02


def _lookahead_bound(stages, P: int, M: int, c: "BatchCosts", memo: dict | None = None) -> float:
    """The lowest compute-order lower bound (:func:`dipc.semu.order_bound.order_lower_bound`) of
    the encoder-first and :data:`ENCODER_AHEAD` orders on ``c`` (sub-microbatch costs). ``memo``
    keeps each order and its bound under ``(id(c), ahead, lag)``: the planner's candidates reuse
    them, so the order choice costs the planner only the orders it rejects; an order that raised is
    kept as its error, so its candidate is dropped without being made again (VLM-L: every
    look-ahead order is a wait cycle on its 8 ranks)."""
    from dipc.semu.order_bound import order_lower_bound

    best = math.inf
    for ahead, lag in ((None, 1), *ENCODER_AHEAD):
        try:
            orders = encoder_ahead_orders(stages, P, M, c.subs, ahead=ahead, lag=lag)
            bound = order_lower_bound(stages, orders, c.step.compute_seconds, c.subs)
        except DipcError as e:
            if memo is not None:    # the candidate of this order is dropped without trying it again
                # kept without its traceback, whose frames would make a reference cycle with the
                # planner's closures and keep the plan's orders and cost models alive
                memo[(id(c), ahead, lag)] = (e.with_traceback(None), math.inf, c)
            continue
        if memo is not None:
            memo[(id(c), ahead, lag)] = (orders, bound, c)   # c kept alive: its id stays unique
        best = min(best, bound)
    return best


def microbatch_order(layout: Layout, M: int, costs: tuple["BatchCosts", "BatchCosts"], fresh_costs,
                     layer_cache: dict | None = None, memo: dict | None = None
                     ) -> tuple[list[int] | None, tuple["BatchCosts", "BatchCosts"], float]:
    """The order the planner runs the batch's microbatches in: as drawn, or lightest first (SEMU
    fwd+bwd work of the whole microbatch; a stable sort). Returns (order or None for as drawn,
    the (whole-microbatch, sub-microbatch) costs in that order — ``fresh_costs(order, layer_cache)``
    makes the reordered ones —, the wall seconds spent on the order not taken).

    Why: the static candidates (interleaved 1F1B, the encoder look-ahead orders) run microbatches
    in index order, and on T2V batches — DiT work per microbatch skewed up to 4x, a heavy clip
    anywhere in the batch — a heavy microbatch between light ones stalls the interleaved
    backbone's steady state (its chunks wait on each other) and fills the warm-up slowly. Run
    lightest first, neighbouring microbatches are alike and the fill is short: the compute-order
    bound (no memory, no messages) drops 3-17% on T2V-S, and the planner's fitted step fell 2-12%
    on 9 of 10 T2V-S batches (one +0.5%) and 1-12% on 10 of 10 T2V-L batches (SEMU, unlimited
    refit). It is one of the rankings phase 1 (MCTS, :func:`dip_search`) is seeded with, which
    the timed planner does not run by default. On VLM-S the bound barely moves (<= 1.3%) and the
    fitted steps were up to 3.6% slower lightest first (the order changes which microbatches are
    in flight at the memory peak, which the bound ignores), hence :data:`ORDER_MARGIN`: the
    lightest-first order is kept only when it lowers the look-ahead orders' bound by at least 2%.
    Cost: one reordered cost model (layer times shared through ``layer_cache``) and eight order
    bounds, ~15-50 ms per batch; the chosen order's bounds are reused by the planner's candidates
    through ``memo`` (see :func:`_lookahead_bound`), the other order's time is returned: the
    planner adds it to phase 3's refit budget (see :func:`dip_planner`)."""
    plain, subs = costs
    work = [plain.mb_work(m) for m in range(M)]
    light = sorted(range(M), key=work.__getitem__)
    if light == list(range(M)):
        return None, costs, 0.0
    stages = layout.stages
    t0 = time.perf_counter()
    as_drawn = _lookahead_bound(stages, layout.P, M, subs, memo)
    t1 = time.perf_counter()
    reordered = fresh_costs(light, layer_cache)
    lightest_first = _lookahead_bound(stages, layout.P, M, reordered[1], memo)
    t2 = time.perf_counter()
    if lightest_first <= (1 - ORDER_MARGIN) * as_drawn:
        return light, reordered, t1 - t0
    return None, costs, t2 - t1


def dip_planner(layout: Layout, M: int, capacity: float, fresh_costs: Callable[..., tuple["BatchCosts", "BatchCosts"]],
                budget_s: float = 0.0, max_fits: int | None = 4, reorder: bool = True) -> tuple[Any, Any]:
    """DIP's per-batch plan on its fixed layout, timed as a whole (SEMU's stage costs included:
    ``fresh_costs(order=None, layer_cache=None)`` returns new (whole-microbatch, sub-microbatch)
    costs of the batch's microbatches in ``order`` (slot m runs microbatch ``order[m]``; None: as
    drawn), sharing ``layer_cache`` (a new one when None)).

    First, with ``reorder``, the microbatch order (:func:`microbatch_order`: as drawn or lightest
    first); every candidate below runs the batch in that order, and ``info["microbatch_order"]``
    says which (the data loader feeds microbatch ``order[m]`` into slot m). The time spent on the
    order not taken (~15-30 ms) is added to the refit's budget below rather than taken from it:
    the refit is an anytime ILP whose result moves with its time limit (a VLM-S batch planned as
    drawn lost 1% against the best baseline when the check took its ~15 ms from the refit), so the
    planner's latency grows by the check instead (medians 0.80 -> ~0.83 s on VLM-S).

    Candidates (compute orders; each lowered and simulated once as it is):

    - the partitioner's interleaved 1F1B, with and without sub-microbatches — the static schedules
      on DIP's own layout, so DIP can always fall back to them;
    - phase 2's dual queue under the microbatch and critical-path rules (whole microbatches); its
      zero-bubble split over sub-microbatches is left out: it had the lowest unfitted time on most
      batches but after recomputation never won, and fitting it cost an ILP round per batch;
    - the encoder-first order and :data:`ENCODER_AHEAD`'s bounded look-ahead orders over
      sub-microbatches (:func:`encoder_ahead_orders`); where the backbone has one chunk per rank,
      also with its 1F1B replaced by ZB-H1 (the zero-bubble split): on image-poor batches the
      backbone's 4-stage 1F1B fill and drain was what lost to Megatron's interleaved backbone;
    - with ``budget_s > 0``, phase 1's MCTS (sub-microbatches, split backward) for that long;
    - when the batch runs lightest first, the encoder-first order on the batch as drawn, with one
      phase-3 run of its own: the order was chosen without memory, and fitted to memory the
      drawn batch can need less recomputation.

    Phase 3 then runs only where needed (:func:`dipc.semu.candidate_select.pick_fastest`: branch and
    bound on the plain step time, a lower bound of the fitted one), at most ``max_fits`` times per
    batch (a latency guard: on memory-bound batches every candidate needs recomputation and the
    bounds prune little). The winner's per-microbatch refit gets what is left of
    :data:`PLAN_BUDGET_S` (wall seconds per batch). Returns (Choice, info)."""
    from dipc.semu.candidate_select import gc_paused

    with gc_paused():       # a plan allocates ~10^5 short-lived objects: see gc_paused
        return _dip_planner(layout, M, capacity, fresh_costs, budget_s, max_fits, reorder)


def _dip_planner(layout: Layout, M: int, capacity: float, fresh_costs, budget_s: float, max_fits: int | None,
                 reorder: bool = True):
    from dipc.semu.candidate_select import pick_fastest
    from dipc.semu.order_bound import order_lower_bound

    t_start = time.perf_counter()
    layer_cache: dict = {}
    plain, subs = fresh_costs(None, layer_cache)
    drawn = subs                # the batch as drawn (what the baselines run)
    order = None
    memo: dict = {}             # (id(costs), ahead, lag) -> (orders, bound, costs), from microbatch_order
    order_s = 0.0               # seconds spent on the microbatch order not taken
    if reorder:
        order, (plain, subs), order_s = microbatch_order(layout, M, (plain, subs), fresh_costs, layer_cache, memo)
    stages = layout.stages
    P = layout.P
    limits = [capacity - x for x in plain.static]

    def program_of(orders_fn, c: BatchCosts, key: tuple | None = None):
        """(build, bound) of one candidate: its orders made once, bounded before lowering (or
        both taken from ``memo[key]`` when microbatch_order made them)."""
        known = memo.get(key) if key is not None else None
        made: list = [known[0]] if known else []

        def orders():
            if not made:
                made.append(orders_fn())
            return made[0]

        def build():              # validated once, the winner only: the emulator finds wait cycles
            return lower(stages, P, M, orders(), schedule="dip", specs=_specs(c), subs=c.subs), c

        def bound():              # compute orders without messages: a lower bound of the step
            if known and isinstance(known[0], DipcError):
                raise known[0]    # microbatch_order found this order invalid (e.g. a wait cycle)
            if known:
                return known[1]
            return order_lower_bound(stages, orders(), c.step.compute_seconds, c.subs)
        return build, bound

    def dq(c: BatchCosts, prio, split: bool):
        return lambda: dual_queue_schedule(stages, P, M, c.task_costs(split), priority=prio, memory_limit=limits,
                                           split_backward=split, subs=c.subs)

    def critical(c: BatchCosts):
        return critical_path_priority(stages, M, lambda s, m: c.time(s, m).fwd, lambda s, m: c.time(s, m).bwd)

    candidates = [
        ("encoder-first", *program_of(lambda: encoder_ahead_orders(stages, P, M, subs.subs), subs,
                                      (id(subs), None, 1))),
        *[(f"encoder ahead {k} lag {lag}", *program_of(
            lambda k=k, lag=lag: encoder_ahead_orders(stages, P, M, subs.subs, ahead=k, lag=lag), subs,
            (id(subs), k, lag))) for k, lag in ENCODER_AHEAD],
        *([("encoder-first, zb-h1 backbone", *program_of(
            lambda: encoder_ahead_orders(stages, P, M, subs.subs, backbone="zb_h1"), subs)),
           *[(f"encoder ahead {k} lag {lag}, zb-h1 backbone", *program_of(
               lambda k=k, lag=lag: encoder_ahead_orders(stages, P, M, subs.subs, ahead=k, lag=lag, backbone="zb_h1"),
               subs)) for k, lag in ENCODER_AHEAD]]
          if sum(s.modality == "backbone" for s in stages) == P else []),
        ("interleaved 1f1b", *program_of(lambda: SCHEDULES["interleaved_1f1b"](stages, P, M), plain)),
        ("interleaved 1f1b, subs", *program_of(
            lambda: expand_subs(SCHEDULES["interleaved_1f1b"](stages, P, M), stages, subs.subs), subs)),
        ("dual queue (microbatch)", *program_of(dq(plain, microbatch_priority, False), plain)),
        ("dual queue (critical path)", *program_of(lambda: dq(plain, critical(plain), False)(), plain)),
    ]
    if order is not None:
        # lightest first is chosen on compute orders alone; once memory is fitted the batch as
        # drawn can need less recomputation (T2V-L batches lost up to 3.5% to Optimus*, which is
        # this very order on this layout), so it stays a candidate with a phase-3 run of its own
        candidates.append(("encoder-first, as drawn", *program_of(
            lambda: encoder_ahead_orders(stages, P, M, drawn.subs), drawn, (id(drawn), None, 1))))
    info: dict = {"microbatch_order": order}
    if budget_s > 0:
        def mcts():
            orders, res = dip_search(layout, stages, P, M, subs, limits, split=True, budget_s=budget_s, seeds=False)
            info["search"] = {"evaluations": res.evaluations, "exhausted": res.exhausted}
            return orders
        candidates.append(("mcts, subs, split", *program_of(mcts, subs)))

    tables = {id(c): Phase3Tables(c.step, M, selective=SELECTIVE_RECOMPUTE)
              for c in {id(x): x for x in (plain, subs, drawn)}.values()}   # phase 3's per-batch memo

    def fit(program, c: BatchCosts):
        fitted = optimize_memory(program, c.step, capacity, mip_rel_gap=0.05,   # the paper's 5% gap
                                 tables=tables[id(c)], per_microbatch=False, selective=SELECTIVE_RECOMPUTE)
        return fitted.program, fitted.result

    # the ZB-H1 orders get phase-3 runs of their own: they must not take the other candidates' runs
    groups = {label: "zb-h1" if "zb-h1" in label else "as drawn" for label, *_ in candidates
              if "zb-h1" in label or label.endswith("as drawn")}
    choice = pick_fastest(candidates, lambda program, c: c.step.simulate(program, record=False), capacity, fit, P,
                          max_fits=None if max_fits is None else {"": max_fits, "zb-h1": ZB_FITS, "as drawn": 1},
                          groups=groups)
    if choice.label.endswith("as drawn"):
        info["microbatch_order"] = None       # the winner runs the batch as drawn
    # the winner alone is refitted per (stage, microbatch): only the microbatches alive at a peak recompute
    c = choice.model
    program, result = refine_per_microbatch(choice.program, choice.result, c.step, capacity, mip_rel_gap=0.05,
                                            tables=tables[id(c)], selective=SELECTIVE_RECOMPUTE,
                                            time_budget=PLAN_BUDGET_S + order_s - (time.perf_counter() - t_start))
    info["recomputed_layers"] = sum(len(v) for v in recompute_plan(program).values())
    choice = dataclasses.replace(choice, program=program, result=result)
    validate(choice.program)
    return choice, info


# phase 3's per-layer strategies, for every schedule alike (baselines included, as Megatron-LM and
# torch both offer selective recomputation): none / selective (matmul and attention outputs kept,
# cheap ops re-run) / full; False (--no-selective): none / full, the paper's whole-layer choices
SELECTIVE_RECOMPUTE = True

MEGATRON = "megatron interleaved"
# the DIP planner's wall-clock budget per batch; the per-microbatch refit of its winner uses what the
# search leaves (issue 5's target: <= 1 s median for VLM-L on 2 cores)
PLAN_BUDGET_S = 0.8

# (name, layout key, builder, role). Layout keys: see ``make_layouts``.
PLANNER = "DIP planner"


def schedule_set(budget_s: float, ablation: bool = True) -> tuple[tuple[str, str, Callable, str], ...]:
    baselines = (
        (MEGATRON, "mixed_params", _static("interleaved_1f1b"), "baseline"),
        ("nnscaler* 1f1b", "mixed_time", _static("1f1b"), "baseline"),
        ("optimus* coarse", "dip", optimus_orders, "baseline"),
        ("gpipe", "split", _static("gpipe"), "baseline"),
        ("1f1b", "split", _static("1f1b"), "baseline"),
        ("zb_h1", "split", _static("zb_h1"), "baseline"),
        ("interleaved_1f1b V=2", "split2", _static("interleaved_1f1b"), "baseline"),
    )
    if not ablation:
        return baselines
    return baselines + (
        ("DIP partitioner only", "dip", _static("interleaved_1f1b"), "ablation"),
        ("DIP +interleaving", "dip", _dq(False), "ablation"),
        ("DIP +reordering", "dip", _dip(False, budget_s), "ablation"),
        ("DIP +zero-bubble split", "dip", _dip(True, budget_s, rules=True), "ablation"),
        ("DIP +sub-microbatches", "dip_subs", _dip(True, budget_s, rules=True), "ablation"),
        ("DIP +encoder-first order", "dip_subs", optimus_orders, "ablation"),
    )


def _record(res, c: BatchCosts, P: int, stages, capacity: float, picked: str) -> dict:
    work = c.work(P, stages)
    return dict(step_s=res.step_time, bubble=res.bubble_fraction, bound_frac=sum(res.busy) / (P * res.step_time),
                busiest_frac=max(work) / res.step_time, peak_gb=max(res.peak_memory) / 1e9,
                over_capacity=bool(res.ranks_over(capacity)), picked=picked)


def evaluate_batch(layouts: Mapping[str, Layout], costs: Mapping[str, BatchCosts], M: int, capacity: float,
                   budget_s: float, fresh_costs: Callable[[], tuple[BatchCosts, BatchCosts]] | None = None,
                   planner_budget_s: float = 0.0, ablation: bool = True) -> dict:
    """Every schedule of ``schedule_set`` on one batch: planning latency, validation, emulation;
    then, with ``fresh_costs``, DIP's planner (:func:`dip_planner`), timed from empty SEMU caches.

    The ablation rows are cumulative: each adds candidates to the ones before it and keeps the
    fastest by SEMU (``picked`` names the winner); their ``plan_ms`` is their own time (phase 3
    run on each), not a planner's latency — that is the ``DIP planner`` row's."""
    out = {}
    best_dip: dict | None = None
    for name, key, build, role in schedule_set(budget_s, ablation):
        layout, c = layouts[key], costs[key]
        stages = layout.stages
        P = layout.P
        limits = [capacity - x for x in c.static]
        rec: dict = {"validated": False, "role": role}
        t0 = time.perf_counter()
        try:
            orders = build(layout, stages, P, M, c, limits)
            program = lower(stages, P, M, orders, schedule=name, specs=_specs(c), subs=c.subs)
            validate(program)
            res = c.step.simulate(program, record=False)
            if res.ranks_over(capacity):          # phase 3: recompute what must be to fit
                fitted = optimize_memory(program, c.step, capacity, mip_rel_gap=0.05,   # the paper's 5% gap
                                         per_microbatch=False,   # baselines: one choice per stage, as Megatron
                                         selective=SELECTIVE_RECOMPUTE)
                program, res = fitted.program, fitted.result
                rec["recomputed_layers"] = sum(len(v) for v in fitted.recompute.values())
        except DipcError as e:
            rec["error"] = f"{type(e).__name__}: {str(e).splitlines()[0]}"
        else:
            rec["validated"] = True
        rec["plan_ms"] = (time.perf_counter() - t0) * 1e3
        if getattr(build, "last", None) is not None:
            rec["search"] = {"evaluations": build.last.evaluations, "exhausted": build.last.exhausted}
        if getattr(build, "rule", None) is not None:
            rec["rule"] = build.rule
        if rec["validated"]:
            rec.update(_record(res, c, P, stages, capacity, name))
        if role == "ablation":
            fits = rec["validated"] and not rec["over_capacity"]
            best_fits = best_dip is not None and not best_dip["over_capacity"]
            if best_dip is None or (fits and (not best_fits or rec["step_s"] < best_dip["step_s"])) or \
                    (not fits and not best_fits and rec["validated"] and rec["step_s"] < best_dip["step_s"]):
                if rec["validated"]:
                    best_dip = rec
            if best_dip is not None and best_dip is not rec:
                rec = {**best_dip, "role": role, "plan_ms": rec["plan_ms"],
                       "own": {k: rec.get(k) for k in ("step_s", "error") if k in rec}}
        out[name] = rec
    if fresh_costs is not None:
        layout = layouts["dip"]
        rec = {"validated": False, "role": "dip"}
        t0, c0 = time.perf_counter(), time.process_time()
        try:
            choice, info = dip_planner(layout, M, capacity, fresh_costs, planner_budget_s)
        except DipcError as e:
            rec["error"] = f"{type(e).__name__}: {str(e).splitlines()[0]}"
            rec["plan_ms"] = (time.perf_counter() - t0) * 1e3
        else:
            rec["plan_ms"] = (time.perf_counter() - t0) * 1e3
            rec["plan_cpu_ms"] = (time.process_time() - c0) * 1e3   # this process's CPU: the machine is shared
            c = costs["dip_subs"] if choice.program.subs else costs["dip"]
            rec.update(validated=True, **_record(choice.result, c, layout.P, layout.stages, capacity, choice.label),
                       simulated=choice.simulated, fitted=choice.fitted, **info,
                       unfitted_step_s=choice.bounds[choice.label],      # the winner before phase 3
                       work_frac=sum(c.work(layout.P, layout.stages)) / (layout.P * choice.result.step_time))
        out[PLANNER] = rec
    return out


# ------------------------------------------------------------------------------------------------
# the run


def _pct(xs: Sequence[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs), q)) if xs else float("nan")


def summarise(batches: Sequence[dict], base: str = MEGATRON) -> dict:
    """Per schedule over ``batches``: throughput relative to ``base`` (t_base / t), bubbles, bounds,
    memory, planner latency; for DIP rows also the worst batch against the best baseline."""
    names = list(batches[0]["schedules"]) if batches else []
    out = {}
    for name in names:
        recs = [(b["schedules"][name], b["schedules"][base]) for b in batches]
        ok = [(r, b) for r, b in recs if r["validated"] and b["validated"]]
        rel = [b["step_s"] / r["step_s"] for r, b in ok]
        plan = [r["plan_ms"] for r, _ in ok]
        cpu = [r["plan_cpu_ms"] for r, _ in ok if "plan_cpu_ms" in r]
        vs_best = []
        for bt in batches:
            r = bt["schedules"][name]
            base_times = [x["step_s"] for x in bt["schedules"].values() if x["role"] == "baseline" and x["validated"]]
            if r["validated"] and base_times:
                vs_best.append(min(base_times) / r["step_s"])
        out[name] = {
            "role": recs[0][0]["role"] if recs else None,
            "batches": len(recs), "validated": sum(r["validated"] for r, _ in recs),
            "errors": sorted({r["error"] for r, _ in recs if "error" in r})[:3],
            "rel_throughput": {"mean": statistics.fmean(rel) if rel else None,
                               "p10": _pct(rel, 10) if rel else None, "min": min(rel, default=None),
                               "max": max(rel, default=None)},
            "vs_best_baseline": {"mean": statistics.fmean(vs_best) if vs_best else None,
                                 "min": min(vs_best, default=None)},
            "step_s_mean": statistics.fmean(r["step_s"] for r, _ in ok) if ok else None,
            "bubble_mean": statistics.fmean(r["bubble"] for r, _ in ok) if ok else None,
            "no_bubble_bound_frac_mean": statistics.fmean(r["bound_frac"] for r, _ in ok) if ok else None,
            "busiest_rank_bound_frac_mean": statistics.fmean(r["busiest_frac"] for r, _ in ok) if ok else None,
            "peak_memory_gb_max": max((r["peak_gb"] for r, _ in ok), default=None),
            "batches_over_capacity": sum(r["over_capacity"] for r, _ in ok),
            "plan_ms": {"median": _pct(plan, 50) if plan else None, "p99": _pct(plan, 99) if plan else None},
            "plan_cpu_ms": {"median": _pct(cpu, 50), "p99": _pct(cpu, 99)} if cpu else None,
            "picked": dict(Counter(r.get("picked") for r, _ in ok)),
        }
        if any("microbatch_order" in r for r, _ in ok):   # the DIP planner: batches it ran lightest first
            out[name]["lightest_first"] = sum(r.get("microbatch_order") is not None for r, _ in ok)
    return out


def code_state() -> dict:
    """The commit and the uncommitted files under dipc/ that the numbers came from."""
    import subprocess

    def git(*a: str) -> str:
        try:
            return subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True, timeout=10).stdout.rstrip()
        except (OSError, subprocess.SubprocessError):
            return ""
    return {"commit": git("rev-parse", "HEAD"), "dirty_dipc_files": git("status", "--porcelain", "--", "dipc").splitlines(),
            "dual_queue_py_blob": git("hash-object", "dipc/passes/dual_queue.py"),
            "dual_queue_py_committed_blob": git("rev-parse", "HEAD:dipc/passes/dual_queue.py")}


def rise_and_fall(rng: np.random.Generator, iteration: int, num_microbatches: int) -> list[Microbatch]:
    """The paper's dynamic workload (§7.5): per 20-iteration period, the lower bound on images per
    microbatch rises 0 -> 16 over iterations 1-5 with an upper bound of 32, then both bounds fall
    linearly to 0 over iterations 6-20. Each microbatch draws its image count uniformly between the
    bounds and fills the rest of the 8192-token sequence with text (the paper does not publish
    the text side)."""
    i = iteration % 20
    if i < 5:
        lo, hi = round(16 * (i + 1) / 5), 32
    else:
        frac = (19 - i) / 15
        lo, hi = round(16 * frac), round(32 * frac)
    out = []
    for _ in range(num_microbatches):
        n = int(rng.integers(lo, hi + 1)) if hi > 0 else 0
        text = max(1, SEQ_LEN - IMAGE_TOKENS * n - int(rng.integers(0, 256)))
        out.append(Microbatch((text,), (n,), "rise_fall"))
    return out


def make_layouts(wl: Workload, cm: CostModel, cluster, tp: int, rep_stats, P: int,
                 b_enc: int, k_backbone: int | None = None,
                 k_encoder: int | None = None, min_chunk_blocks: int = 2) -> tuple[dict[str, Layout], dict]:
    """Every layout of the run; ``k_backbone`` and ``k_encoder`` override the paper's K rule for
    the backbone and the encoder (offline choices, recorded in the result: e.g. fewer backbone
    chunks where memory binds, more encoder chunks where image-heavy batches make rank 0's encoder
    stash bind)."""
    ki = segment_counts(wl, cm, cluster, tp, b_enc, P=P, min_layers=min_chunk_blocks)
    if k_backbone is not None:
        ki = {**ki, "K": {**ki["K"], "backbone": k_backbone}, "K_rule": ki["K"], "override": "--k-backbone"}
    if k_encoder is not None:
        ki = {**ki, "K": {**ki["K"], wl.encoder: k_encoder}, "K_rule": ki.get("K_rule", ki["K"]),
              "override": " ".join(x for x in (ki.get("override"), "--k-encoder") if x)}
    return {
        "mixed_params": mixed_layout(wl, cm, cluster, tp, rep_stats, P, 2, "params"),
        "mixed_time": mixed_layout(wl, cm, cluster, tp, rep_stats, P, 1, "time"),
        "split": choose_layout(wl, cm, cluster, tp, rep_stats, P, 1),
        "split2": choose_layout(wl, cm, cluster, tp, rep_stats, P, 2),
        "dip": ki_layout(wl, cm, cluster, tp, rep_stats, P, ki["K"]),
    }, ki


INTERLEAVE_SAMPLES = 4   # sample batches the offline interleave-depth choice simulates DIP on


def choose_interleave(wl: Workload, cm: CostModel, cluster, tp: int, P: int, rep_stats, ki: dict, b_enc: int,
                      dp: int, capacity: float, M: int, seed: int, depths: Sequence[int] = (1, 0, 2),
                      rule_layout: Layout | None = None,
                      draws: Sequence[tuple[str, int]] | None = None) -> tuple[Layout, dict]:
    """DIP's offline layout with its interleaving depth chosen by simulation: the paper's rule fixes
    the ratio of the modules' segment counts (K_i = floor(T_i / T_1)) but not a common multiple of
    them, and on a model whose modules take about as long as each other (VLM-S: K 1 and 1) the rule
    gives no interleaving at all, which the image-heavy batches of a trace then pay for in fill and
    drain; on others the rule's K > 1 costs more than it gives (VLM-M: K_backbone 3, whose chunks
    leave the LM head's rank waiting on the fill). So, like the paper's partitioner, which profiles
    before it fixes the placement: for each depth v (every K_i times v, capped so that chunks keep
    their minimum blocks; v = 0 stands for one segment per module and rank, K_i = 1; a depth giving
    the K of one tried before is skipped, the rule's first), DIP's own planner
    plans :data:`INTERLEAVE_SAMPLES` sample batches (drawn from the workload's regimes with a seed
    of their own, never the measured batches), and the depth with the lowest geometric-mean step
    time is kept for the whole run. Baselines are untouched (Megatron keeps V=2 by parameters).
    ``draws``: the samples' (regime, iteration) pairs (default: the workload's regimes in turn);
    the rise-and-fall trace, a run of its own, passes points spread over its period."""
    rng = np.random.default_rng(seed + 20_000)
    draws = draws or [(wl.regimes[i % len(wl.regimes)], i) for i in range(INTERLEAVE_SAMPLES)]
    samples = [wl.draw(rng, regime, i, M) for regime, i in draws]
    tried: dict[int, dict] = {}
    layouts: dict[int, Layout] = {}
    for v in depths:
        K = {m: 1 if v == 0 else min(k * v, ki["K_cap"][m]) for m, k in ki["K"].items()}
        if any(t["K"] == K for t in tried.values()):
            continue
        layout = rule_layout if rule_layout is not None and K == ki["K"] else \
            ki_layout(wl, cm, cluster, tp, rep_stats, P, K)
        steps = []
        for mbs in samples:
            choice, _ = dip_planner(layout, M, capacity, planner_costs(wl, cm, cluster, tp, layout, mbs, b_enc, dp))
            steps.append(choice.result.step_time)
        tried[v] = {"K": K, "sample_steps_s": steps,
                    "geomean_step_s": math.exp(statistics.fmean(math.log(x) for x in steps))}
        layouts[v] = layout
    best = min(tried, key=lambda v: tried[v]["geomean_step_s"])
    return layouts[best], {**ki, "K": tried[best]["K"], "K_rule": ki["K"], "interleave_depth": best,
                           "interleave_search": tried, "sample_draws": [list(d) for d in draws]}


# the trace's interleave-depth samples: iterations spread over its 20-iteration period (rising
# bounds at 2, the peak at 7, falling at 12 and 17), drawn with the search's own seed
TRACE_SAMPLE_ITERATIONS = (2, 7, 12, 17)


def planner_costs(wl: Workload, cm: CostModel, cluster, tp: int, layout: Layout, mbs: Sequence[Any], b_enc: int,
                  dp: int = 1) -> Callable[..., tuple[BatchCosts, BatchCosts]]:
    """The DIP planner's ``fresh_costs`` for one batch: ``fresh_costs(order=None, layer_cache=None)``
    gives new (whole-microbatch, sub-microbatch) SEMU costs on ``layout`` with the microbatches in
    ``order`` (slot m holds ``mbs[order[m]]``; None: as drawn), from ``layer_cache`` (empty when None)."""
    stats = [wl.stats(mb) for mb in mbs]
    counts = wl.sub_counts(mbs, b_enc)
    sub_stats = wl.sub_stats(mbs, counts)

    def fresh_costs(order: Sequence[int] | None = None, layer_cache: dict | None = None):
        layer_cache = {} if layer_cache is None else layer_cache
        if order is None:
            st, cnt, sst = stats, counts, sub_stats
        else:
            st, cnt = [stats[m] for m in order], tuple(counts[m] for m in order)
            sst = wl.sub_stats([mbs[m] for m in order], cnt)
        return (batch_costs(cm, cluster, tp, layout, st, layer_cache, dp=dp, frugal=True),
                batch_costs(cm, cluster, tp, layout, st, layer_cache, dp=dp, frugal=True,
                            sub_stats=sst, subs=((wl.encoder, cnt),)))
    return fresh_costs


def run(num_batches: int = 100, num_microbatches: int = 16, *, model: str = "vlm_s", seed: int = 0,
        vit_tokens: int = VIT_PATCHES, budget_s: float = 0.15, b_enc: int | None = None, trace_iterations: int = 40,
        dp: int | None = None, profile: str | None = None, batch_seed: int | None = None,
        progress: bool = False, planner_budget_s: float = 0.0, ablation: bool = True,
        k_backbone: int | None = None, k_encoder: int | None = None, interleave_search: bool = True,
        min_chunk_blocks: int = 2) -> dict:
    """The benchmark's core for one workload: draw batches, lay out the model, evaluate every
    schedule per batch (the rise-and-fall trace only for VLMs)."""
    t_start = time.perf_counter()
    state = code_state()        # the code this run executes (commits may land while it runs)
    wl = WORKLOADS[model](vit_tokens=vit_tokens)
    pm = wl.paper
    P, tp = pm.pp, pm.tp
    dp = dp or max(1, pm.num_gpus // (tp * P))
    sub_size = choose_sub_size(wl, cost_model(wl), load_preset(profile or PROFILE), tp) if b_enc is None else None
    b_enc = b_enc or sub_size["B"]
    profile = profile or PROFILE
    cluster = load_preset(profile)
    capacity = cluster.device.memory_capacity
    cm = cost_model(wl)
    rep = wl.draw(np.random.default_rng(seed + 10_000), wl.regimes[-1], 0, num_microbatches)
    rep_stats = [wl.stats(mb) for mb in rep]
    layouts, ki = make_layouts(wl, cm, cluster, tp, rep_stats, P, b_enc, k_backbone, k_encoder, min_chunk_blocks)
    rule_dip, rule_ki = layouts["dip"], ki
    searched = interleave_search and k_backbone is None and k_encoder is None
    if searched:
        layouts["dip"], ki = choose_interleave(wl, cm, cluster, tp, P, rep_stats, rule_ki, b_enc, dp, capacity,
                                               num_microbatches, seed, rule_layout=rule_dip)
    trace_iterations = trace_iterations if pm.kind == "vlm" else 0
    # the rise-and-fall trace is a run of its own: DIP's placement for it is chosen the same way,
    # from samples of the trace (other draws than the measured ones), as a run over that data would
    trace_layouts, trace_ki = layouts, ki
    if searched and trace_iterations:
        trace_dip, trace_ki = choose_interleave(wl, cm, cluster, tp, P, rep_stats, rule_ki, b_enc, dp, capacity,
                                                num_microbatches, seed, rule_layout=rule_dip,
                                                draws=[("rise_fall", i) for i in TRACE_SAMPLE_ITERATIONS])
        trace_layouts = {**layouts, "dip": trace_dip}
    t_setup = time.perf_counter() - t_start

    rng = np.random.default_rng(seed if batch_seed is None else batch_seed)   # layouts always from `seed`
    work = [(wl.regimes[i % len(wl.regimes)], i) for i in range(num_batches)]
    work += [("rise_fall", i) for i in range(trace_iterations)]
    batches = []
    for n, (regime, i) in enumerate(work):
        lays = trace_layouts if regime == "rise_fall" else layouts
        mbs = wl.draw(rng, regime, i, num_microbatches)
        stats = [wl.stats(mb) for mb in mbs]
        t0 = time.perf_counter()
        cache: dict = {}
        costs = {k: batch_costs(cm, cluster, tp, lay, stats, cache, dp=dp, frugal=k == "dip")
                 for k, lay in lays.items()}
        counts = wl.sub_counts(mbs, b_enc)
        costs["dip_subs"] = batch_costs(cm, cluster, tp, lays["dip"], stats, cache, dp=dp, frugal=True,
                                        sub_stats=wl.sub_stats(mbs, counts), subs=((wl.encoder, counts),))
        t_costs = time.perf_counter() - t0
        fresh_costs = planner_costs(wl, cm, cluster, tp, lays["dip"], mbs, b_enc, dp)
        scheds = evaluate_batch({**lays, "dip_subs": lays["dip"]}, costs, num_microbatches, capacity, budget_s,
                                fresh_costs, planner_budget_s, ablation)
        batches.append({"index": i, "regime": regime, **wl.describe_mb(mbs), "semu_costs_ms": t_costs * 1e3,
                        "load_avg_1min": os.getloadavg()[0], "schedules": scheds})
        if progress and (n + 1) % 10 == 0:
            print(f"  {model}: {n + 1}/{len(work)} batches, {time.perf_counter() - t_start:.0f} s", file=sys.stderr)

    skewed = [b for b in batches if b["regime"] != "rise_fall"]
    setup = {
        "model": f"{model} ({pm.encoder} + {pm.backbone}), bf16, built on meta", "tp": tp, "pp": P, "dp": dp,
        "gpus": tp * P * dp, "profile": profile, "memory_capacity_gb": capacity / 1e9,
        "microbatches": num_microbatches, "batches": num_batches, "trace_iterations": trace_iterations,
        "seed": seed, "batch_seed": batch_seed, "mcts_budget_s_per_batch": budget_s,
        "planner_mcts_budget_s": planner_budget_s, "planner_budget_s": PLAN_BUDGET_S, "ablation_rows": ablation, "segment_counts": ki, "sub_size": sub_size,
        "min_chunk_blocks": min_chunk_blocks,
        **({"segment_counts_trace": trace_ki} if trace_layouts is not layouts else {}),
        "message_model": "stage output (last layer out_bytes / TP) in bf16, eager p2p, emulator links",
        "recompute_strategies": "per layer: none / selective / full" if SELECTIVE_RECOMPUTE else
                                "per layer: none / full (--no-selective)",
        "dual_queue_memory_limit": "device capacity - rank's static bytes (params, grads, Adam)",
        "baseline": f"{MEGATRON}: Megatron-LM VPP, V=2, chunks of equal parameter count over the mixed model",
    }
    if pm.kind == "vlm":
        imgs = [x for b in skewed for x in b["images"]]
        setup.update({
            "vit_tokens_per_image": vit_tokens, "lm_tokens_per_image": IMAGE_TOKENS, "seq_len": SEQ_LEN,
            "max_images": MAX_IMAGES,
            "regimes": {"interleaved": "text lognormal(700, 0.9) in [32, 8192]; images 0 w.p. 0.35 else zipf(2)",
                        "caption": "1 image; caption lognormal(24, 0.6) in [4, 256]",
                        "mixed": f"runs (geometric, mean {MIXED_RUN_MEAN}) from {dict(MIXED_SOURCES)}; text-only "
                                 "lognormal(1200, 1.0); scienceqa lognormal(250, 0.5), 0/1 image",
                        "rise_fall": rise_and_fall.__doc__.split("\n\n")[0].replace("\n", " ")},
            "packing": "greedy in arrival order, <= 8192 tokens and <= 48 images per sequence, one sequence "
                       "per microbatch, no padding (LM cost at the packed length)",
            "images_per_microbatch": {"mean": statistics.fmean(imgs), "p10": _pct(imgs, 10), "p50": _pct(imgs, 50),
                                      "p90": _pct(imgs, 90), "max": max(imgs), "min": min(imgs)} if imgs else {},
        })
    else:
        setup["regimes"] = {"video-caption": "paper_checks.py's clips (lognormal seconds, MovieGen aspects), grouped "
                                             "by aspect and duration bucket, <= 8 clips and <= 16 s per microbatch",
                            "mixed-video": "the same clips without grouping"}
    return {
        "honesty": HONESTY,
        "code_state": state,
        "setup": setup,
        "layouts": {k: {"name": lay.name, "rule": lay.rule, "V": lay.V, "encoder_stages": lay.vit_stages,
                        "stage_ms_at_representative": list(lay.stage_ms), "description": lay.describe(),
                        "slowest_stage_ms_by_encoder_stages": lay.candidates,
                        "stage_layers": [list(x) for x in lay.stage_layers]} for k, lay in layouts.items()},
        **({"dip_layout_trace": {"name": trace_layouts["dip"].name, "V": trace_layouts["dip"].V,
                                 "description": trace_layouts["dip"].describe()}}
           if trace_layouts is not layouts else {}),
        **summaries(batches, wl.regimes),
        "batches": batches,
        "seconds": {"setup": t_setup, "total": time.perf_counter() - t_start},
        "load_avg_1min": {"median": _pct([b["load_avg_1min"] for b in batches], 50), "cpus": os.cpu_count()},
    }


def summaries(batches: Sequence[dict], regimes: Sequence[str]) -> dict:
    """The summary blocks of a result from its batches (skewed, rise-and-fall, per regime)."""
    skewed = [b for b in batches if b["regime"] != "rise_fall"]
    trace = [b for b in batches if b["regime"] == "rise_fall"]
    return {"summary": summarise(skewed) if skewed else {}, "rise_and_fall": summarise(trace) if trace else {},
            "by_regime": {r: summarise([b for b in batches if b["regime"] == r]) for r in (*regimes, "rise_fall")
                          if any(b["regime"] == r for b in batches)}}


def merge_shards(shards: Sequence[dict]) -> dict:
    """One result from shards of one workload run with the same ``--seed`` (so the same layouts)
    and different ``--batch-seed``: batches concatenated, summaries recomputed."""
    first = shards[0]
    if any(s["layouts"] != first["layouts"] for s in shards):
        raise ValueError("shards have different layouts. Fix: run every shard with the same --seed.")
    batches = [b for s in shards for b in s["batches"]]
    setup = {**first["setup"], "batches": sum(s["setup"]["batches"] for s in shards),
             "trace_iterations": sum(s["setup"]["trace_iterations"] for s in shards),
             "batch_seed": [s["setup"]["batch_seed"] for s in shards]}
    regimes = [r for r in dict.fromkeys(b["regime"] for b in batches) if r != "rise_fall"]
    return {**first, "setup": setup, **summaries(batches, regimes), "batches": batches,
            "seconds": {"total": sum(s["seconds"]["total"] for s in shards), "shards": [s["seconds"] for s in shards]}}


# ------------------------------------------------------------------------------------------------


def _f(x, fmt):
    return "-" if x is None else format(x, fmt)


def _rows(summary: dict) -> None:
    head = (f"{'schedule':<27} {'valid':>7} {'rel mean':>8} {'p10':>6} {'max':>6} {'vs best':>7} {'worst':>6} "
            f"{'bubble':>7} {'no-bub':>7} {'peak GB':>8} {'>cap':>5} {'plan ms':>8} {'p99':>7}")
    print(head)
    print("-" * len(head))
    for name, r in summary.items():
        rel, vb = r["rel_throughput"], r["vs_best_baseline"]
        print(f"{name:<27} {r['validated']:>3}/{r['batches']:<3} {_f(rel['mean'], '8.3f')} {_f(rel['p10'], '6.3f')} "
              f"{_f(rel['max'], '6.3f')} {_f(vb['mean'], '7.3f')} {_f(vb['min'], '6.3f')} "
              f"{_f(r['bubble_mean'], '7.1%')} {_f(r['no_bubble_bound_frac_mean'], '7.1%')} "
              f"{_f(r['peak_memory_gb_max'], '8.1f')} {r['batches_over_capacity']:>5} "
              f"{_f(r['plan_ms']['median'], '8.1f')} {_f(r['plan_ms']['p99'], '7.1f')}")
        if r.get("plan_cpu_ms"):
            print(f"    planner CPU time (this process; the machine is shared): median {r['plan_cpu_ms']['median']:.0f} ms, "
                  f"p99 {r['plan_cpu_ms']['p99']:.0f} ms")
        for e in r["errors"]:
            print(f"    error: {e[:150]}")


def print_table(result: dict) -> None:
    s = result["setup"]
    print(f"{s['model']}: TP{s['tp']} PP{s['pp']} DP{s['dp']} ({s['gpus']} GPUs) on {s['profile']}, {s['batches']} "
          f"skewed batches x {s['microbatches']} microbatches; SIMULATED by SEMU, not measured")
    im = s.get("images_per_microbatch")
    if im:
        print(f"ViT tokens per image {s['vit_tokens_per_image']}; images per microbatch: mean {im['mean']:.1f}, "
              f"p10 {im['p10']:.0f}, median {im['p50']:.0f}, p90 {im['p90']:.0f}, max {im['max']}")
    ki = s["segment_counts"]
    print(f"DIP segment counts K = {ki['K']} from T at B={ki['B']} {ki['unit']}: "
          + ", ".join(f"{k} {v:.0f} ms" for k, v in ki["T_ms"].items()))
    for key, lay in result["layouts"].items():
        print(f"layout {key}: {lay['name']} ({lay['rule']})\n  {lay['description']}")
    print(f"rel = t({MEGATRON}) / t; vs best = min over baselines of t / t (worst: the lowest batch); "
          f"no-bub = sum busy (compute and recomputation) / (P x step); memory capacity {s['memory_capacity_gb']:.1f} GB")
    if result["summary"]:
        print("skewed batches:")
        _rows(result["summary"])
    if result["rise_and_fall"]:
        print(f"rise-and-fall trace ({s['trace_iterations']} iterations):")
        _rows(result["rise_and_fall"])
    print(f"by regime, mean throughput relative to {MEGATRON}:")
    names = list(result["summary"] or result["rise_and_fall"])
    print(f"  {'regime':<13} " + " ".join(f"{n:>12.12}" for n in names))
    for reg, summ in result["by_regime"].items():
        print(f"  {reg:<13} " + " ".join(_f(summ[n]["rel_throughput"]["mean"], "12.3f") for n in names))


def main(argv: list[str] | None = None) -> dict:
    global SELECTIVE_RECOMPUTE, PLAN_BUDGET_S
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="vlm_s,vlm_m,vlm_l,t2v_s,t2v_l",
                        help=f"comma-separated workloads from {sorted(WORKLOADS)}")
    parser.add_argument("--batches", type=int, default=100)
    parser.add_argument("--microbatches", type=int, default=16)
    parser.add_argument("--vit-tokens", type=int, default=VIT_PATCHES,
                        help=f"ViT tokens per image: {VIT_PATCHES} (Qwen2-VL patches before the 4x4 merge, default) "
                             f"or {IMAGE_TOKENS} (merged)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-seed", type=int, default=None,
                        help="seed of the batches only (default --seed); shards of one run share --seed")
    parser.add_argument("--budget", type=float, default=0.15, help="MCTS seconds per batch per DIP variant")
    parser.add_argument("--planner-budget", type=float, default=0.0,
                        help="MCTS seconds inside the timed DIP planner (0: its fixed candidates only)")
    parser.add_argument("--k-backbone", type=int, default=None,
                        help="backbone segments K per rank instead of the paper's floor(T_i / T_1) rule")
    parser.add_argument("--k-encoder", type=int, default=None,
                        help="encoder segments K per rank instead of the paper's rule (VLM-S, rise-and-fall trace: "
                             "K=2 lifts DIP's worst batch against the best baseline from 0.963 to 0.980)")
    parser.add_argument("--no-interleave-search", action="store_true",
                        help="DIP's layout from the paper's K rule alone (no offline choice of interleaving depth)")
    parser.add_argument("--min-chunk-blocks", type=int, default=2,
                        help="blocks every DIP chunk keeps at least (caps K_i at blocks / (this x PP))")
    parser.add_argument("--no-ablation", action="store_true",
                        help="skip the cumulative DIP ablation rows (baselines and the DIP planner only)")
    parser.add_argument("--b-enc", type=int, default=None, help="encoder items per sub-microbatch (sets K_i)")
    parser.add_argument("--trace", type=int, default=40, help="iterations of the rise-and-fall trace (VLMs)")
    parser.add_argument("--dp", type=int, default=None, help="data-parallel replicas (default: the paper's GPUs / (TP x PP))")
    parser.add_argument("--profile", default=None, help=f"cluster preset (default {PROFILE}; the paper's §7.7 used H100)")
    parser.add_argument("--no-selective", action="store_true",
                        help="phase 3 recomputes whole layers only (no selective checkpointing), for every schedule")
    parser.add_argument("--plan-budget", type=float, default=PLAN_BUDGET_S,
                        help="the DIP planner's wall seconds per batch; its per-microbatch refit gets what the "
                             "search leaves (a deadline: the plan takes longer only when the search does)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--merge", type=Path, nargs="+", default=None,
                        help="merge these result files (shards of one workload share a key) into --out and print them")
    args = parser.parse_args(argv)
    SELECTIVE_RECOMPUTE = not args.no_selective
    PLAN_BUDGET_S = args.plan_budget
    results = {}
    if args.merge:
        shards: dict[str, list[dict]] = {}
        for path in args.merge:
            for model, res in json.loads(path.read_text()).items():
                shards.setdefault(model, []).append(res)
        results = {m: merge_shards(v) if len(v) > 1 else v[0] for m, v in shards.items()}
        for res in results.values():   # the notes describe this code; each result keeps its own code_state
            res["honesty"] = HONESTY
        for res in results.values():
            print_table(res)
            print()
        args.out.write_text(json.dumps(results, indent=1) + "\n")
        print(f"wrote {args.out}")
        return results
    for model in args.models.split(","):
        if model not in WORKLOADS:
            parser.error(f"unknown workload {model!r}; choose from {sorted(WORKLOADS)}")
        results[model] = run(args.batches, args.microbatches, model=model, seed=args.seed, vit_tokens=args.vit_tokens,
                             budget_s=args.budget, b_enc=args.b_enc, trace_iterations=args.trace, dp=args.dp,
                             profile=args.profile, batch_seed=args.batch_seed, progress=True,
                             planner_budget_s=args.planner_budget, ablation=not args.no_ablation,
                             k_backbone=args.k_backbone, k_encoder=args.k_encoder,
                             interleave_search=not args.no_interleave_search,
                             min_chunk_blocks=args.min_chunk_blocks)
        print_table(results[model])
        print()
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1) + "\n")   # after every workload: long runs keep partial results
    print(f"{sum(r['seconds']['total'] for r in results.values()):.0f} s; wrote {args.out}")
    return results


if __name__ == "__main__":
    main()
