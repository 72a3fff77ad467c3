"""Reading Dynamo's graphs with dipc's passes (the analysis half of ``dipc.backend``).

Dynamo hands a backend one flat torch-level graph per frame: modules are inlined, so there are no
``call_module`` nodes; parameters, buffers and float module attributes arrive as placeholders
(``L_self_modules_vision_modules_patch_embed_parameters_weight_``); batch keys as ``L_input_ids_``;
with dynamic shapes each free size symbol as a placeholder whose example input is a ``SymInt``.
Every node carries ``meta["nn_module_stack"]`` (``("L['self'].vision.blocks.0", EncoderBlock)``)
and ``meta["example_value"]`` (a fake tensor with symbolic sizes).

This module turns that into what dipc's passes expect:

* placeholders are classified by position (a ``SymInt`` example input is a length symbol, its
  ``node.expr`` the sympy symbol, whatever the placeholder is called), module prefixes stripped;
* layers are chosen from the module paths in ``nn_module_stack`` with the rules of
  ``dipc.passes.layers`` (numbered blocks of a list, parameter-holding modules without one);
* a *layer graph* is built: one ``call_module`` node per layer over the batch keys and glue, as
  dipc's own front end produces, so ``dipc.passes.tag.tag_modalities`` and
  ``dipc.semu.costs.layer_cost_model`` run unchanged;
* each layer is cut out of Dynamo's graph into its own ``GraphModule`` (its parameters attached,
  sizes it reads recomputed from its inputs' shapes so they stay symbolic) for the cost pass; the
  costs come back over SEMU's length statistics and, substituted, over Dynamo's own symbols.
"""
from __future__ import annotations

import operator
import re
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import sympy
import torch
from torch import fx, nn

__all__ = ["GraphInput", "classify_inputs", "strip_module_path", "strip_input_name", "node_module_paths",
           "discover_graph_layers", "node_layers", "build_layer_graph", "LayerGraph", "hint"]

_PATH_PREFIX = re.compile(r"^(?:L|G)\[['\"][^'\"]+['\"]\]\.?")
_OLD_PREFIX = re.compile(r"^(?:L|G)__[A-Za-z0-9]+___?")
_STATE_PREFIX = re.compile(r"^(?:L|G)_(?:self|model|mod|module)_")


def strip_module_path(path: str) -> str:
    """``L['self'].vision.blocks[0]`` / ``L['self']._modules['vision']`` -> ``vision.blocks.0``."""
    p = _PATH_PREFIX.sub("", path)
    if p == path and _OLD_PREFIX.match(path):        # L__self___vision_blocks_0 (older Dynamo)
        p = _OLD_PREFIX.sub("", path).replace("_", ".")
    p = re.sub(r"\._modules\[['\"]([^'\"]+)['\"]\]", r".\1", "." + p)
    p = re.sub(r"\[['\"]?([^'\"\]]+)['\"]?\]", r".\1", p)
    return p.strip(".")


def strip_input_name(name: str) -> str:
    """``L_input_ids_`` -> ``input_ids``; ``L_kwargs_pixel_values_`` -> ``pixel_values``."""
    s = re.sub(r"^(?:L|G)_", "", name)
    s = re.sub(r"_$", "", s)
    s = re.sub(r"^(?:kwargs|args)_(?:\d+_)?", "", s) or s
    return s


def _state_path(name: str) -> str:
    """``L_self_modules_vision_modules_blocks_modules_0_modules_norm1_parameters_weight_`` ->
    ``vision.blocks.0.norm1.weight``."""
    s = _STATE_PREFIX.sub("", name).rstrip("_")
    parts = [p for p in re.split(r"(?:^|_)(?:modules|parameters|buffers)_", s) if p]
    return ".".join(parts)


def hint(x: Any) -> Any:
    """A SymInt/SymFloat's example value (its hint); anything else unchanged."""
    if isinstance(x, (torch.SymInt, torch.SymFloat, torch.SymBool)):
        node = x.node
        h = node.hint
        if h is None:
            h = node.shape_env.size_hint(node.expr, allow_none=True)
        if h is None:
            raise ValueError(f"no example value for the data-dependent size {node.expr}")
        return type(h)(h) if not isinstance(x, torch.SymInt) else int(h)
    return x


