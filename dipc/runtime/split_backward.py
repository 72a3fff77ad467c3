"""The zero-bubble split of one stage's backward: BWD_I (input gradients) then BWD_W (weight
gradients), walking the backward graph once in total rather than twice.

Why: the obvious split -- ``autograd.grad(outputs, inputs, retain_graph=True)`` for BWD_I, then
``autograd.backward(outputs, inputs=params)`` for BWD_W -- makes BWD_W re-run every node on the
activation-gradient path again (each layer's weight gradient needs the gradient of that layer's
output, which only the path from the stage outputs provides), so BWD_W cost a whole backward.

How (the idea behind torch.distributed.pipelining's ``stage_backward_input`` /
``stage_backward_weight``, written here from the graph's definition): call a node of the
backward graph *on the input path* when it leads to the stage inputs, and an *intermediate*
when it is on the input path and also has an edge into a weight-only subgraph (typically the
``mm`` of a linear layer: one edge towards the activations, one towards ``W``). BWD_I asks the
input-gradient pass also for the gradient flowing into every intermediate (``GradientEdge``
objects among the ``inputs`` of ``autograd.grad``). BWD_W then starts the backward *at those
intermediates*, with the kept gradients, restricted to the parameters, so it runs only the
weight-gradient nodes.

Intermediates on one chain (layer 2's ``mm`` leads, through the activations, to layer 1's) must
not share a backward call: the call from layer 2 would walk the activation path down to layer 1
again. So they are grouped by *depth* (the most intermediates on any path below a node): nodes
of equal depth cannot reach one another, and each depth is one backward call. A parameter used
under intermediates of several depths (a tied weight, a DiT's conditioning MLP feeding every
block) would be reached through the activation path from every deeper call, which on the T2V
example cost 17x a whole backward; then BWD_W walks once from the stage outputs instead (the
plain split's cost).

The graph analysis itself is :mod:`dipc.passes.grad_split`, shared with SEMU, which runs it on
each layer's fake graph to count the captured gradients BWD_I keeps alive until BWD_W.

Outputs whose graph does not lead to any input (the first stage, whose inputs are token ids, or
an output computed from parameters alone) are weight work only: BWD_W runs them from the given
output gradients, and BWD_I does nothing for them.

Stages with recomputed (checkpointed) layers take the plain split instead (``rewalk=True``):
``torch.utils.checkpoint`` re-runs a layer's forward once per backward call that unpacks its
saved tensors, and the depth calls would each re-run the layers they touch; one walk from the
stage outputs re-runs each layer once (what SEMU charges for recomputation under BWD_W).

Not handled: leaves that are neither stage inputs nor the listed parameters get no gradient in
either pass (``autograd.backward`` with ``inputs=`` semantics, as before).
"""
from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch.autograd.graph import GradientEdge, Node, get_gradient_edge

from dipc.passes.grad_split import analyse_split

__all__ = ["WeightGradWork", "backward_input", "backward_weight", "param_nodes", "walks_whole"]


@dataclass
class _Call:
    """One backward call of BWD_W: from ``edges`` (gradients ``grads``) to ``params``."""

    edges: list[GradientEdge]
    grads: list[torch.Tensor]
    params: list[torch.Tensor]


@dataclass
class WeightGradWork:
    """What BWD_I leaves for BWD_W: the backward calls that accumulate the weight gradients."""

    calls: list[_Call]


def walks_whole(outputs: Sequence[torch.Tensor], inputs: Sequence[torch.Tensor], params: Sequence[torch.Tensor]) -> bool:
    """Whether :func:`backward_weight` after :func:`backward_input` of this graph runs the whole
    backward (a parameter shared across depths, or no input taking a gradient) rather than only
    the weight-gradient nodes. The analysis alone, no backward runs: SEMU asks it of a probe
    forward (:meth:`dipc.api.Pipeline.whole_wgrad_stages`) to cost BWD_W as the runtime runs it."""
    roots = [t.grad_fn for t in outputs if t.grad_fn is not None]
    leaves = [x for x in inputs if x.requires_grad]
    if not roots or not params:
        return False
    if not leaves:
        return True
    split = analyse_split(roots, {get_gradient_edge(x).node for x in leaves}, set(param_nodes(params)))
    return split.shared_across_depths()


