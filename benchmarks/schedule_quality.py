"""Schedule quality on skewed VLM batches: static schedules vs DIP's phase-2 dual-queue interleaving.

First version of issue 5's benchmark (item 6). **Phase 2 only, simulated, not measured**: no
sub-microbatches, no MCTS segment reordering, no per-layer memory optimisation, no online loop;
every number is SEMU's step emulator on an H800 profile, not a GPU run. The JSON says so too.

Workload
--------
VLM-S (ViT 5B + Llama3 8B, bf16) at the paper's TP4 x PP4 on the ``h800`` cluster profile (8 GPUs
per node, so ranks 0-1 share a node and 1->2 crosses the 25 GB/s RoCE link), built on ``meta``.

- Samples come from three regimes (one per batch, cycled): ``interleaved`` (OBELICS-like documents:
  text tokens lognormal(median 700, sigma 0.9), images ``zipf(2)`` per document, 35% of documents
  with none), ``caption`` (LAION-like pairs: one image, caption lognormal(median 24, sigma 0.6)) and
  ``mixed`` (runs of geometric length, mean 8 samples, from interleaved / caption / text-only
  (lognormal(median 1200, sigma 1.0)) / ScienceQA-like (0-1 image, lognormal(median 250, sigma 0.5))
  sources, 35/30/20/15%). The distributions are assumptions: the paper does not publish them.
- Samples are packed greedily in arrival order into sequences of at most 8192 tokens and 48 images
  (169 LM tokens per image); each microbatch is one packed sequence. The LM runs on the packed
  length without padding (variable-length / THD), so text load varies a little, vision load a lot.
- The ViT runs on ``--vit-tokens`` tokens per image: 169 by default (the merged tokens, how
  ``dipc/semu/models.py`` builds the paper ViT), or 2704 (Qwen2-VL's patches before the 4x4 merge,
  as ``paper_checks.py`` times it). With 2704 the ViT is ~20x heavier and a 48-image microbatch
  stashes more activations than an 80 GB GPU holds without recomputation (phase 3, not built).

Layout (modality-aware, fixed for the run): the ViT (patch embedding, blocks, norm, projector) gets
``k`` contiguous stages, the LM (embedding, blocks, norm, head) the other ``P*V - k``; within each
segment layers are cut by :func:`best_contiguous_split` on SEMU's per-layer fwd+bwd time averaged
over a representative batch (``M`` microbatches of the ``mixed`` regime, its own seed); ``k``
minimises the slowest stage. V=1 (one stage per rank: gpipe, 1f1b, zb_h1, dual_queue) and V=2
(8 stages round-robin, stage s on rank s % 4: interleaved_1f1b and dual_queue on the same layout).

Per batch, SEMU's :class:`StepModel` gives every (stage, microbatch)'s fwd / bwd (bwd_in + bwd_w) /
activation bytes once; the static schedules, ``dual_queue_schedule`` fed with those durations
(memory limit = device capacity - the rank's static bytes; messages timed like the emulator's), and
its ``split_backward`` variant are lowered, validated and emulated with the same costs.

Metrics per schedule, over batches: throughput relative to 1F1B (t_1f1b / t; mean, p10, max),
bubble fraction, no-bubble bound fraction (sum of per-rank work / (P x step time) = 1 - bubble),
busiest-rank bound fraction (max per-rank work / step time: how close to the best any order of
this layout's work can do), peak memory vs capacity, planner latency (schedule construction +
lowering + validation, median / p99 ms).

Run::

    python benchmarks/schedule_quality.py [--batches 100] [--microbatches 16] [--vit-tokens 169]
"""
from __future__ import annotations

import argparse
import functools
import json
import math
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dipc.errors import DipcError  # noqa: E402
from dipc.ir import StageInfo, TensorSpec  # noqa: E402
from dipc.ir.validate import validate  # noqa: E402
from dipc.passes.capture import capture  # noqa: E402
from dipc.passes.codegen import lower  # noqa: E402
from dipc.passes.dual_queue import TaskCosts, dual_queue_schedule  # noqa: E402
from dipc.passes.schedules import SCHEDULES  # noqa: E402
from dipc.semu.costs import CostModel, LengthStats, layer_cost_model  # noqa: E402
from dipc.semu.models import IMAGE_TOKENS, PAPER_MODELS, SEQ_LEN, build_paper_model, paper_example_batch  # noqa: E402
from dipc.semu.profiles import DTYPE_BYTES, load_preset  # noqa: E402
from dipc.semu.step_model import StepModel, best_contiguous_split, stats_for_layer  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "schedule_quality.json"

