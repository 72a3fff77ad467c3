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
``mm`` of a linear layer: one edge towards the activations, one towards ``W``). BWD_I runs the
input-gradient pass with a pre-hook on every intermediate that keeps the gradient flowing into
it. BWD_W then starts the backward *at those intermediates*, with the kept gradients, restricted
to the parameters, so it runs only the weight-gradient nodes.

Intermediates on one chain (layer 2's ``mm`` leads, through the activations, to layer 1's) must
not share a backward call: the call from layer 2 would walk the activation path down to layer 1
again. So they are grouped by *depth* (the most intermediates on any path below a node): nodes
of equal depth cannot reach one another, and each depth is one backward call. A parameter used
under intermediates of several depths (a tied weight) would also be reached through the
activation path from the deeper call; that call zeroes the gradient entering the other depths'
intermediates owning it, so each use is counted once (correct, but walks that path: the rare
case pays what the general one saves).

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
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch.autograd.graph import GradientEdge, Node, get_gradient_edge

__all__ = ["WeightGradWork", "backward_input", "backward_weight"]


@dataclass
class _Call:
    """One backward call of BWD_W: from ``edges`` (gradients ``grads``) to ``params``."""

    edges: list[GradientEdge]
    grads: list[torch.Tensor]
    params: list[torch.Tensor]
    zero_nodes: list[Node] = field(default_factory=list)   # intermediates of other depths (tied weights)


@dataclass
class WeightGradWork:
    """What BWD_I leaves for BWD_W: the backward calls that accumulate the weight gradients."""

    calls: list[_Call]


def _walk(roots: Sequence[Node]) -> dict[Node, tuple[Node | None, ...]]:
    """Every node reachable from ``roots`` -> its children (``next_functions`` nodes)."""
    children: dict[Node, tuple[Node | None, ...]] = {}
    stack = list(roots)
    while stack:
        node = stack.pop()
        if node in children:
            continue
        kids = tuple(f for f, _ in node.next_functions)
        children[node] = kids
        stack.extend(k for k in kids if k is not None and k not in children)
    return children


def _input_path(children: dict[Node, tuple[Node | None, ...]], input_nodes: set[Node]) -> set[Node]:
    """The nodes from which some input node is reachable (the input nodes included)."""
    parents: dict[Node, list[Node]] = defaultdict(list)
    for node, kids in children.items():
        for k in kids:
            if k is not None:
                parents[k].append(node)
    found = {n for n in input_nodes if n in children}
    stack = list(found)
    while stack:
        for p in parents.get(stack.pop(), ()):
            if p not in found:
                found.add(p)
                stack.append(p)
    return found


def _post_order(roots: Sequence[Node], children: dict[Node, tuple[Node | None, ...]],
                keep: Callable[[Node], bool]) -> list[Node]:
    """Nodes reachable from ``roots`` through nodes that ``keep`` accepts, children before parents."""
    order: list[Node] = []
    visited: set[Node] = set()
    stack: list[tuple[Node, bool]] = [(r, False) for r in roots if keep(r)]
    while stack:
        node, expanded = stack.pop()
        if expanded:
            order.append(node)
            continue
        if node in visited:
            continue
        visited.add(node)
        stack.append((node, True))
        stack.extend((k, False) for k in children[node] if k is not None and k not in visited and keep(k))
    return order


def _params_below(node: Node, children: dict[Node, tuple[Node | None, ...]], param_nodes: set[Node],
                  memo: dict[Node, frozenset[Node]]) -> frozenset[Node]:
    """Parameter nodes reachable from ``node`` (off the input path, as is everything below it)."""
    if node not in memo:
        for n in _post_order([node], children, lambda n: n not in memo):
            below = {n} & param_nodes
            for k in children[n]:
                if k is not None:
                    below.update(memo[k])
            memo[n] = frozenset(below)
    return memo[node]


