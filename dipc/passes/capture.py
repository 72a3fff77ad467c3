"""Front end: capture a model as one FX graph of glue between opaque layers, ready for the passes.

``capture`` picks the layers (``dipc.passes.layers``), traces the glue around them
(``dipc.passes.tracer``), makes the scalar loss the graph's output, orders the graph by data
flow, and records every node's value on the example batch.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

import torch
from torch import fx, nn

from dipc.errors import BatchError, TraceError
from dipc.passes.layers import resolve_layers
from dipc.passes.tracer import trace_with_layer_leaves


@dataclass
class CapturedModel:
    """The traced top-level graph (layers are ``call_module`` leaves) and what we learned about it."""

    graph_module: fx.GraphModule
    layers: list[str]                      # layer module paths, in graph (execution) order
    input_keys: list[str]                  # batch keys, in placeholder order
    example_values: dict[str, Any] = field(default_factory=dict)  # node name -> example value


def _select_loss_output(gm: fx.GraphModule, output_value: Any) -> None:
    """Make the graph output the scalar loss (models may return a dict or a ModelOutput with .loss)."""
    if isinstance(output_value, torch.Tensor):
        if output_value.dim() != 0:
            raise TraceError(
                f"{gm.__class__.__name__}: the model returned a tensor of shape {tuple(output_value.shape)}, "
                "not a scalar loss. Fix: have forward() compute the loss from the batch labels and return it "
                "(or return a dict/ModelOutput with a 'loss' entry).")
        return
    graph = gm.graph
    out_node = next(n for n in graph.nodes if n.op == "output")
    result = out_node.args[0]
    if isinstance(output_value, Mapping) and "loss" in output_value:
        if isinstance(result, Mapping):
            loss = result["loss"]
        else:
            with graph.inserting_before(out_node):
                loss = graph.call_function(operator.getitem, (result, "loss"))
    elif getattr(output_value, "loss", None) is not None:
        with graph.inserting_before(out_node):
            loss = graph.call_function(getattr, (result, "loss"))
    else:
        raise TraceError(
            f"the model returned {type(output_value).__name__}, which has no loss. Fix: pass labels in the "
            "example batch so forward() returns a scalar loss (or a dict/ModelOutput with 'loss').")
    out_node.args = (loss,)
    graph.eliminate_dead_code()
    gm.recompile()


def sink_to_first_use(gm: fx.GraphModule) -> None:
    """Reorder the graph as late as possible: every node gets its ALAP level (one less than its
    earliest user's; the output is last) and nodes are sorted by (level, original position), a
    valid topological order. HF models embed the text before running the vision tower; in ALAP
    order the embedding sits next to the image-token merge, so layers come out in data-flow order
    (vision encoder, then backbone) and modality segments stay contiguous."""
    graph = gm.graph
    nodes = list(graph.nodes)
    pos = {n: i for i, n in enumerate(nodes)}
    level: dict[fx.Node, int] = {}
    for n in reversed(nodes):
        level[n] = min((level[u] for u in n.users), default=len(nodes) + 1) - 1
        if n.op == "output":
            level[n] = len(nodes) + 1
    movable = [n for n in nodes if n.op != "placeholder"]
    order = sorted(movable, key=lambda n: (level[n], pos[n]))
    anchor = next((n for n in reversed(nodes) if n.op == "placeholder"), None)
    for n in order:
        if anchor is None:
            graph._root.append(n)   # no placeholders: start from the graph's front
        else:
            anchor.append(n)
        anchor = n
    graph.lint()
    gm.recompile()


class _ValueRecorder(fx.Interpreter):
    """Runs the graph on real inputs and records every node's value (for types, shapes, requires_grad)."""

    def __init__(self, gm: fx.GraphModule):
        super().__init__(gm)
        self.values: dict[str, Any] = {}

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        self.values[n.name] = out
        return out


def capture(model: nn.Module, example_batch: Mapping[str, Any], *, layers: list[str] | None = None,
            leaf_modules: Iterable[str] = ()) -> CapturedModel:
    """Trace ``model`` on ``example_batch`` keys with layers as leaves; record example values."""
    if not isinstance(example_batch, Mapping) or not example_batch:
        raise BatchError("the example batch must be a non-empty dict of batch key -> tensor. "
                         "Fix: pass one collated microbatch, e.g. {'input_ids': ..., 'labels': ...}.")
    layer_paths = resolve_layers(model, layers, leaf_modules)
    gm = trace_with_layer_leaves(model, list(example_batch), layer_paths, leaf_modules, example_batch)
    input_keys = [n.target for n in gm.graph.nodes if n.op == "placeholder"]   # the root takes exactly the keys
    # Run once on the example batch: gives types/shapes of every value, and the loss output.
    recorder = _ValueRecorder(gm)
    out = recorder.run(*[example_batch[k] for k in input_keys])
    _select_loss_output(gm, out)
    sink_to_first_use(gm)
    live = {n.name for n in gm.graph.nodes}
    values = {k: v for k, v in recorder.values.items() if k in live}
    wanted = set(layer_paths)
    used_layers = [p for p in dict.fromkeys(n.target for n in gm.graph.nodes if n.op == "call_module") if p in wanted]
    if not used_layers:
        raise TraceError(f"{type(model).__name__} has no layers the tracer could find. "
                         "Fix: name them with layers=[...] (module paths).")
    return CapturedModel(graph_module=gm, layers=used_layers, input_keys=input_keys, example_values=values)
