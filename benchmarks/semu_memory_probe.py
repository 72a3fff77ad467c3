"""Where SEMU's memory model and the runtime part ways: per stage and microbatch, the bytes a FWD
keeps (stash) and the transient peaks of FWD and BWD, measured vs predicted.

``semu_accuracy.py`` compares only each rank's peak over a whole step; when that is off (as on the
GPU, where kernels save other tensors than on the CPU) this probe says which stage and which phase
the difference comes from. Measured with the same tracker as the accuracy benchmark
(:class:`dipc.runtime.measure.LiveMemory`: live tensor storages, charged to the running rank),
GPipe on 2 ranks, one batch per example model; predictions from :class:`StepModel` with the device
flash-style attention (``pred``) and with dense masked attention (``dense``: the CPU math path keeps
the probabilities).

    python benchmarks/semu_memory_probe.py [--device cuda] [--out F.json]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MODELS = ("vlm", "audio_llm", "t2v")
NUM_RANKS = 2


def probe_model(name: str, device: torch.device) -> list[dict]:
    import dipc
    from dipc.ir import Op
    from dipc.runtime.measure import LiveMemory, _run_ranks
    from dipc.semu.costs import layer_cost_model
    from dipc.semu.profiles import load_preset
    from dipc.semu.step_model import StepModel, pipeline_length_stats
    from examples.data import make_example
    from torch.utils._pytree import tree_map
    import dataclasses

    ex = make_example(name, seed=0)
    ex.model.to(device)
    mbs = ex.data.microbatches(4, 2)
    mbs = [tree_map(lambda t: t.to(device) if isinstance(t, torch.Tensor) else t, mb) for mb in mbs]
    pipe = dipc.compile(ex.model, mbs[0], num_stages=NUM_RANKS, schedule="gpipe", loss_weight=ex.loss_weight)
    program = pipe.plan(mbs, schedule="gpipe")
    cost_model = layer_cost_model(pipe.captured)
    stats = [pipeline_length_stats(pipe, mb) for mb in mbs]

    def step_model(dense: bool) -> StepModel:
        cluster = load_preset("h200")
        cluster = dataclasses.replace(cluster, device=dataclasses.replace(cluster.device, dense_masked_attention=dense))
        return StepModel.for_pipeline(pipe, cost_model, cluster, stats, **StepModel.runtime_options(pipe))
    sm, dense = step_model(False), step_model(True)

    rows: dict[tuple[int, int], dict] = {}
    pipe.step(mbs, program)   # warm-up (lazy init, allocator)
    pipe.model.zero_grad(set_to_none=True)
    with LiveMemory(NUM_RANKS) as mem:
        def prepare(interp) -> None:
            for op in (Op.FWD, Op.BWD):
                handler = interp.handlers[op]

                def measured(instr, _h=handler, _op=op, _r=interp.rank):
                    before = mem.live[_r]
                    mem.peak[_r] = before          # this instruction's own transient peak
                    _h(instr)
                    row = rows.setdefault((instr.stage, instr.mb), {"stage": instr.stage, "mb": instr.mb})
                    if _op is Op.FWD:
                        row["fwd_kept"] = mem.live[_r] - before
                        row["fwd_transient"] = mem.peak[_r] - mem.live[_r]
                    else:
                        row["bwd_freed"] = before - mem.live[_r]
                        row["bwd_transient"] = mem.peak[_r] - before
                interp.handlers[op] = measured

        def switch(rank: int) -> None:
            mem.rank = rank
        _run_ranks(pipe, program, mbs, prepare=prepare, on_switch=switch)
    for (stage, mb), row in rows.items():
        row["model"] = name
        row["pred_stash"] = sm.activation_bytes(stage, mb)
        row["pred_stash_dense"] = dense.activation_bytes(stage, mb)
        fwd = next(i for i in program.streams[pipe.stages[stage].rank] if i.op is Op.FWD and i.stage == stage and i.mb == mb)
        bwd = next(i for i in program.streams[pipe.stages[stage].rank] if i.op is Op.BWD and i.stage == stage and i.mb == mb)
        row["pred_fwd_workspace"] = sm.workspace_bytes(fwd)
        row["pred_bwd_workspace"] = sm.workspace_bytes(bwd)
        row["stash_err"] = row["pred_stash"] / row["fwd_kept"] - 1 if row.get("fwd_kept") else None
    return sorted(rows.values(), key=lambda r: (r["stage"], r["mb"]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    torch.manual_seed(0)
    device = torch.device(a.device)
    out = []
    print(f"{'model':10} {'st':>2} {'mb':>2} {'kept':>10} {'pred':>10} {'err':>7} {'dense':>10} {'fwd tr':>10} {'pred ws':>10} "
          f"{'bwd tr':>10} {'pred ws':>10} {'bwd freed':>10}")
    for name in MODELS:
        for r in probe_model(name, device):
            out.append(r)
            err = f"{r['stash_err']:+.1%}" if r["stash_err"] is not None else "-"
            print(f"{name:10} {r['stage']:>2} {r['mb']:>2} {r.get('fwd_kept', 0):>10.0f} {r['pred_stash']:>10.0f} {err:>7} "
                  f"{r['pred_stash_dense']:>10.0f} {r.get('fwd_transient', 0):>10.0f} {r['pred_fwd_workspace']:>10.0f} {r.get('bwd_transient', 0):>10.0f} "
                  f"{r['pred_bwd_workspace']:>10.0f} {r.get('bwd_freed', 0):>10.0f}")
    if a.out:
        Path(a.out).write_text(json.dumps({"device": str(device), "rows": out}, indent=1))


if __name__ == "__main__":
    main()
