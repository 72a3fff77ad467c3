"""The DIP paper's motivating numbers from SEMU; prints paper vs SEMU side by side and writes JSON.

Check 1, the 37B VLM (paper §2.2, notes §1.1): ViT 5B (64 layers) + Qwen2 32B LM (64 layers) on
H800s, 8 images + 8192 text tokens per microbatch, 16 pipeline stages, 64 microbatches,
Megatron 1F1B, best static contiguous split. Paper: 6.75 ms per ViT layer, 10.5 ms per LM layer
(fwd+bwd), stage latencies 63-73.5 ms, 22.8% pipeline bubble.

SEMU builds the model on ``meta`` in bf16 from ``dipc/semu/models.py`` (VLM-M's configs with the
ViT at 64 layers), derives every layer's forward/backward FLOPs, bytes and activations with the
symbolic cost model, times them on the H800 profile with tensor parallelism (``StepModel``),
finds the best contiguous 16-stage split and emulates the 1F1B step. The paper does not state the
motivating example's TP; 16 stages on its 64-GPU H800 cluster leaves TP 4 (DP 1), which is used.

Two ViT input sizes are reported: the Qwen2-VL ViT the paper uses runs on the patches *before*
its spatial merge (728 px, patch 14: 52 x 52 = 2704 patches per image) and hands 169 merged tokens
to the LM; the ViT layer cost follows the 2704. Running the ViT on 169 tokens per image (the LM's
view) makes a ViT layer ~20x cheaper than the paper's 6.75 ms; it is printed as a second column.

Check 2, T2V batch imbalance (paper §2.2 / Fig. 2d, notes §1.2): T2V-S (Llama3 8B text encoder +
DiT 5B; the paper's "7B LM + 5B DiT" / "T2V 13B"), videos at 16 FPS and <= 16 s, clips grouped by
duration and aspect ratio into microbatches of <= 8 clips and <= 16 s, 100 packed batches; the
heaviest needs ~4.15x the FLOPs of the lightest. The clip-duration and caption-length
distributions are not in the paper (its curves are not available); the ones used are stated in the
output and JSON, with a sensitivity sweep.

Run::

    python benchmarks/paper_checks.py [--trace out.json] [--out benchmarks/results/paper_checks.json]
"""
from __future__ import annotations

import argparse
import functools
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dipc.ir import Op  # noqa: E402
from dipc.passes.capture import capture  # noqa: E402
from dipc.semu.costs import CostModel, LengthStats, layer_cost_model  # noqa: E402
from dipc.semu.emulator import simulate  # noqa: E402
from dipc.semu.models import (IMAGE_TOKENS, SEQ_LEN, VIDEO_FPS, paper_config,  # noqa: E402
                              paper_example_batch, video_tokens)
from dipc.semu.profiles import LinkProfile, load_preset  # noqa: E402
from dipc.semu.step_model import StepModel, best_contiguous_split, chain_program, stats_for_layer  # noqa: E402
from dipc.semu.trace import write_chrome_trace  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "paper_checks.json"

# --- check 1: the paper's setup (notes §1.1) ---
VIT_LAYERS, LM_LAYERS = 64, 64
VIT_MS, LM_MS = 6.75, 10.5                 # the paper's per-layer fwd+bwd times
NUM_STAGES, NUM_MICROBATCHES, NUM_IMAGES = 16, 64, 8
VIT_PATCHES = 52 * 52                      # Qwen2-VL ViT: 728 px / patch 14 = 52, before the 4x4 merge
TP = 4                                     # assumption: 16 stages x TP4 = the paper's 64 H800s
PAPER_VLM = {"vit_layer_ms": VIT_MS, "lm_layer_ms": LM_MS, "stage_min_ms": 63.0, "stage_max_ms": 73.5,
             "spread": 0.167, "bubble": 0.228}
FWD_SHARE = 1 / 3                          # hand variant only: backward = 2 x forward

