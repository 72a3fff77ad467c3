"""The zero-bubble split's cost: BWD_I + BWD_W against one whole backward, on one pipeline stage.

Three ways to run the backward of the last stage of the benchmark chain (LLaMA-style blocks, norm,
LM head, cross-entropy; ``runtime_vs_torch_pipelining.TinyLlama``) for one microbatch:

- ``whole``: one ``autograd.backward`` (what BWD does; the floor for any split);
- ``rewalk``: ``autograd.grad`` to the stage input, then ``autograd.backward`` to the parameters
  from the outputs again (dipc's split before :mod:`dipc.runtime.split_backward`);
- ``split``: :func:`~dipc.runtime.split_backward.backward_input` then ``backward_weight``.

Medians of this thread's CPU time (``time.thread_time``: a shared machine's other load does not
count), one torch thread, per model width. Gradients of the three are checked equal first.

Usage::

    python benchmarks/split_backward.py [--dims 128,512] [--repeats 7]

Prints a table and writes ``benchmarks/results/split_backward.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from dipc.runtime.split_backward import backward_input, backward_weight  # noqa: E402
import runtime_vs_torch_pipelining as chain  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "split_backward.json"


def _stage(dim: int, seq: int):
    cfg = dict(vocab=1024, dim=dim, layers=8, heads=8 if dim >= 256 else 4, kv_heads=4 if dim >= 256 else 2,
               inter=int(dim * 8 / 3) // 8 * 8, microbatches=4, static_mb_size=1, static_seq=seq)
    pipe = chain.compile_dipc(chain.build_model(cfg), cfg, "zb_h1")
    first, last = pipe.stages[0], pipe.stages[1]
    ids = torch.randint(0, cfg["vocab"], (1, seq), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "labels": ids}
    with torch.no_grad():
        produced = dict(zip(first.output_values, first.module(*[batch[k] for k in first.input_keys])))
    params = [p for p in last.params if p.requires_grad]

    def run(mode: str) -> tuple[float, float, torch.Tensor, list[torch.Tensor]]:
        x = produced[last.input_values[-1][0]].detach().requires_grad_()
        args = [batch[k] for k in last.input_keys] + [produced[n].detach() for n, _ in last.input_values[:-1]] + [x]
        loss = last.module(*args)[-1]
        seed = torch.tensor(0.25)
        t0 = time.thread_time()
        if mode == "whole":
            torch.autograd.backward([loss], [seed])
            gx, t1 = x.grad, time.thread_time()
        elif mode == "rewalk":
            (gx,) = torch.autograd.grad([loss], [x], [seed], retain_graph=True)
            t1 = time.thread_time()
            torch.autograd.backward([loss], [seed], inputs=params)
        else:
            (gx,), work = backward_input([loss], [seed], [x], params)
            t1 = time.thread_time()
            backward_weight(work)
        t2 = time.thread_time()
        grads = [p.grad.clone() for p in params]
        for p in params:
            p.grad = None
        return t1 - t0, t2 - t1, gx, grads

    return run, len(params)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dims", default="128,512")
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args()
    torch.set_num_threads(1)
    rows = []
    for dim in (int(d) for d in args.dims.split(",")):
        run, num_params = _stage(dim, args.seq)
        ref = run("whole")
        for mode in ("rewalk", "split"):   # same gradients before timing anything
            _, _, gx, grads = run(mode)
            torch.testing.assert_close(gx, ref[2], rtol=1e-4, atol=1e-6)
            for a, b in zip(grads, ref[3]):
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
        times: dict[str, list[tuple[float, float]]] = {m: [] for m in ("whole", "rewalk", "split")}
        for _ in range(args.repeats):   # interleaved, so drift hits all three alike
            for mode in times:
                times[mode].append(run(mode)[:2])
        row = {"dim": dim, "seq": args.seq, "params": num_params}
        for mode, ts in times.items():
            row[f"{mode}_i_ms"] = statistics.median(a for a, _ in ts) * 1e3
            row[f"{mode}_w_ms"] = statistics.median(b for _, b in ts) * 1e3
            row[f"{mode}_total_ms"] = statistics.median(a + b for a, b in ts) * 1e3
        rows.append(row)
    print(f"one stage's backward per microbatch, CPU ms (median of {args.repeats}; load avg "
          f"{os.getloadavg()[0]:.1f}); I = input grads, W = weight grads")
    print(f"{'dim':>5s} {'whole':>8s} {'rewalk I+W':>16s} {'split I+W':>16s} {'split/rewalk':>12s} {'split/whole':>11s}")
    for r in rows:
        print(f"{r['dim']:5d} {r['whole_total_ms']:8.2f} {r['rewalk_i_ms']:7.2f}+{r['rewalk_w_ms']:<7.2f} "
              f"{r['split_i_ms']:7.2f}+{r['split_w_ms']:<7.2f} {r['split_total_ms'] / r['rewalk_total_ms']:12.2f} "
              f"{r['split_total_ms'] / r['whole_total_ms']:11.2f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"measured_on": "CPU, one torch thread, thread CPU time", "rows": rows,
                               "loadavg_1m": os.getloadavg()[0], "torch": torch.__version__}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