def sym_expr(x: Any) -> sympy.Expr:
    if isinstance(x, torch.SymInt):
        return sympy.sympify(x.node.expr)
    return sympy.Integer(int(x))


@dataclass
class GraphInput:
    """One placeholder of Dynamo's graph."""

    node: fx.Node
    index: int
    kind: str                  # "batch" | "param" | "state" | "symint" | "other"
    key: str                   # batch key (stripped), parameter path, or the placeholder name
    value: Any                 # the example input Dynamo passed at this position
    symbol: sympy.Expr | None = None   # for "symint": the SymInt's expression (a Symbol)


def classify_inputs(gm: fx.GraphModule, example_inputs: list) -> list[GraphInput]:
    """Placeholders by position: SymInts are length symbols (by their ``node.expr``, not by name)."""
    out = []
    phs = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for i, n in enumerate(phs):
        value = example_inputs[i] if i < len(example_inputs) else n.meta.get("example_value")
        meta = n.meta.get("example_value")
        sym = value if isinstance(value, torch.SymInt) else meta if isinstance(meta, torch.SymInt) else None
        name = str(n.target)
        if sym is not None:
            out.append(GraphInput(n, i, "symint", name, value, sympy.sympify(sym.node.expr)))
        elif _STATE_PREFIX.match(name) or name.startswith(("L__self__", "L['self']", "G_")):
            kind = "param" if isinstance(value, nn.Parameter) else "state"
            out.append(GraphInput(n, i, kind, _state_path(name), value))
        elif isinstance(value, torch.Tensor) or isinstance(meta, torch.Tensor):
            out.append(GraphInput(n, i, "batch", strip_input_name(name), value))
        else:
            out.append(GraphInput(n, i, "other", strip_input_name(name), value))
    return out


def node_module_paths(n: fx.Node) -> list[tuple[str, type | None]]:
    """The node's module stack, outermost first, with Dynamo's prefixes stripped."""
    stack = n.meta.get("nn_module_stack") or {}
    out = []
    for key, val in stack.items():
        if isinstance(val, tuple) and val:
            path, typ = val[0], (val[1] if len(val) > 1 else None)
        else:
            path, typ = str(key), None
        p = strip_module_path(str(path))
        if p:
            out.append((p, typ if isinstance(typ, type) else None))
    return out


def discover_graph_layers(gm: fx.GraphModule, inputs: list[GraphInput]) -> list[str]:
    """Layers by the rules of ``dipc.passes.layers.discover_layers``, read off the module paths in
    ``nn_module_stack`` and the parameter placeholders (the model object itself is not available
    to a backend). Returned in execution order (first node of each layer)."""
    types: dict[str, type | None] = {}
    order: dict[str, int] = {}

    def add(path: str, typ: type | None) -> None:
        parts = path.split(".")
        for k in range(1, len(parts) + 1):
            p = ".".join(parts[:k])
            order.setdefault(p, len(order))
            types.setdefault(p, None)
        if typ is not None:
            types[path] = typ

    for n in gm.graph.nodes:
        for p, t in node_module_paths(n):
            add(p, t)
    params = [i.key for i in inputs if i.kind == "param"]
    for p in params:
        owner = p.rsplit(".", 1)[0] if "." in p else ""
        if owner:
            add(owner, None)
    children: dict[str, list[str]] = {}
    for p in sorted(types, key=order.__getitem__):
        parent, _, name = p.rpartition(".")
        children.setdefault(parent, []).append(name)

    def has_params(path: str) -> bool:
        return any(q.startswith(path + ".") for q in params)

    def is_list(path: str) -> bool:
        kids = children.get(path, [])
        if not kids or not all(k.isdigit() for k in kids):
            return False
        typ = types.get(path)
        if typ is None or issubclass(typ, nn.ModuleList):
            return True                      # a ModuleList is never called, so it has no type here
        if issubclass(typ, nn.Sequential):
            kinds = {types.get(f"{path}.{k}") for k in kids}
            return len(kids) >= 2 and len(kinds) == 1
        return False

    def contains_list(path: str) -> bool:
        return is_list(path) or any(contains_list(f"{path}.{k}" if path else k) for k in children.get(path, []))

    found: list[str] = []

    def visit(path: str, numbered: bool) -> None:
        if path and has_params(path) and (numbered or not contains_list(path)):
            found.append(path)
            return
        lst = is_list(path)
        for k in children.get(path, []):
            visit(f"{path}.{k}" if path else k, lst and k.isdigit())

    visit("", False)
    first = {}
    for i, n in enumerate(gm.graph.nodes):
        for p, _ in node_module_paths(n):
            first.setdefault(p, i)
    return sorted((p for p in found if p in first), key=first.__getitem__)