# --- check 2 (notes §1.2, §7.3) ---
PAPER_T2V_RATIO = 4.15
NUM_BATCHES = 100
MAX_SECONDS, MAX_CLIPS = 16.0, 8
CLIP_MEDIAN_S, CLIP_SIGMA = 4.0, 0.7       # assumption (examples/data.py's T2V default): lognormal seconds
CAPTION_MEDIAN, CAPTION_SIGMA = 128, 0.5   # assumption: caption tokens lognormal, clipped to [16, 512]
ASPECTS = {"16:9": (576, 1024), "9:16": (1024, 576), "1:1": (768, 768)}   # MovieGen 768 px, equal area
ASPECT_P = (0.6, 0.2, 0.2)
DURATION_BUCKETS = (2.0, 4.0, 8.0)         # clips are grouped by (aspect, duration bucket)


def _to_bf16(batch: dict) -> dict:
    return {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in batch.items()}


# ------------------------------------------------------------------------------------------------
# check 1: 37B VLM


@functools.lru_cache(maxsize=None)
def vlm37b_cost_model() -> CostModel:
    """VLM-M (ViT 5B + Qwen2 32B) with the motivating example's 64 ViT layers, bf16, on meta."""
    from examples.models import VisionLanguageModel

    cfg = paper_config("vlm_m")
    cfg.vision_num_layers = VIT_LAYERS
    with torch.device("meta"):
        model = VisionLanguageModel(cfg).to(torch.bfloat16)
    captured = capture(model, _to_bf16(paper_example_batch("vlm_m", num_images=NUM_IMAGES)))
    return layer_cost_model(captured)


def vlm37b_stats(vit_tokens: int) -> dict[str, LengthStats]:
    img = LengthStats.of([vit_tokens] * NUM_IMAGES)
    lm = LengthStats.padded(1, SEQ_LEN)
    return {"vision": img, "projector": img, "language_model": lm, "lm_head": lm}


def _chain_sim(program, cluster, stage_fwd, stage_bwd, tp):
    def fn(ins):
        if ins.op is Op.FWD:
            return stage_fwd[ins.stage]
        if ins.op is Op.BWD:
            return stage_bwd[ins.stage]
        return 0.0
    return simulate(program, cluster, fn, gpus_per_rank=tp, record=False)