def param_nodes(params: Sequence[torch.Tensor]) -> dict[Node, torch.Tensor]:
    """Each parameter's gradient accumulator node -> the parameter. Holding the nodes keeps them
    the ones every graph built meanwhile uses, so a caller may reuse this map for a whole step."""
    return {get_gradient_edge(p).node: p for p in params}


def backward_input(outputs: Sequence[torch.Tensor], grads: Sequence[torch.Tensor],
                   inputs: Sequence[torch.Tensor], params: Sequence[torch.Tensor], *, rewalk: bool = False,
                   nodes: dict[Node, torch.Tensor] | None = None) -> tuple[list[torch.Tensor | None], WeightGradWork]:
    """BWD_I: the gradients of ``inputs`` (``None`` where unused) from ``outputs`` seeded with
    ``grads``, and the work BWD_W needs to accumulate the gradients of ``params`` into ``.grad``.
    ``rewalk``: BWD_W walks again from the outputs (for checkpointed layers, see module docstring).
    ``nodes``: :func:`param_nodes` of ``params``, if the caller keeps it."""
    root_edges = [get_gradient_edge(t) for t in outputs]
    whole = [_Call(root_edges, list(grads), list(params))] if root_edges and params else []
    if not inputs or not root_edges:   # nothing upstream takes a gradient: the whole backward is weight work
        return [None] * len(inputs), WeightGradWork(whole)
    if rewalk:
        result = torch.autograd.grad(list(outputs), list(inputs), list(grads), retain_graph=True, allow_unused=True)
        return list(result), WeightGradWork(whole)
    param_of = param_nodes(params) if nodes is None else nodes
    split = analyse_split([e.node for e in root_edges], {get_gradient_edge(x).node for x in inputs}, set(param_of))
    on_path, owned, depth, below = split.on_path, split.owned, split.depth, split.below
    # the gradient flowing into each intermediate, asked of the same backward as the input grads
    # (a GradientEdge among ``inputs`` is captured where it enters its node; the node still runs)
    kept = split.kept_edges()
    every = torch.autograd.grad(list(outputs), [*inputs, *kept], list(grads), retain_graph=True, allow_unused=True)
    result = list(every[:len(inputs)])
    captured: dict[Node, list[tuple[GradientEdge, torch.Tensor]]] = defaultdict(list)
    for edge, g in zip(kept, every[len(inputs):]):
        if g is not None:
            captured[edge.node].append((edge, g))

    calls = []
    roots_off_path = [(e, g) for e, g in zip(root_edges, grads) if e.node not in on_path]
    if roots_off_path:
        reached = frozenset().union(*(below[e.node] for e, _ in roots_off_path))
        if reached:
            calls.append(_Call([e for e, _ in roots_off_path], [g for _, g in roots_off_path],
                               [param_of[n] for n in reached]))
    if split.shared_across_depths():
        # a parameter used at several depths (a conditioning MLP feeding every DiT block, a tied
        # embedding): the deeper calls would each walk the activation path down to it again --
        # measured 17x a whole backward on the T2V example -- so BWD_W walks once from the outputs
        return result, WeightGradWork(whole)
    by_depth: dict[int, list[Node]] = defaultdict(list)
    for node in owned:
        by_depth[depth[node]].append(node)
    for d, nodes in sorted(by_depth.items()):
        edges, seeds = [], []
        for node in nodes:
            for edge, g in captured.get(node, ()):
                edges.append(edge)
                seeds.append(g)
        if not edges:
            continue
        ps = frozenset().union(*(owned[n] for n in nodes))
        calls.append(_Call(edges, seeds, [param_of[n] for n in ps]))
    return result, WeightGradWork(calls)


def backward_weight(work: WeightGradWork) -> None:
    """BWD_W: accumulate the parameters' gradients into ``.grad`` (as ``autograd.backward`` does)."""
    for call in work.calls:
        torch.autograd.backward(call.edges, call.grads, retain_graph=True, inputs=call.params)