def node_layers(gm: fx.GraphModule, layers: list[str]) -> dict[fx.Node, str]:
    """Each node inside a layer -> that layer (the outermost enclosing one)."""
    layer_set = set(layers)
    out = {}
    for n in gm.graph.nodes:
        if n.op in ("placeholder", "output"):
            continue
        for p, _ in node_module_paths(n):
            if p in layer_set:
                out[n] = p
                break
    return out


def _glue(*args: Any) -> None:
    """Stand-in target of glue nodes in the layer graph (never run)."""


def _meta_like(v: Any) -> Any:
    """A meta tensor with the example (hint) shape of a fake/real tensor; scalars by their hint."""
    if isinstance(v, torch.Tensor):
        t = torch.empty([hint(d) for d in v.shape], dtype=v.dtype, device="meta")
        if v.requires_grad and t.is_floating_point():
            t.requires_grad_(True)
        return t
    if isinstance(v, (tuple, list)):
        return type(v)(_meta_like(x) for x in v)
    return hint(v)


def _example(n: fx.Node, by_node: dict[fx.Node, GraphInput]) -> Any:
    """The node's fake example (symbolic sizes); the real example input if it has none."""
    v = n.meta.get("example_value", n.meta.get("val"))
    if v is None and n in by_node:
        return by_node[n].value
    return v


@dataclass
class LayerGraph:
    """dipc's view of one Dynamo graph: layers as ``call_module`` leaves over batch keys and glue."""

    graph_module: fx.GraphModule                          # the layer graph (tag / cost passes run on it)
    layers: list[str]                                     # layers cut out for the cost pass
    input_keys: list[str]
    example_values: dict[str, Any]                        # layer-graph node name -> meta example
    layer_input_dims: dict[str, list[tuple[sympy.Expr, ...]]] = field(default_factory=dict)  # in Dynamo's symbols
    layer_input_hints: dict[str, list[tuple[int, ...]]] = field(default_factory=dict)  # the same at the example
    layer_of: dict[str, str] = field(default_factory=dict)        # Dynamo node name -> layer
    quotient: dict[str, str] = field(default_factory=dict)        # Dynamo node name -> layer-graph node name
    errors: dict[str, str] = field(default_factory=dict)          # layer -> why it could not be cut out
    num_params: dict[str, int] = field(default_factory=dict)

    def captured(self, layers: list[str] | None = None) -> Any:
        """A ``CapturedModel``-shaped object for ``layer_cost_model``."""
        return SimpleNamespace(graph_module=self.graph_module, layers=list(self.layers if layers is None else layers),
                               input_keys=self.input_keys, example_values=self.example_values)


def _emit_sym(expr: sympy.Expr, g: fx.Graph, sources: dict[sympy.Symbol, fx.Node]) -> Any:
    """fx nodes computing ``expr`` from the sizes in ``sources``; None if it cannot."""
    if expr.is_Integer:
        return int(expr)
    if expr.is_Symbol:
        return sources.get(expr)
    fn = {sympy.Add: operator.add, sympy.Mul: operator.mul}.get(type(expr))
    if fn is None and type(expr).__name__ == "FloorDiv":
        fn = operator.floordiv
    if fn is None:
        return None
    args = [_emit_sym(a, g, sources) for a in expr.args]
    if any(a is None for a in args):
        return None
    acc = args[0]
    for a in args[1:]:
        acc = g.call_function(fn, (acc, a))
    return acc


