"""What SEMU charges a layer before and after dipc's kernel rewrite, at LLaMA-3-8B scale.

    python benchmarks/fused_costs.py [--tokens 4096]

Traces, on the meta device (no memory, no GPU), a LLaMA decoder block (D=4096, 32 heads, 8 KV
heads, FFN 14336) and an LM loss head (Linear 4096 -> 128256 + cross-entropy), each as written
and as ``dipc.kernels.rewrite.fuse_module`` rewrites it, in bf16, and prints SEMU's costs per
layer at ``--tokens`` tokens (one sequence): activation bytes kept for backward, bytes moved
forward/backward, and FLOPs (forward, backward-for-input, backward-for-weights). Writes
``benchmarks/results/fused_costs.json``. These are model outputs, not measurements: the kernel
tests check the activation figures against what autograd saves on real tensors.
"""
from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dipc.kernels.rewrite import fuse_module  # noqa: E402
from dipc.semu.symbolic import trace_layer  # noqa: E402
from examples.models.layers import LlamaBlock, RotaryEmbedding  # noqa: E402

_FIELDS = ("act_bytes", "fwd_bytes", "bwd_bytes", "fwd_flops", "bwd_in_flops", "bwd_w_flops")


class LossHead(nn.Module):
    """An LM head as models write it: Linear, flatten, float, cross-entropy."""

    def __init__(self, hidden: int, vocab: int) -> None:
        super().__init__()
        self.lm_head = nn.Linear(hidden, vocab, bias=False)

    def forward(self, h: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self.lm_head(h).flatten(0, 1).float(), labels.flatten(), ignore_index=-100)


def _costs(module: nn.Module, args: tuple) -> dict[str, float]:
    local = trace_layer(module, args, name=type(module).__name__)
    at = dict(zip(local.dim_symbols, local.example_dims))
    at.update({p: c.batch * c.q_len * (c.q_len + 1) / 2 for p, c in zip(local.pair_symbols, local.attention)})
    return {k: float(local.exprs[k].subs(at)) for k in _FIELDS}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "fused_costs.json"))
    a = ap.parse_args()
    t, d, dtype = a.tokens, 4096, torch.bfloat16
    with torch.device("meta"):
        block = LlamaBlock(d, 32, 8, 14336).to(dtype)
        head = LossHead(d, 128256).to(dtype)
        cos, sin = RotaryEmbedding(128)(torch.arange(t))
    h = torch.empty(1, t, d, dtype=dtype, device="meta", requires_grad=True)
    labels = torch.zeros(1, t, dtype=torch.long, device="meta")
    layers = {"llama_block": (block, (h, cos.to(dtype), sin.to(dtype))), "loss_head": (head, (h, labels))}
    rows = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name, (module, args) in layers.items():
            for variant, m in (("eager", module), ("fused", fuse_module(module))):
                rows.append({"layer": name, "variant": variant, "tokens": t, **_costs(m, args)})
    print(f"| layer | variant | act GiB | fwd GB moved | bwd GB moved | fwd TFLOP | bwdB TFLOP | bwdW TFLOP |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['layer']} | {r['variant']} | {r['act_bytes'] / 2**30:.3f} | {r['fwd_bytes'] / 1e9:.2f} | "
              f"{r['bwd_bytes'] / 1e9:.2f} | {r['fwd_flops'] / 1e12:.3f} | {r['bwd_in_flops'] / 1e12:.3f} | "
              f"{r['bwd_w_flops'] / 1e12:.3f} |")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps({"tokens": t, "dtype": "bfloat16", "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