def backward_input(outputs: Sequence[torch.Tensor], grads: Sequence[torch.Tensor],
                   inputs: Sequence[torch.Tensor], params: Sequence[torch.Tensor], *, rewalk: bool = False
                   ) -> tuple[list[torch.Tensor | None], WeightGradWork]:
    """BWD_I: the gradients of ``inputs`` (``None`` where unused) from ``outputs`` seeded with
    ``grads``, and the work BWD_W needs to accumulate the gradients of ``params`` into ``.grad``.
    ``rewalk``: BWD_W walks again from the outputs (for checkpointed layers, see module docstring)."""
    root_edges = [get_gradient_edge(t) for t in outputs]
    whole = [_Call(root_edges, list(grads), list(params))] if root_edges and params else []
    if not inputs or not root_edges:   # nothing upstream takes a gradient: the whole backward is weight work
        return [None] * len(inputs), WeightGradWork(whole)
    if rewalk:
        result = torch.autograd.grad(list(outputs), list(inputs), list(grads), retain_graph=True, allow_unused=True)
        return list(result), WeightGradWork(whole)
    param_of: dict[Node, torch.Tensor] = {get_gradient_edge(p).node: p for p in params}
    param_nodes = set(param_of)
    children = _walk([e.node for e in root_edges])
    on_path = _input_path(children, {get_gradient_edge(x).node for x in inputs})

    # intermediates: on the input path, with an edge into a subgraph that holds parameters
    memo: dict[Node, frozenset[Node]] = {}
    owned: dict[Node, frozenset[Node]] = {}
    for node in on_path:
        below: set[Node] = set()
        for k in children[node]:
            if k is not None and k not in on_path:
                below |= _params_below(k, children, param_nodes, memo)
        if below:
            owned[node] = frozenset(below)

    # depth: the most intermediates on any path strictly below a node (equal depth: unrelated)
    depth: dict[Node, int] = {}
    for node in _post_order([e.node for e in root_edges], children, on_path.__contains__):
        depth[node] = max((depth[k] + (k in owned) for k in children[node] if k is not None and k in on_path),
                          default=0)

    captured: dict[Node, tuple[torch.Tensor | None, ...]] = {}

    def keep(node: Node):
        def hook(grad_outputs: tuple[torch.Tensor | None, ...]) -> None:
            captured[node] = grad_outputs
        return hook

    handles = [node.register_prehook(keep(node)) for node in owned]
    try:
        result = list(torch.autograd.grad(list(outputs), list(inputs), list(grads), retain_graph=True,
                                          allow_unused=True))
    finally:
        for h in handles:
            h.remove()

    calls = []
    roots_off_path = [(e, g) for e, g in zip(root_edges, grads) if e.node not in on_path]
    if roots_off_path:
        below = frozenset().union(*(_params_below(e.node, children, param_nodes, memo) for e, _ in roots_off_path))
        if below:
            calls.append(_Call([e for e, _ in roots_off_path], [g for _, g in roots_off_path],
                               [param_of[n] for n in below]))
    by_depth: dict[int, list[Node]] = defaultdict(list)
    for node in owned:
        by_depth[depth[node]].append(node)
    depths_of: dict[Node, set[int]] = defaultdict(set)
    for node, ps in owned.items():
        for p in ps:
            depths_of[p].add(depth[node])
    for d, nodes in sorted(by_depth.items()):
        edges, seeds = [], []
        for node in nodes:
            for i, g in enumerate(captured.get(node, ())):
                if g is not None:
                    edges.append(GradientEdge(node, i))
                    seeds.append(g)
        if not edges:
            continue
        ps = frozenset().union(*(owned[n] for n in nodes))
        tied = {p for p in ps if len(depths_of[p]) > 1}
        zero = [n for n, mine in owned.items() if depth[n] != d and mine & tied]
        calls.append(_Call(edges, seeds, [param_of[n] for n in ps], zero))
    return result, WeightGradWork(calls)


def _zero(grad_outputs: tuple[torch.Tensor | None, ...]) -> tuple[torch.Tensor | None, ...]:
    return tuple(None if g is None else torch.zeros_like(g) for g in grad_outputs)


def backward_weight(work: WeightGradWork) -> None:
    """BWD_W: accumulate the parameters' gradients into ``.grad`` (as ``autograd.backward`` does)."""
    for call in work.calls:
        handles = [n.register_prehook(_zero) for n in call.zero_nodes]
        try:
            torch.autograd.backward(call.edges, call.grads, retain_graph=True, inputs=call.params)
        finally:
            for h in handles:
                h.remove()