def _to_meta_device(a: Any) -> Any:
    return torch.device("meta") if isinstance(a, torch.device) else a


def _extract_layer(gm: fx.GraphModule, path: str, nodes: list[fx.Node], by_node: dict[fx.Node, GraphInput]
                   ) -> tuple[fx.GraphModule, list[fx.Node], list[fx.Node], int]:
    """Cut ``nodes`` out of Dynamo's graph: returns (layer module, activation inputs in placeholder
    order, outputs, parameter count). Parameters become attributes; module state read by ``.item()``
    becomes a constant; sizes become ``size()`` calls on the inputs so they stay symbolic."""
    region = set(nodes)
    ext: list[fx.Node] = []
    for n in nodes:
        for i in n.all_input_nodes:
            if i not in region and i not in ext:
                ext.append(i)
    g = fx.Graph()
    root = nn.Module()
    env: dict[fx.Node, Any] = {}
    acts = []
    for i in ext:   # activations first: their shapes are where sizes are recomputed from
        gi = by_node.get(i)
        if gi is not None and gi.kind in ("param", "state", "symint", "other"):
            continue
        if isinstance(_example(i, by_node), torch.Tensor):
            env[i] = g.placeholder(re.sub(r"\W", "_", i.name))
            acts.append(i)
    sources: dict[sympy.Symbol, tuple[fx.Node, int]] = {}
    for ph_i, i in enumerate(acts):
        for d, s in enumerate(_example(i, by_node).shape):
            e = sym_expr(s)
            if e.is_Symbol and e not in sources:
                sources[e] = (env[i], d)   # materialised as a size() call when first needed
    made: dict[sympy.Symbol, fx.Node] = {}

    def size_node(sym: sympy.Symbol) -> fx.Node:
        if sym not in made:
            ph, d = sources[sym]
            made[sym] = g.call_method("size", (ph, d))
        return made[sym]

    nparams = 0
    for k, i in enumerate(ext):
        if i in env:
            continue
        gi = by_node.get(i)
        if gi is not None and gi.kind == "param":
            name = f"p{k}"
            root.register_parameter(name, gi.value)
            env[i] = g.get_attr(name)
            nparams += gi.value.numel()
            continue
        if gi is not None and gi.kind == "state" and isinstance(gi.value, torch.Tensor):
            name = f"b{k}"
            root.register_buffer(name, gi.value.detach().clone())
            env[i] = g.get_attr(name)
            continue
        val = gi.value if gi is not None and gi.kind != "symint" else i.meta.get("example_value")
        if isinstance(val, torch.SymInt):
            expr = sympy.sympify(val.node.expr)
            needed = {s: size_node(s) for s in expr.free_symbols if s in sources}
            built = _emit_sym(expr, g, needed) if len(needed) == len(expr.free_symbols) else None
            env[i] = built if built is not None else hint(val)
        elif isinstance(val, torch.Tensor):
            name = f"c{k}"
            root.register_buffer(name, torch.zeros([hint(d) for d in val.shape], dtype=val.dtype))
            env[i] = g.get_attr(name)
        else:
            env[i] = hint(val)
    for n in nodes:
        if n.op == "call_method" and n.target == "item" and by_node.get(n.args[0]) is not None \
                and by_node[n.args[0]].kind == "state":
            env[n] = by_node[n.args[0]].value.item()      # an eps/norm_type attribute: a constant
            continue
        new = g.node_copy(n, lambda x: env[x])
        # devices Dynamo baked in (``torch.arange(..., device=cpu)``): the cost pass runs on meta
        new.args, new.kwargs = fx.node.map_aggregate((new.args, new.kwargs), _to_meta_device)
        env[n] = new
    outs = [n for n in nodes if any(u not in region for u in n.users)]
    g.output(tuple(env[n] for n in outs) if len(outs) != 1 else env[outs[0]])
    g.eliminate_dead_code()
    # named after the layer's class, so identical blocks share one signature (spatial reuse)
    typ = next((t for n in nodes for q, t in node_module_paths(n) if q == path and t is not None), None)
    layer = fx.GraphModule(root, g, class_name=typ.__name__ if typ is not None else "Layer")
    return layer, acts, outs, nparams