MODEL = "vlm_s"
PROFILE = "h800"
MAX_IMAGES = SEQ_LEN // IMAGE_TOKENS          # 48
VIT_PATCHES = 52 * 52                          # Qwen2-VL: 728 px / patch 14, before the 4x4 merge
REGIMES = ("interleaved", "caption", "mixed")
MIXED_SOURCES = (("interleaved", 0.35), ("caption", 0.30), ("text", 0.20), ("scienceqa", 0.15))
MIXED_RUN_MEAN = 8                             # mean samples per same-source run in "mixed"
MESSAGE_DTYPE = "bfloat16"

HONESTY = {
    "dip_phases_implemented": ["phase 2: greedy dual-queue stage interleaving (+ optional zero-bubble split)"],
    "not_implemented": ["modality sub-microbatches (each microbatch is scheduled whole)",
                        "phase 1: MCTS segment reordering (default priority: microbatch, then stage)",
                        "phase 3: per-layer memory optimisation / recomputation",
                        "per-module segment counts K_i (the layout is a contiguous modality split)",
                        "online planning loop on CPU workers"],
    "simulated_not_measured": True,
    "simulator": "SEMU StepModel + step emulator (analytical, uncalibrated H800 efficiency curves)",
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
# model, layout


@functools.lru_cache(maxsize=None)
def cost_model() -> CostModel:
    model = build_paper_model(MODEL).to(torch.bfloat16)
    batch = paper_example_batch(MODEL, num_images=8)
    batch = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in batch.items()}
    return layer_cost_model(capture(model, batch))


def _is_vit(path: str) -> bool:
    return path.startswith(("vision", "projector"))


@dataclass(frozen=True)
class Layout:
    """A modality-aware stage layout: ``stage_layers[s]`` on rank ``s % P``; ViT stages first."""

    P: int
    V: int
    stage_layers: tuple[tuple[str, ...], ...]
    vit_stages: int
    stage_ms: tuple[float, ...]          # fwd+bwd at the representative microbatch (mean)
    candidates: dict                     # k -> slowest stage ms

    @property
    def stages(self) -> list[StageInfo]:
        S = len(self.stage_layers)
        out = []
        for s in range(S):
            loads = ("pixel_values",) if s == 0 else ()
            if s == self.vit_stages:
                loads = loads + ("input_ids", "labels")
            out.append(StageInfo(id=s, rank=s % self.P, modality="vision" if s < self.vit_stages else "backbone",
                                 producers=(s - 1,) if s else (), grad_producers=(s - 1,) if s else (),
                                 loads=loads, has_loss=s == S - 1))
        return out

    def describe(self) -> str:
        parts = []
        for s, layers in enumerate(self.stage_layers):
            blocks = [p for p in layers if ".blocks." in p or ".layers." in p]
            kind = "ViT" if s < self.vit_stages else "LM"
            extra = len(layers) - len(blocks)
            parts.append(f"s{s}@r{s % self.P} {kind} {len(blocks)} blocks" + (f"+{extra}" if extra else "")
                         + f" ({self.stage_ms[s]:.0f} ms)")
        return "; ".join(parts)


