"""Front end: find the layers of a model and capture the glue between them as one FX graph.

Layers come from the module tree (numbered children of a ``ModuleList`` or of a ``Sequential`` of
repeated blocks, plus
parameter-holding modules that contain no such list, e.g. an embedding, a norm, a head), and are
kept as opaque ``call_module`` leaves. So a layer may contain anything (data-dependent attention,
custom kernels); only the glue between layers must be traceable. Users can name the layers
themselves (``layers=``) or add leaves for glue that cannot be traced (``leaf_modules=``).
"""
from __future__ import annotations

import inspect
import operator
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

import torch
from torch import fx, nn

from dipc.errors import BatchError, TraceError



@dataclass
class CapturedModel:
    """The traced top-level graph (layers are ``call_module`` leaves) and what we learned about it."""

    graph_module: fx.GraphModule
    layers: list[str]                      # layer module paths, in graph (execution) order
    input_keys: list[str]                  # batch keys, in placeholder order
    example_values: dict[str, Any] = field(default_factory=dict)  # node name -> example value


def _has_params(module: nn.Module) -> bool:
    return any(True for _ in module.parameters())


def is_layer_list(module: nn.Module) -> bool:
    """A container of repeated blocks: any ``ModuleList``, or a ``Sequential`` of >= 2 same-type
    children (timm-style ``blocks``) — not an MLP written as ``Sequential(Linear, GELU, Linear)``."""
    if isinstance(module, nn.ModuleList):
        return len(module) > 0
    if isinstance(module, nn.Sequential):
        kinds = {type(c) for c in module.children()}
        return len(module) >= 2 and len(kinds) == 1
    return False


def _contains_list(module: nn.Module) -> bool:
    return any(is_layer_list(m) for m in module.modules())


def discover_layers(model: nn.Module, leaf_modules: Iterable[str] = ()) -> list[str]:
    """Module paths of the layers (in module-tree order), by dipc's leaf policy."""
    leaves = set(leaf_modules)
    known = dict(model.named_modules())
    for path in leaves:
        if path not in known:
            raise TraceError(
                f"leaf module {path!r} does not exist in {type(model).__name__}. "
                f"Fix: use a path from model.named_modules(), e.g. {sorted(known)[1:4]}")
    found: list[str] = []

    def visit(module: nn.Module, path: str, numbered: bool) -> None:
        if path and path in leaves:
            found.append(path)
            return
        if path and numbered and _has_params(module):
            found.append(path)
            return
        if path and _has_params(module) and not _contains_list(module):
            found.append(path)
            return
        is_list = is_layer_list(module)
        for name, child in module.named_children():
            visit(child, f"{path}.{name}" if path else name, is_list and name.isdigit())

    visit(model, "", False)
    return found


class _LayerTracer(fx.Tracer):
    """An FX tracer that keeps layers opaque and remembers which module it is inside (for errors)."""

    def __init__(self, layer_paths: Iterable[str]):
        super().__init__()
        self.layer_paths = set(layer_paths)
        self.module_path_stack: list[str] = []

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return module_qualified_name in self.layer_paths

    def call_module(self, m, forward, args, kwargs):
        path = self.path_of_module(m)
        self.module_path_stack.append(path)
        try:
            return super().call_module(m, forward, args, kwargs)
        finally:
            self.module_path_stack.pop()


def _concrete_args_for(model: nn.Module, batch_keys: Iterable[str]) -> dict[str, Any]:
    """Signature parameters not in the batch are fixed to their defaults (HF-style optional args)."""
    sig = inspect.signature(model.forward)
    keys = set(batch_keys)
    concrete: dict[str, Any] = {}
    for name, p in sig.parameters.items():
        if name in keys or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        if p.default is inspect.Parameter.empty:
            raise BatchError(
                f"{type(model).__name__}.forward requires argument {name!r} but the example batch has no "
                f"key {name!r} (keys: {sorted(keys)}). Fix: add {name!r} to the example batch.")
        concrete[name] = p.default
    unknown = keys - set(sig.parameters)
    if unknown and not any(p.kind == p.VAR_KEYWORD for p in sig.parameters.values()):
        raise BatchError(
            f"batch key(s) {sorted(unknown)} are not arguments of {type(model).__name__}.forward "
            f"(arguments: {list(sig.parameters)}). Fix: rename or drop those keys.")
    return concrete


def trace_with_layer_leaves(model: nn.Module, batch_keys: list[str], layer_paths: list[str]) -> fx.GraphModule:
    tracer = _LayerTracer(layer_paths)
    concrete = _concrete_args_for(model, batch_keys)
    try:
        graph = tracer.trace(model, concrete_args=concrete or None)
    except Exception as e:  # fx raises TraceError/TypeError/etc. from inside user code
        culprit = tracer.module_path_stack[-1] if tracer.module_path_stack else ""
        where = f"module {culprit!r} ({type(model.get_submodule(culprit)).__name__})" if culprit \
            else f"the top-level forward of {type(model).__name__}"
        fix = (f"mark it a leaf so it runs opaquely inside one stage: dipc.compile(..., leaf_modules=[{culprit!r}])"
               if culprit else "move the data-dependent code into a submodule and pass that module's path in "
               "leaf_modules=[...], or name the layers explicitly with layers=[...]")
        raise TraceError(f"could not trace {where}: {type(e).__name__}: {e}. "
                         f"This usually means data-dependent Python control flow. Fix: {fix}.") from e
    gm = fx.GraphModule(model, graph, class_name=f"{type(model).__name__}Glue")
    return gm


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
    keys = list(example_batch)
    layer_paths = list(layers) if layers is not None else discover_layers(model, leaf_modules)
    known = dict(model.named_modules())
    for path in layer_paths:
        if path not in known:
            raise TraceError(f"layer {path!r} is not a module of {type(model).__name__}. "
                             "Fix: use paths from model.named_modules().")
    gm = trace_with_layer_leaves(model, keys, layer_paths)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    input_keys = [n.target for n in placeholders if n.target in example_batch]
    # Run once on the example batch: gives types/shapes of every value, and the loss output.
    recorder = _ValueRecorder(gm)
    args = [example_batch[n.target] if n.target in example_batch else None for n in placeholders]
    out = recorder.run(*args)
    _select_loss_output(gm, out)
    live = {n.name for n in gm.graph.nodes}
    values = {k: v for k, v in recorder.values.items() if k in live}
    order = [n.target for n in gm.graph.nodes if n.op == "call_module"]
    used_layers = [p for p in dict.fromkeys(order) if p in set(layer_paths)]
    if not used_layers:
        raise TraceError(f"{type(model).__name__} has no layers the tracer could find. "
                         "Fix: name them with layers=[...] (module paths).")
    return CapturedModel(graph_module=gm, layers=used_layers, input_keys=input_keys, example_values=values)