def build_layer_graph(gm: fx.GraphModule, inputs: list[GraphInput], layers: list[str]) -> LayerGraph:
    by_node = {i.node: i for i in inputs}
    owner = node_layers(gm, layers)
    q = fx.Graph()
    qenv: dict[fx.Node, fx.Node] = {}
    values: dict[str, Any] = {}
    keys = []
    for gi in inputs:
        if gi.kind == "batch":
            qenv[gi.node] = q.placeholder(gi.key)
            keys.append(gi.key)
            values[gi.key] = _meta_like(gi.value)
    region: dict[str, list[fx.Node]] = {}
    for n, p in owner.items():
        region.setdefault(p, []).append(n)
    lg = LayerGraph(graph_module=None, layers=[], input_keys=keys, example_values=values)  # type: ignore[arg-type]
    cut: dict[str, tuple[fx.GraphModule, list[fx.Node], list[fx.Node]]] = {}
    for p in layers:
        try:
            mod, acts, outs, npar = _extract_layer(gm, p, region[p], by_node)
            cut[p] = (mod, acts, outs)
            lg.num_params[p] = npar
            lg.layer_input_dims[p] = [tuple(sym_expr(s) for s in _example(a, by_node).shape) for a in acts]
            lg.layer_input_hints[p] = [tuple(hint(s) for s in _example(a, by_node).shape) for a in acts]
        except Exception as e:  # a layer that cannot be cut out: tagged, but no symbolic cost
            lg.errors[p] = f"{type(e).__name__}: {str(e)[:200]}"
            lg.num_params[p] = sum(by_node[i].value.numel() for n in region[p] for i in n.all_input_nodes
                                   if i in by_node and by_node[i].kind == "param")
    submods: dict[str, nn.Module] = {}
    seen: set[str] = set()
    nodes = [n for n in gm.graph.nodes if n.op not in ("placeholder", "output")]
    k = 0
    while k < len(nodes):
        n = nodes[k]
        p = owner.get(n)
        if p is None:
            ins = [qenv[i] for i in n.all_input_nodes if i in qenv]
            qn = q.call_function(_glue, tuple(dict.fromkeys(ins)))
            qenv[n] = qn
            lg.quotient[n.name] = qn.name
            values[qn.name] = _meta_like(n.meta.get("example_value"))
            k += 1
            continue
        run = [n]
        while k + len(run) < len(nodes) and owner.get(nodes[k + len(run)]) == p:
            run.append(nodes[k + len(run)])
        k += len(run)
        if p in cut and p not in seen:
            mod, acts, outs = cut[p]
            args = [qenv.get(a) for a in acts]
            if any(a is None for a in args):   # a layer input produced later (split run): no cost
                lg.errors[p] = "the layer's nodes are not contiguous in Dynamo's graph"
                args = [a for a in args if a is not None]
            else:
                lg.layers.append(p)
            submods[p] = mod
            qn = q.call_module(p, tuple(args))
            example_out = [_meta_like(o.meta.get("example_value")) for o in outs]
            values[qn.name] = example_out[0] if len(example_out) == 1 else tuple(example_out)
        else:
            submods.setdefault(p, nn.Module())
            ins = [qenv[i] for m in run for i in m.all_input_nodes if i in qenv and i not in run]
            qn = q.call_module(p, tuple(dict.fromkeys(ins)))
        seen.add(p)
        for m in run:
            qenv[m] = qn
            lg.layer_of[m.name] = p
            lg.quotient[m.name] = qn.name
    out = next(n for n in gm.graph.nodes if n.op == "output")
    q.output(tuple(qenv[i] for i in out.all_input_nodes if i in qenv))
    lg.graph_module = fx.GraphModule(submods, q, class_name="DipcLayerGraph")
    return lg