def _pipeline(names, fwd, bwd, kinds, program, cluster, tp, make_step=None):
    """Best split of per-layer (fwd, bwd) seconds; 1F1B with that split and perfectly balanced."""
    P = NUM_STAGES
    totals = [f + b for f, b in zip(fwd, bwd)]
    sizes = best_contiguous_split(totals, P)
    bounds = np.cumsum([0] + sizes)
    st_f = [sum(fwd[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]
    st_b = [sum(bwd[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]
    stage_ms = [(f + b) * 1e3 for f, b in zip(st_f, st_b)]
    split_kinds = []
    for a, b in zip(bounds[:-1], bounds[1:]):
        ks = kinds[a:b]
        split_kinds.append("+".join(f"{ks.count(k)}{k[0]}" for k in dict.fromkeys(ks)))
    out = {"split_layers": sizes, "split_kinds": split_kinds, "stage_ms": stage_ms}
    if make_step is not None:   # the real glue: a StepModel over the chosen split
        step = make_step([list(names[a:b]) for a, b in zip(bounds[:-1], bounds[1:])])
        program = chain_program(step, NUM_MICROBATCHES)
        out["step_model"] = step
        res = step.simulate(program, record=False)
        out["peak_memory_gib"] = [m / 2**30 for m in res.peak_memory]
        out["static_memory_gib"] = [step.static_bytes(s) / 2**30 for s in range(P)]
        out["activation_gib_per_mb"] = [step.activation_bytes(s, 0) / 2**30 for s in range(P)]
    else:
        res = _chain_sim(program, cluster, st_f, st_b, tp)
    mean_f, mean_b = sum(st_f) / P, sum(st_b) / P
    bal = _chain_sim(program, cluster, [mean_f] * P, [mean_b] * P, tp)
    M = NUM_MICROBATCHES
    out.update({
        "stage_min_ms": min(stage_ms), "stage_max_ms": max(stage_ms),
        "spread": max(stage_ms) / min(stage_ms) - 1,
        "bubble": res.bubble_fraction, "bubble_balanced": bal.bubble_fraction,
        "extra_bubble_points": res.bubble_fraction - bal.bubble_fraction,
        "step_ms": res.step_time * 1e3, "step_balanced_ms": bal.step_time * 1e3,
        "slowdown_vs_balanced": res.step_time / bal.step_time - 1,
        "closed_form_bubble": 1 - M * sum(stage_ms) / P / ((M + P - 1) * max(stage_ms)),
        "program": program,
    })
    return out


def vlm37b_semu(*, vit_tokens: int = VIT_PATCHES, tp: int = TP, all_layers: bool = False,
                bytes_mode: str = "max") -> dict:
    """SEMU's version of the motivating example (per-layer times from the symbolic cost model)."""
    cm = vlm37b_cost_model()
    h800 = load_preset("h800")
    stats = vlm37b_stats(vit_tokens)
    if all_layers:
        names = list(cm.layers)
    else:
        names = [p for p in cm.layers if p.startswith(("vision.blocks.", "language_model.layers."))]
    kinds = ["vit" if p.startswith(("vision", "projector")) else "lm" for p in names]
    def make_step(stage_layers):
        return StepModel(cm, h800, stage_layers, [stats] * NUM_MICROBATCHES, tp=tp, dtype="bfloat16",
                         bytes_mode=bytes_mode)

    step = make_step([names])
    times = [step.layer_time(p, stats_for_layer(stats, p)) for p in names]
    fwd = [t.fwd + t.tp_fwd for t in times]
    bwd = [t.bwd_in + t.bwd_w + t.tp_bwd for t in times]
    vit = step.layer_time("vision.blocks.10", stats["vision"])
    lm = step.layer_time("language_model.layers.10", stats["language_model"])
    vc = cm.cost("vision.blocks.10", stats["vision"])
    lc = cm.cost("language_model.layers.10", stats["language_model"])
    out = _pipeline(names, fwd, bwd, kinds, None, h800, tp, make_step=make_step)
    out.update({
        "setup": {"vit_tokens_per_image": vit_tokens, "images": NUM_IMAGES, "text_tokens": SEQ_LEN, "tp": tp,
                  "layers": "all" if all_layers else "transformer blocks", "num_layers": len(names),
                  "bytes_mode": bytes_mode, "profile": "h800"},
        "vit_layer_ms": vit.total * 1e3, "lm_layer_ms": lm.total * 1e3,
        "vit_layer": _lt(vit, vc), "lm_layer": _lt(lm, lc),
    })
    return out


def _lt(t, c) -> dict:
    return {"fwd_ms": t.fwd * 1e3, "bwd_in_ms": t.bwd_in * 1e3, "bwd_w_ms": t.bwd_w * 1e3,
            "tp_comm_ms": t.comm * 1e3, "fwd_tflop": c.fwd_flops / 1e12,
            "bwd_tflop": (c.bwd_in_flops + c.bwd_w_flops) / 1e12, "attn_fwd_tflop": c.attn_fwd_flops / 1e12,
            "fwd_gb": c.fwd_bytes / 1e9, "bwd_gb": c.bwd_bytes / 1e9, "act_gb": c.act_bytes / 1e9}


def vlm37b_hand(program) -> dict:
    """The paper's own per-layer times (6.75 / 10.5 ms, split 1:2 into fwd/bwd) in the emulator,
    links free (the paper's arithmetic, no communication)."""
    names = [f"vit{i}" for i in range(VIT_LAYERS)] + [f"lm{i}" for i in range(LM_LAYERS)]
    kinds = ["vit"] * VIT_LAYERS + ["lm"] * LM_LAYERS
    ms = [VIT_MS] * VIT_LAYERS + [LM_MS] * LM_LAYERS
    h800 = load_preset("h800")
    free = LinkProfile(latency=0.0, bandwidth=1e30)
    cluster = type(h800)(name="h800-free-links", device=h800.device, gpus_per_node=h800.gpus_per_node,
                         intra_node=free, inter_node=free, source="h800 with free links")
    out = _pipeline(names, [m * FWD_SHARE / 1e3 for m in ms], [m * (1 - FWD_SHARE) / 1e3 for m in ms],
                    kinds, program, cluster, 1)
    out.update({"vit_layer_ms": VIT_MS, "lm_layer_ms": LM_MS,
                "setup": {"per_layer_ms": "paper's", "fwd_share": FWD_SHARE, "links": "free"}})
    return out


def vlm37b_check(trace_path: Path | None = None) -> dict:
    t0 = time.perf_counter()
    semu = vlm37b_semu()
    semu169 = vlm37b_semu(vit_tokens=IMAGE_TOKENS)
    semu_all = vlm37b_semu(all_layers=True)
    hand = vlm37b_hand(semu["program"])
    per_tp = {}
    for tp in (1, 2, 4, 8):
        cm = vlm37b_cost_model()
        stats = vlm37b_stats(VIT_PATCHES)
        step = StepModel(cm, load_preset("h800"), [[]], [stats], tp=tp, dtype="bfloat16")
        v = step.layer_time("vision.blocks.10", stats["vision"])
        lm = step.layer_time("language_model.layers.10", stats["language_model"])
        per_tp[f"tp{tp}"] = {"vit_layer_ms": v.total * 1e3, "lm_layer_ms": lm.total * 1e3,
                             "vit_tp_comm_ms": v.comm * 1e3, "lm_tp_comm_ms": lm.comm * 1e3}
    sum_mode = vlm37b_semu(bytes_mode="sum")
    if trace_path is not None:
        write_chrome_trace(semu["step_model"].simulate(semu["program"]), trace_path)
    for d in (semu, semu169, semu_all, hand, sum_mode):
        d.pop("program", None)
        d.pop("step_model", None)
    return {"paper": PAPER_VLM, "semu": semu, "semu_vit169": semu169, "semu_all_layers": semu_all,
            "paper_layer_times_in_emulator": hand, "per_layer_by_tp": per_tp,
            "semu_bytes_sum": {k: sum_mode[k] for k in ("vit_layer_ms", "lm_layer_ms", "stage_min_ms",
                                                        "stage_max_ms", "bubble")},
            "seconds": time.perf_counter() - t0}


# ------------------------------------------------------------------------------------------------
# check 2: T2V packed-batch imbalance


@functools.lru_cache(maxsize=None)
def t2v_cost_model() -> CostModel:
    from dipc.semu.models import build_paper_model

    model = build_paper_model("t2v_s").to(torch.bfloat16)
    return layer_cost_model(capture(model, _to_bf16(paper_example_batch("t2v_s", clip_seconds=(2.0, 3.0, 1.0)))))


def _duration_bucket(seconds: float) -> int:
    return sum(seconds >= b for b in DURATION_BUCKETS)


def pack_t2v_batches(num_batches: int = NUM_BATCHES, *, seed: int = 0, median_s: float = CLIP_MEDIAN_S,
                     sigma: float = CLIP_SIGMA, group: bool = True) -> list[list[tuple[float, str, int]]]:
    """``num_batches`` packed microbatches of (seconds, aspect, caption tokens) clips: clips arrive in
    random order, each joins the open bin of its (aspect, duration bucket) group (one bin for all
    with ``group=False``) if the bin stays within 8 clips and 16 s, else that bin is emitted and
    a new one starts with the clip."""
    rng = np.random.default_rng(seed)
    bins: dict[tuple, list] = {}
    out: list[list[tuple[float, str, int]]] = []
    names = list(ASPECTS)
    while len(out) < num_batches:
        sec = float(np.clip(rng.lognormal(math.log(median_s), sigma), 0.5, MAX_SECONDS))
        sec = round(sec * VIDEO_FPS) / VIDEO_FPS
        aspect = names[int(rng.choice(len(names), p=ASPECT_P))]
        cap = int(np.clip(round(rng.lognormal(math.log(CAPTION_MEDIAN), CAPTION_SIGMA)), 16, 512))
        key = (aspect, _duration_bucket(sec)) if group else ()
        b = bins.get(key)
        if b is not None and (len(b) >= MAX_CLIPS or sum(c[0] for c in b) + sec > MAX_SECONDS):
            out.append(b)
            b = None
        if b is None:
            b = bins[key] = []
        b.append((sec, aspect, cap))
    return out[:num_batches]


def t2v_batch_stats(batch: list[tuple[float, str, int]]) -> dict[str, LengthStats]:
    video = [math.prod(video_tokens(sec, *ASPECTS[a])) for sec, a, _ in batch]
    text = [cap for _, _, cap in batch]
    vid = LengthStats.of(video, context=text)
    return {"text_encoder": LengthStats.of(text), "time_embed": LengthStats.of([1] * len(batch)),
            "video": vid, "blocks": vid, "final_layer": vid}


def t2v_batch_flops(cm: CostModel, batches) -> list[float]:
    out = []
    for b in batches:
        stats = t2v_batch_stats(b)
        total = 0.0
        for prefix in stats:
            paths = [p for p in cm.layers if p == prefix or p.startswith(prefix + ".")]
            c = cm.cost_sum(paths, stats[prefix])
            total += c.fwd_flops + c.bwd_in_flops + c.bwd_w_flops
        out.append(total)
    return out


def t2v_check() -> dict:
    t0 = time.perf_counter()
    cm = t2v_cost_model()
    batches = pack_t2v_batches()
    flops = t2v_batch_flops(cm, batches)
    step = StepModel(cm, load_preset("h800"), [cm.layers], [t2v_batch_stats(b) for b in batches], tp=4,
                     dtype="bfloat16")
    secs = [step.stage_time(0, m).total for m in range(len(batches))]
    hi, lo = int(np.argmax(flops)), int(np.argmin(flops))
    desc = lambda b: {"clips": len(b), "seconds": [c[0] for c in b], "aspect": b[0][1],  # noqa: E731
                      "video_tokens": sum(math.prod(video_tokens(s, *ASPECTS[a])) for s, a, _ in b),
                      "caption_tokens": sum(c[2] for c in b)}
    sens = {}
    for label, kw in {"grouped, sigma 0.5": {"sigma": 0.5}, "grouped, sigma 1.0": {"sigma": 1.0},
                      "grouped, median 2 s": {"median_s": 2.0}, "ungrouped (one bin)": {"group": False},
                      "grouped, seed 1": {"seed": 1}, "grouped, seed 2": {"seed": 2}}.items():
        f = t2v_batch_flops(cm, pack_t2v_batches(**kw))
        sens[label] = max(f) / min(f)
    return {
        "paper": {"ratio": PAPER_T2V_RATIO, "batches": NUM_BATCHES},
        "setup": {"model": "t2v_s (Llama3 8B text encoder + DiT 5B), bf16, fwd+bwd of every layer",
                  "video": f"{VIDEO_FPS} FPS, <= {MAX_SECONDS:g} s per batch, <= {MAX_CLIPS} clips; "
                           "TAE 8x temporal, 8x spatial, 1x2x2 patches; 768 px-equivalent area",
                  "clip_seconds": f"lognormal(median {CLIP_MEDIAN_S} s, sigma {CLIP_SIGMA}) in [0.5, 16] "
                                  "(assumed: the paper's duration curves are not available)",
                  "caption_tokens": f"lognormal(median {CAPTION_MEDIAN}, sigma {CAPTION_SIGMA}) in [16, 512] (assumed)",
                  "aspects": dict(zip(ASPECTS, ASPECT_P)), "grouping": "aspect x duration bucket "
                  f"{DURATION_BUCKETS} s"},
        "ratio": max(flops) / min(flops),
        "time_ratio_h800_tp4": max(secs) / min(secs),
        "tflops": {"max": max(flops) / 1e12, "min": min(flops) / 1e12, "median": float(np.median(flops)) / 1e12,
                   "sorted": [f / 1e12 for f in sorted(flops)]},
        "heaviest": desc(batches[hi]), "lightest": desc(batches[lo]),
        "sensitivity_ratio": sens,
        "seconds": time.perf_counter() - t0,
    }


# ------------------------------------------------------------------------------------------------


def _fmt_ms(x):
    return f"{x:.2f}"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trace", type=Path, help="write SEMU's simulated VLM step as a Chrome trace")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    vlm = vlm37b_check(args.trace)
    p, s, s169, sall, hand = (vlm["paper"], vlm["semu"], vlm["semu_vit169"], vlm["semu_all_layers"],
                              vlm["paper_layer_times_in_emulator"])
    cols = (s, s169, sall, hand)
    rows = [
        ("ViT layer fwd+bwd (ms)", f"{p['vit_layer_ms']:.2f}", [_fmt_ms(c["vit_layer_ms"]) for c in cols]),
        ("LM layer fwd+bwd (ms)", f"{p['lm_layer_ms']:.2f}", [_fmt_ms(c["lm_layer_ms"]) for c in cols]),
        ("fastest stage (ms)", f"{p['stage_min_ms']:.1f}", [f"{c['stage_min_ms']:.1f}" for c in cols]),
        ("slowest stage (ms)", f"{p['stage_max_ms']:.1f}", [f"{c['stage_max_ms']:.1f}" for c in cols]),
        ("spread (max/min - 1)", f"{p['spread']:.1%}", [f"{c['spread']:.1%}" for c in cols]),
        ("bubble, best split, 1F1B, M=64", f"{p['bubble']:.1%}", [f"{c['bubble']:.1%}" for c in cols]),
        ("  same work perfectly balanced", "-", [f"{c['bubble_balanced']:.1%}" for c in cols]),
        ("  extra over balanced (points)", "-", [f"{c['extra_bubble_points']:+.1%}" for c in cols]),
        ("  step time vs balanced", "-", [f"{c['slowdown_vs_balanced']:+.1%}" for c in cols]),
        ("  closed form 1-M*mean/((M+P-1)max)", "-", [f"{c['closed_form_bubble']:.1%}" for c in cols]),
        ("step time (ms)", "-", [f"{c['step_ms']:.0f}" for c in cols]),
        ("peak memory stage 0 (GiB/GPU)", "-", [f"{c['peak_memory_gib'][0]:.1f}" if "peak_memory_gib" in c else "-"
                                               for c in cols]),
    ]
    heads = ["paper", "SEMU", "SEMU vit169", "SEMU +emb/head", "paper times"]
    width = max(len(r[0]) for r in rows)
    print(f"37B VLM (ViT 5B x64 + Qwen2 32B x64), {NUM_IMAGES} images + {SEQ_LEN} tokens, "
          f"{NUM_STAGES} stages, {NUM_MICROBATCHES} microbatches, 1F1B, H800, TP{TP} (SEMU)")
    print("SEMU: ViT on 2704 patches/image (Qwen2-VL before merge); vit169: ViT on 169 tokens/image; "
          "+emb/head: all layers incl. embeddings and lm_head; paper times: 6.75/10.5 ms per layer in the emulator")
    print(f"{'metric':<{width}}  " + "  ".join(f"{h:>14}" for h in heads))
    for name, paper, vals in rows:
        print(f"{name:<{width}}  {paper:>14}  " + "  ".join(f"{v:>14}" for v in vals))
    print("best split (SEMU):        " + " ".join(s["split_kinds"]))
    print("best split (paper times): " + " ".join(hand["split_kinds"]))
    print("per-layer ms by TP (ViT 2704 patches/img | LM 8192):  " + ",  ".join(
        f"{k}: {v['vit_layer_ms']:.2f} | {v['lm_layer_ms']:.2f}" for k, v in vlm["per_layer_by_tp"].items()))
    bs = vlm["semu_bytes_sum"]
    print(f"bytes_mode='sum' (compute + unfused bytes): ViT {bs['vit_layer_ms']:.2f} ms, LM {bs['lm_layer_ms']:.2f} ms, "
          f"stages {bs['stage_min_ms']:.1f}-{bs['stage_max_ms']:.1f} ms, bubble {bs['bubble']:.1%}")

    t2v = t2v_check()
    print()
    print(f"T2V-S (Llama3 8B + DiT 5B), {NUM_BATCHES} packed batches (<= {MAX_CLIPS} clips, <= {MAX_SECONDS:g} s, "
          f"{VIDEO_FPS} FPS)")
    print(f"{'metric':<{width}}  {'paper':>14}  {'SEMU':>14}")
    print(f"{'heaviest / lightest batch FLOPs':<{width}}  {PAPER_T2V_RATIO:>13.2f}x  {t2v['ratio']:>13.2f}x")
    print(f"{'  same, H800 TP4 time':<{width}}  {'-':>14}  {t2v['time_ratio_h800_tp4']:>13.2f}x")
    print(f"{'  TFLOPs max / median / min':<{width}}  {'-':>14}  {t2v['tflops']['max']:.0f} / "
          f"{t2v['tflops']['median']:.0f} / {t2v['tflops']['min']:.0f}")
    print(f"  heaviest: {t2v['heaviest']}\n  lightest: {t2v['lightest']}")
    print("  sensitivity (ratio): " + ", ".join(f"{k}: {v:.2f}x" for k, v in t2v["sensitivity_ratio"].items()))

    args.out.parent.mkdir(parents=True, exist_ok=True)
    result = {"vlm37b_motivation": vlm, "t2v_batch_imbalance": t2v}
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