def choose_layout(cm: CostModel, cluster, tp: int, rep: Sequence[dict[str, LengthStats]], P: int,
                  V: int) -> Layout:
    """ViT on ``k`` contiguous stages, LM on the rest, each segment balanced by SEMU's per-layer
    fwd+bwd time averaged over the representative microbatches; ``k`` minimises the slowest stage."""
    layers = list(cm.layers)
    step = StepModel(cm, cluster, [layers], list(rep), tp=tp, dtype="bfloat16")
    t = {p: statistics.fmean(step.layer_time(p, stats_for_layer(s, p)).total for s in rep) for p in layers}
    vit = [p for p in layers if _is_vit(p)]
    lm = [p for p in layers if not _is_vit(p)]
    S = P * V
    best, cands = None, {}
    for k in range(1, S):
        parts = []
        for seg, n in ((vit, k), (lm, S - k)):
            sizes = best_contiguous_split([t[p] for p in seg], n)
            i = 0
            for size in sizes:
                parts.append(tuple(seg[i:i + size]))
                i += size
        ms = tuple(sum(t[p] for p in part) * 1e3 for part in parts)
        cands[k] = max(ms)
        if best is None or max(ms) < max(best[2]) - 1e-12:
            best = (k, tuple(parts), ms)
    k, parts, ms = best
    return Layout(P=P, V=V, stage_layers=parts, vit_stages=k, stage_ms=ms, candidates=cands)


# ------------------------------------------------------------------------------------------------
# one batch


@dataclass
class BatchCosts:
    """Per-(stage, microbatch) numbers from SEMU, computed once per batch and layout."""

    step: StepModel
    fwd: list[list[float]]
    bwd_in: list[list[float]]
    bwd_w: list[list[float]]
    act: list[list[float]]
    msg_bytes: list[list[float]]        # output of stage s on mb m, per GPU (sharded over TP)
    static: list[float]                 # per rank
    comm: Callable[[int, int, int], float]

    def task_costs(self, split: bool) -> TaskCosts:
        f, bi, bw, a = self.fwd, self.bwd_in, self.bwd_w, self.act
        if split:
            return TaskCosts(fwd=lambda s, m: f[s][m], bwd=lambda s, m: bi[s][m], wgrad=lambda s, m: bw[s][m],
                             act=lambda s, m: a[s][m], comm=self.comm)
        return TaskCosts(fwd=lambda s, m: f[s][m], bwd=lambda s, m: bi[s][m] + bw[s][m],
                         act=lambda s, m: a[s][m], comm=self.comm)

    def work(self, P: int, stages: Sequence[StageInfo]) -> list[float]:
        w = [0.0] * P
        for st in stages:
            w[st.rank] += sum(self.fwd[st.id]) + sum(self.bwd_in[st.id]) + sum(self.bwd_w[st.id])
        return w


