"""dipc's local executor on one device vs plain single-device training on the same microbatches.

All pipeline ranks run in this process on one device (``CompiledPipeline.step``), so the step does
the same arithmetic as a plain loop of forward/backward over the microbatches plus one optimizer
step; the difference is what the interpreter costs (instruction dispatch, message hand-over, the
split backward's bookkeeping). Measured for a LLaMA-style chain (the model of
``runtime_vs_torch_pipelining.py``) under 1F1B, interleaved 1F1B and the zero-bubble split, with
dipc's fused Triton kernels on and off, in the same run.

    python benchmarks/runtime_gpu.py             # CUDA when present (fp32 weights and activations)
    python benchmarks/runtime_gpu.py --device cpu --dim 128 --seq 64 --steps 3   # smoke run

A step's time is wall time between device synchronisations (median over ``--steps`` after
``--warmup``); peak memory is ``torch.cuda.max_memory_allocated`` over one step (CUDA only).
Prints a table and writes ``benchmarks/results/runtime_gpu.json``.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import dipc  # noqa: E402
from runtime_vs_torch_pipelining import TinyLlama  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "runtime_gpu.json"
SCHEDULES = {"1f1b": 1, "interleaved_1f1b": 2, "zb_h1": 1}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _timed(step: Callable[[], float], device: torch.device, warmup: int, steps: int) -> dict[str, float | None]:
    """Median wall time of ``steps`` steps after ``warmup``; ``first_loss``: the first step's loss
    (every variant starts from the same weights, so these must agree)."""
    first_loss = float(step())
    for _ in range(warmup - 1):
        step()
    times = []
    peak = None
    for _ in range(steps):
        _sync(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        step()
        _sync(device)
        times.append(time.perf_counter() - t0)
        if device.type == "cuda":
            peak = max(peak or 0, torch.cuda.max_memory_allocated())
    return {"median_s": statistics.median(times), "min_s": min(times), "peak_bytes": peak, "first_loss": first_loss}


def _batches(cfg: dict, device: torch.device) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(1234)
    mbs = []
    for _ in range(cfg["microbatches"]):
        ids = torch.randint(0, cfg["vocab"], (cfg["mb_size"], cfg["seq"]), generator=g)
        labels = torch.randint(0, cfg["vocab"], (cfg["mb_size"], cfg["seq"]), generator=g)
        mbs.append({"input_ids": ids.to(device), "labels": labels.to(device)})
    return mbs


def _model(cfg: dict, device: torch.device) -> TinyLlama:
    torch.manual_seed(0)
    return TinyLlama(cfg["vocab"], cfg["dim"], cfg["layers"], cfg["heads"], cfg["kv_heads"], cfg["inter"]).to(device)


def plain_step(model: TinyLlama, mbs: list[dict], weights: list[float],
               opt: torch.optim.Optimizer) -> Callable[[], float]:
    """What a user without pipelining runs on one device: weighted losses, one backward each."""
    def step() -> float:
        total = 0.0
        for mb, w in zip(mbs, weights):
            loss = model(mb["input_ids"], mb["labels"]) * w
            loss.backward()
            total += loss.detach()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return total
    return step


def run(cfg: dict, device: torch.device, warmup: int, steps: int) -> dict[str, Any]:
    mbs = _batches(cfg, device)
    layers = ["embed_tokens"] + [f"layers.{i}" for i in range(cfg["layers"])] + ["norm", "lm_head"]
    rows: dict[str, Any] = {}
    model = _model(cfg, device)
    pipe0 = dipc.compile(model, mbs[0], num_stages=2, layers=layers, fused_kernels=False,
                         optimizer=lambda ps: torch.optim.SGD(ps, lr=1e-3))
    weights = pipe0.loss_weights(mbs)
    rows["plain"] = _timed(plain_step(model, mbs, weights, torch.optim.SGD(model.parameters(), lr=1e-3)),
                           device, warmup, steps)
    print(f"plain torch: {rows['plain']['median_s'] * 1e3:.2f} ms", flush=True)
    for fused in (False, True):
        for schedule, chunks in SCHEDULES.items():
            model = _model(cfg, device)
            pipe = dipc.compile(model, mbs[0], num_stages=2, chunks=chunks, schedule=schedule, layers=layers,
                                fused_kernels=fused, optimizer=lambda ps: torch.optim.SGD(ps, lr=1e-3))
            program = pipe.plan(mbs, schedule=schedule)
            r = _timed(lambda: pipe.step(mbs, program).loss, device, warmup, steps)
            r["instructions"] = sum(len(s) for s in program.streams)
            r["overhead_per_instruction_s"] = (r["median_s"] - rows["plain"]["median_s"]) / r["instructions"]
            key = f"{schedule}{'+fused' if fused else ''}"
            rows[key] = r
            print(f"{key}: {r['median_s'] * 1e3:.2f} ms", flush=True)
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--mb-size", type=int, default=2)
    ap.add_argument("--microbatches", type=int, default=8)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--out", default=str(RESULTS))
    a = ap.parse_args()
    device = torch.device(a.device)
    cfg = dict(vocab=32000, dim=a.dim, layers=a.layers, heads=max(1, a.dim // 64), kv_heads=max(1, a.dim // 256),
               inter=int(a.dim * 8 / 3) // 64 * 64, seq=a.seq, mb_size=a.mb_size, microbatches=a.microbatches)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"# dipc local executor vs plain training on {where}, torch {torch.__version__}: {cfg}", flush=True)
    rows = run(cfg, device, a.warmup, a.steps)
    plain = rows["plain"]["median_s"]
    tokens = cfg["microbatches"] * cfg["mb_size"] * cfg["seq"]
    print("| run | step ms | tokens/s | vs plain | overhead / instruction | peak MiB |")
    print("|---|---|---|---|---|---|")
    for key, r in rows.items():
        ovh = r.get("overhead_per_instruction_s")
        peak = f"{r['peak_bytes'] / 2**20:.0f}" if r.get("peak_bytes") else "—"
        print(f"| {key} | {r['median_s'] * 1e3:.2f} | {tokens / r['median_s']:.0f} | {plain / r['median_s']:.3f}x | "
              f"{'—' if ovh is None else f'{ovh * 1e6:.1f} us'} | {peak} |")
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"device": where, "torch": torch.__version__, "config": cfg, "warmup": a.warmup,
                               "steps": a.steps, "tokens_per_step": tokens, "results": rows}, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
