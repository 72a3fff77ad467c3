"""The autograd-graph analysis behind the zero-bubble split of a backward (BWD_I, then BWD_W).

It reads a backward graph and runs nothing, so two callers share it: the runtime
(:mod:`dipc.runtime.split_backward`) on a stage's real graph, to decide which gradients BWD_I
captures and how BWD_W walks; and SEMU (:func:`dipc.semu.symbolic.trace_layer`) on a layer's fake
graph, to count the bytes of those captured gradients that stay alive from BWD_I to BWD_W. One
copy of the rules keeps the model and the runtime in step.

Terms (see :mod:`dipc.runtime.split_backward` for why): a node is *on the input path* when an
input node is reachable from it; an *intermediate* is an on-path node with an edge into a
weight-only subgraph (the parameters it *owns*); its *depth* is the most intermediates on a path
strictly below it.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from torch.autograd.graph import GradientEdge, Node

__all__ = ["GraphSplit", "analyse_split"]


@dataclass(frozen=True, slots=True)
class GraphSplit:
    """One backward graph below some roots, split by :func:`analyse_split`.

    ``on_path``: the nodes on the input path. ``owned``: each intermediate -> the parameter nodes
    below it off the path. ``depth``: each on-path node's depth. ``below``: each off-path node ->
    the parameter nodes reachable from it."""

    on_path: set[Node]
    owned: dict[Node, frozenset[Node]]
    depth: dict[Node, int]
    below: dict[Node, frozenset[Node]]

    def kept_edges(self) -> list[GradientEdge]:
        """Where BWD_I captures a gradient for BWD_W: every input slot of every intermediate."""
        return [GradientEdge(node, k) for node in self.owned for k in range(len(node._input_metadata))]

    def shared_across_depths(self) -> bool:
        """Whether some parameter hangs below intermediates of two or more depths (then BWD_W
        walks the whole backward once instead of once per depth)."""
        first: dict[Node, int] = {}
        for node, ps in self.owned.items():
            d = self.depth[node]
            for p in ps:
                if first.setdefault(p, d) != d:
                    return True
        return False


def analyse_split(roots: Sequence[Node], input_nodes: set[Node], param_nodes: set[Node]) -> GraphSplit:
    """One post-order pass over the graph below ``roots`` (iterative: graphs are deep)."""
    on_path: set[Node] = set()
    below: dict[Node, frozenset[Node]] = {}
    owned: dict[Node, frozenset[Node]] = {}
    depth: dict[Node, int] = {}
    kids_of: dict[Node, tuple[Node, ...]] = {}
    stack: list[tuple[Node, bool]] = [(r, False) for r in roots]
    while stack:
        node, expanded = stack.pop()
        if not expanded:
            if node in kids_of:
                continue
            kids = tuple(f for f, _ in node.next_functions if f is not None)
            kids_of[node] = kids
            stack.append((node, True))
            stack.extend((k, False) for k in kids if k not in kids_of)
            continue
        if node in depth or node in below:   # pushed twice before it was finished
            continue
        kids = kids_of[node]
        if node in input_nodes or any(k in on_path for k in kids):
            on_path.add(node)
            mine = frozenset().union(*(below[k] for k in kids if k in below))
            if mine:
                owned[node] = mine
            depth[node] = max((depth[k] + (k in owned) for k in kids if k in depth), default=0)
        else:
            mine = frozenset().union(*(below[k] for k in kids))
            below[node] = mine | {node} if node in param_nodes else mine
    return GraphSplit(on_path, owned, depth, below)
