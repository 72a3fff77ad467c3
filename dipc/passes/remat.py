"""Recompute cheap glue values on the stage that reads them instead of sending them.

A value such as RoPE's ``(cos, sin)`` tables is computed once in the first stage from the batch
(``arange(input_ids.shape[1])``) and a buffer, and read by every decoder layer. Cut naively, it
crosses every stage boundary: on the example TinyLlama that is two ``[T, head_dim]`` tensors per
microbatch per boundary next to the hidden state (torch.distributed.pipelining users recompute
them in every stage by hand; on Hugging Face LLaVA the tables, the positions and the
``[B, 1, T, T]`` causal mask all crossed). This pass finds such values and copies their whole
producing *cone* into the consumer stage, so the edge disappears.

A value is recomputed on a consumer stage when all of these hold:
- producer and consumer are on different ranks (a same-rank edge is a free reference) and in the
  same modality module (so a sub-microbatched encoder never gains a whole-microbatch key);
- the value carries no gradient (recomputing it would not change the graph the backward walks);
- its cone, walked back from the value, ends only in batch keys, buffers/constants (``get_attr``
  of non-trainable tensors), Python scalars made from another stage's tensors (``h.shape[1]``:
  they keep travelling, as 0-d message leaves) and ``x.device`` of such tensors (read off a tensor
  the consumer still receives): no layer (``call_module``), no tensor from another stage;
- the cone is small (<= ``MAX_CONE_NODES``) and cheap: no contraction (matmul, conv, attention,
  einsum, pairwise distances, linear algebra...) and nothing random, uninitialised or in-place,
  whose recomputation would change numbers.
Cheap means elementwise and shape work on tensors about the value's size: it costs a few memory
passes on the consumer, where sending costs a serialised message plus the P2P latency.

Not done: a scalar leaf is read with ``.item()`` on arrival, which on a GPU waits for the receive
(the plan knows every microbatch's scalars, so the IR could carry them instead).
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
from torch import fx
from torch.utils._pytree import tree_flatten

MAX_CONE_NODES = 64

# substrings of op names whose recomputation costs real compute or changes numbers
_CONTRACTIONS = ("matmul", "mm", "bmm", "linear", "conv", "einsum", "attention", "tensordot", "addmm",
                 "baddbmm", "addbmm", "bilinear", "embedding", "cdist", "pdist", "dot", "outer", "inner", "kron",
                 "linalg", "cholesky", "inverse", "svd", "eig", "qr", "lstsq", "solve", "det", "pinv", "fft",
                 "stft")
# random draws, and uninitialised memory (``empty``: a recomputation would hold other garbage)
_RANDOM = ("rand", "dropout", "normal", "bernoulli", "multinomial", "uniform", "poisson", "exponential_",
           "cauchy_", "geometric_", "log_normal_", "empty")


def _op_name(node: fx.Node) -> str:
    t = node.target
    return (t if isinstance(t, str) else getattr(t, "__name__", str(t))).lower()


def _carries_grad(value: Any) -> bool:
    return any(isinstance(v, torch.Tensor) and v.requires_grad for v in tree_flatten(value)[0])


def _cheap_node(node: fx.Node, gm: fx.GraphModule, values: Mapping[str, Any]) -> bool:
    if node.op in ("placeholder",):
        return True
    if node.op == "get_attr":
        attr = gm
        for part in str(node.target).split("."):
            attr = getattr(attr, part, None)
        return not (isinstance(attr, torch.Tensor) and attr.requires_grad)
    if node.op not in ("call_function", "call_method"):
        return False
    name = _op_name(node)
    if any(c in name for c in _CONTRACTIONS) or any(r in name for r in _RANDOM):
        return False
    if node.op == "call_method" and name.endswith("_") and not name.endswith("__"):
        return False   # in-place method: its input changes, so recomputing it is not a copy
    return not _carries_grad(values.get(node.name))


def _device_read(node: fx.Node) -> bool:
    """``x.device``: the consumer can read it off any tensor it holds (a rank computes on one device)."""
    return (node.op == "call_function" and node.target is getattr and len(node.args) == 2
            and node.args[1] == "device")


def _is_scalar(value: Any) -> bool:
    return isinstance(value, (bool, int, float))


def _cone(value: fx.Node, gm: fx.GraphModule, values: Mapping[str, Any],
          allow_device: bool) -> tuple[set[fx.Node], set[fx.Node]] | None:
    """Nodes computing ``value`` back to batch keys, buffers, Python scalars (which keep travelling:
    e.g. ``h.shape[1]`` of a tensor made elsewhere, a 0-d message leaf) and, with ``allow_device``,
    ``x.device`` reads; None if it is not cheap. Returns (nodes to copy, device reads among them)."""
    seen: set[fx.Node] = set()
    devices: set[fx.Node] = set()
    todo = [value]
    while todo:
        n = todo.pop()
        if n in seen:
            continue
        if (n is not value and _is_scalar(values.get(n.name)) and n.op != "placeholder"
                and _cone(n, gm, values, allow_device=False) is None):
            continue   # made from a tensor of another stage (its length...): received as a scalar
        if allow_device and _device_read(n) and n.args[0].op != "placeholder":
            seen.add(n)
            devices.add(n)
            continue
        if not _cheap_node(n, gm, values):
            return None
        seen.add(n)
        if len(seen) > MAX_CONE_NODES:
            return None
        todo.extend(n.all_input_nodes)
    return {n for n in seen if n.op not in ("placeholder", "get_attr")}, devices


def remat_plan(gm: fx.GraphModule, node_stage: Mapping[str, int], stage_inputs: Sequence[Sequence[fx.Node]],
               stage_rank: Sequence[int], stage_mod: Sequence[str],
               values: Mapping[str, Any]) -> list[tuple[set[fx.Node], dict[fx.Node, fx.Node]]]:
    """Per stage: the glue nodes it recomputes (copies of other stages' nodes) instead of receiving,
    and for each ``x.device`` read among them the received tensor to read the device from instead.

    ``stage_inputs[s]``: the values stage ``s`` would receive from other stages without this pass."""
    plan: list[tuple[set[fx.Node], dict[fx.Node, fx.Node]]] = []
    for s, inputs in enumerate(stage_inputs):
        copies: set[fx.Node] = set()
        device_reads: set[fx.Node] = set()
        cones = {}
        for v in inputs:
            p = node_stage[v.name]
            if stage_rank[p] == stage_rank[s] or stage_mod[p] != stage_mod[s] or _is_scalar(values.get(v.name)):
                continue
            cones[v] = _cone(v, gm, values, allow_device=True)
        # a device read needs a tensor the stage still receives to read the device off
        anchor = next((v for v in inputs if cones.get(v) is None and isinstance(values.get(v.name), torch.Tensor)),
                      None)
        for v, cone in cones.items():
            if cone is not None and cone[1] and anchor is None:
                cone = _cone(v, gm, values, allow_device=False)
            if cone is not None:
                copies |= cone[0]
                device_reads |= cone[1]
        plan.append((copies, {d: anchor for d in device_reads}))
    return plan