def batch_costs(cm: CostModel, cluster, tp: int, layout: Layout, stats: Sequence[dict],
                layer_cache: dict | None = None) -> BatchCosts:
    step = StepModel(cm, cluster, [list(x) for x in layout.stage_layers], list(stats), tp=tp, dtype="bfloat16")
    if layer_cache is not None:   # layer times depend only on (layer, stats): share across layouts
        step._layer_cache = layer_cache
    S, M = len(layout.stage_layers), len(stats)
    st = [[step.stage_time(s, m) for m in range(M)] for s in range(S)]
    msg = [[0.0] * M for _ in range(S)]
    for s in range(S):
        last = layout.stage_layers[s][-1]
        for m in range(M):
            msg[s][m] = cm.cost(last, stats_for_layer(stats[m], last)).out_bytes / tp
    P = layout.P

    def comm(p: int, c: int, m: int) -> float:
        # the emulator moves whole elements of MESSAGE_DTYPE; same rounding as the specs below
        width = DTYPE_BYTES[MESSAGE_DTYPE]
        nbytes = max(1, int(msg[p][m] // width)) * width
        return cluster.transfer_time(p % P, c % P, nbytes, tp)

    static = [0.0] * P
    for s in range(S):
        static[s % P] += step.static_bytes(s)
    return BatchCosts(step=step, fwd=[[x.fwd for x in row] for row in st],
                      bwd_in=[[x.bwd_in for x in row] for row in st], bwd_w=[[x.bwd_w for x in row] for row in st],
                      act=[[step.activation_bytes(s, m) for m in range(M)] for s in range(S)],
                      msg_bytes=msg, static=static, comm=comm)


def _specs(costs: BatchCosts):
    width = DTYPE_BYTES[MESSAGE_DTYPE]

    def specs(kind: str, mb: int, producer: int, consumer: int, sub: int = -1):
        n = max(1, int(costs.msg_bytes[producer][mb] // width))
        return (TensorSpec(kind="tensor", dtype=MESSAGE_DTYPE, shape=(n,)),)
    return specs


# (name, layout index 0: V=1 / 1: V=2, builder)
def _static(name: str):
    return lambda stages, P, M, costs, limits: SCHEDULES[name](stages, P, M)


def _dq(split: bool):
    return lambda stages, P, M, costs, limits: dual_queue_schedule(
        stages, P, M, costs.task_costs(split), memory_limit=limits, split_backward=split)


SCHEDULE_SET: tuple[tuple[str, int, Callable], ...] = (
    ("gpipe", 0, _static("gpipe")),
    ("1f1b", 0, _static("1f1b")),
    ("interleaved_1f1b", 1, _static("interleaved_1f1b")),
    ("zb_h1", 0, _static("zb_h1")),
    ("dual_queue", 0, _dq(False)),
    ("dual_queue+split", 0, _dq(True)),
    ("dual_queue V=2", 1, _dq(False)),
    ("dual_queue+split V=2", 1, _dq(True)),
)


def evaluate_batch(layouts: Sequence[Layout], costs: Sequence[BatchCosts], M: int, capacity: float) -> dict:
    """Every schedule of ``SCHEDULE_SET`` on one batch: planning latency, validation, emulation."""
    out = {}
    for name, li, build in SCHEDULE_SET:
        layout, c = layouts[li], costs[li]
        stages = layout.stages
        P = layout.P
        limits = [capacity - x for x in c.static]
        rec: dict = {"validated": False}
        t0 = time.perf_counter()
        try:
            orders = build(stages, P, M, c, limits)
            program = lower(stages, P, M, orders, schedule=name, specs=_specs(c))
            validate(program)
        except DipcError as e:
            rec["error"] = f"{type(e).__name__}: {str(e).splitlines()[0]}"
            out[name] = rec
            continue
        rec["plan_ms"] = (time.perf_counter() - t0) * 1e3
        rec["validated"] = True
        res = c.step.simulate(program, record=False)
        work = c.work(P, stages)
        rec.update(step_s=res.step_time, bubble=res.bubble_fraction,
                   bound_frac=sum(res.busy) / (P * res.step_time),
                   busiest_frac=max(work) / res.step_time,
                   peak_gb=max(res.peak_memory) / 1e9,
                   over_capacity=bool(res.ranks_over(capacity)))
        out[name] = rec
    return out


# ------------------------------------------------------------------------------------------------
# the run


def _pct(xs: Sequence[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs), q)) if xs else float("nan")


def summarise(batches: Sequence[dict], base: str = "1f1b") -> dict:
    names = [n for n, _, _ in SCHEDULE_SET]
    out = {}
    for name in names:
        recs = [(b["schedules"][name], b["schedules"][base]) for b in batches]
        ok = [(r, b) for r, b in recs if r["validated"] and b["validated"]]
        rel = [b["step_s"] / r["step_s"] for r, b in ok]
        plan = [r["plan_ms"] for r, _ in ok]
        out[name] = {
            "batches": len(recs), "validated": sum(r["validated"] for r, _ in recs),
            "errors": sorted({r["error"] for r, _ in recs if "error" in r})[:3],
            "rel_throughput_vs_1f1b": {"mean": statistics.fmean(rel) if rel else None,
                                       "p10": _pct(rel, 10) if rel else None, "min": min(rel, default=None),
                                       "max": max(rel, default=None)},
            "step_s_mean": statistics.fmean(r["step_s"] for r, _ in ok) if ok else None,
            "bubble_mean": statistics.fmean(r["bubble"] for r, _ in ok) if ok else None,
            "no_bubble_bound_frac_mean": statistics.fmean(r["bound_frac"] for r, _ in ok) if ok else None,
            "busiest_rank_bound_frac_mean": statistics.fmean(r["busiest_frac"] for r, _ in ok) if ok else None,
            "peak_memory_gb_max": max((r["peak_gb"] for r, _ in ok), default=None),
            "batches_over_capacity": sum(r["over_capacity"] for r, _ in ok),
            "plan_ms": {"median": _pct(plan, 50) if plan else None, "p99": _pct(plan, 99) if plan else None},
        }
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


def run(num_batches: int = 100, num_microbatches: int = 16, *, seed: int = 0, vit_tokens: int = IMAGE_TOKENS,
        progress: bool = False) -> dict:
    """The benchmark's core: draw batches, lay out the model, evaluate every schedule per batch."""
    t_start = time.perf_counter()
    pm = PAPER_MODELS[MODEL]
    P, tp = pm.pp, pm.tp
    cluster = load_preset(PROFILE)
    capacity = cluster.device.memory_capacity
    cm = cost_model()
    rep = pack_batch(np.random.default_rng(seed + 10_000), "mixed", num_microbatches)
    rep_stats = [microbatch_stats(mb, vit_tokens) for mb in rep]
    layouts = [choose_layout(cm, cluster, tp, rep_stats, P, 1), choose_layout(cm, cluster, tp, rep_stats, P, 2)]
    t_setup = time.perf_counter() - t_start

    rng = np.random.default_rng(seed)
    batches = []
    for i in range(num_batches):
        regime = REGIMES[i % len(REGIMES)]
        mbs = pack_batch(rng, regime, num_microbatches)
        stats = [microbatch_stats(mb, vit_tokens) for mb in mbs]
        t0 = time.perf_counter()
        cache: dict = {}
        costs = [batch_costs(cm, cluster, tp, lay, stats, cache) for lay in layouts]
        t_costs = time.perf_counter() - t0
        scheds = evaluate_batch(layouts, costs, num_microbatches, capacity)
        batches.append({
            "index": i, "regime": regime,
            "images": [mb.num_images for mb in mbs], "tokens": [mb.tokens for mb in mbs],
            "semu_costs_ms": t_costs * 1e3,
            "rank_work_s": costs[0].work(P, layouts[0].stages),
            "schedules": scheds,
        })
        if progress and (i + 1) % 10 == 0:
            print(f"  {i + 1}/{num_batches} batches, {time.perf_counter() - t_start:.0f} s", file=sys.stderr)

    imgs = [x for b in batches for x in b["images"]]
    by_regime = {r: summarise([b for b in batches if b["regime"] == r]) for r in REGIMES}
    return {
        "honesty": HONESTY,
        "code_state": code_state(),
        "setup": {
            "model": f"{MODEL} ({pm.encoder} + {pm.backbone}), bf16, built on meta", "tp": tp, "pp": P, "dp": 1,
            "profile": PROFILE, "memory_capacity_gb": capacity / 1e9, "microbatches": num_microbatches,
            "batches": num_batches, "seed": seed, "vit_tokens_per_image": vit_tokens,
            "lm_tokens_per_image": IMAGE_TOKENS, "seq_len": SEQ_LEN, "max_images": MAX_IMAGES,
            "regimes": {"interleaved": "text lognormal(700, 0.9) in [32, 8192]; images 0 w.p. 0.35 else zipf(2)",
                        "caption": "1 image; caption lognormal(24, 0.6) in [4, 256]",
                        "mixed": f"runs (geometric, mean {MIXED_RUN_MEAN}) from {dict(MIXED_SOURCES)}; text-only "
                                 "lognormal(1200, 1.0); scienceqa lognormal(250, 0.5), 0/1 image"},
            "packing": "greedy in arrival order, <= 8192 tokens and <= 48 images per sequence, one sequence "
                       "per microbatch, no padding (LM cost at the packed length)",
            "images_per_microbatch": {"mean": statistics.fmean(imgs), "p10": _pct(imgs, 10), "p50": _pct(imgs, 50),
                                      "p90": _pct(imgs, 90), "max": max(imgs), "min": min(imgs)},
            "message_model": "stage output (last layer out_bytes / TP) in bf16, eager p2p, emulator links",
            "dual_queue_memory_limit": "device capacity - rank's static bytes (params, grads, Adam)",
            "baseline": "1f1b (Megatron-like, non-interleaved, same V=1 layout)",
        },
        "layouts": [{"V": lay.V, "vit_stages": lay.vit_stages, "stage_ms_at_representative": list(lay.stage_ms),
                     "slowest_stage_ms_by_vit_stages": lay.candidates, "description": lay.describe(),
                     "stage_layers": [list(x) for x in lay.stage_layers]} for lay in layouts],
        "summary": summarise(batches),
        "by_regime": by_regime,
        "batches": batches,
        "seconds": {"setup": t_setup, "total": time.perf_counter() - t_start},
    }


# ------------------------------------------------------------------------------------------------


def _f(x, fmt):
    return "-" if x is None else format(x, fmt)


def print_table(result: dict) -> None:
    s = result["setup"]
    print(f"VLM-S (ViT 5B + Llama3 8B) TP{s['tp']} PP{s['pp']} on {s['profile']}, {s['batches']} batches x "
          f"{s['microbatches']} microbatches (packed 8192-token sequences), ViT on {s['vit_tokens_per_image']} "
          f"tokens/image")
    im = s["images_per_microbatch"]
    print(f"images per microbatch: mean {im['mean']:.1f}, p10 {im['p10']:.0f}, median {im['p50']:.0f}, "
          f"p90 {im['p90']:.0f}, max {im['max']}")
    for lay in result["layouts"]:
        cand = ", ".join(f"k={k}: {v:.0f}" for k, v in lay["slowest_stage_ms_by_vit_stages"].items())
        print(f"layout V={lay['V']}: ViT on {lay['vit_stages']} stage(s), LM on the rest, balanced within each "
              f"by SEMU fwd+bwd at the representative (mixed) batch; slowest stage ms by k ViT stages: {cand}")
        print(f"  {lay['description']}")
    print("PHASE 2 ONLY (no sub-microbatches, no MCTS reordering, no memory optimisation); SIMULATED, not measured.")
    cap = s["memory_capacity_gb"]
    head = (f"{'schedule':<22} {'valid':>7} {'rel mean':>8} {'p10':>6} {'min':>6} {'max':>6} {'bubble':>7} "
            f"{'no-bub':>7} {'busiest':>7} {'peak GB':>8} {'>cap':>5} {'plan ms':>8} {'p99':>7}")
    print(f"relative throughput = t(1f1b) / t(schedule); no-bub = sum work / (P x step); busiest = max rank work "
          f"/ step; memory capacity {cap:.1f} GB")
    print(head)
    print("-" * len(head))
    for name, r in result["summary"].items():
        rel = r["rel_throughput_vs_1f1b"]
        print(f"{name:<22} {r['validated']:>3}/{r['batches']:<3} {_f(rel['mean'], '8.3f')} {_f(rel['p10'], '6.3f')} "
              f"{_f(rel['min'], '6.3f')} {_f(rel['max'], '6.3f')} {_f(r['bubble_mean'], '7.1%')} "
              f"{_f(r['no_bubble_bound_frac_mean'], '7.1%')} {_f(r['busiest_rank_bound_frac_mean'], '7.1%')} "
              f"{_f(r['peak_memory_gb_max'], '8.1f')} {r['batches_over_capacity']:>5} "
              f"{_f(r['plan_ms']['median'], '8.1f')} {_f(r['plan_ms']['p99'], '7.1f')}")
        for e in r["errors"]:
            print(f"    error: {e[:150]}")
    print("by regime, mean relative throughput vs 1f1b:")
    names = list(result["summary"])
    print(f"  {'regime':<12} " + " ".join(f"{n:>12.12}" for n in names))
    for reg, summ in result["by_regime"].items():
        print(f"  {reg:<12} " + " ".join(_f(summ[n]["rel_throughput_vs_1f1b"]["mean"], "12.3f") for n in names))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batches", type=int, default=100)
    parser.add_argument("--microbatches", type=int, default=16)
    parser.add_argument("--vit-tokens", type=int, default=IMAGE_TOKENS,
                        help=f"ViT tokens per image: {IMAGE_TOKENS} (merged, default) or {VIT_PATCHES} (pre-merge)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    result = run(args.batches, args.microbatches, seed=args.seed, vit_tokens=args.vit_tokens, progress=True)
    print_table(result)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"{result['seconds']['total']:.0f} s; wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
