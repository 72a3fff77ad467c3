"""The FX rewrite that puts the fused kernels into a model without the user changing it.

Two entry points:

* :func:`rewrite_fused` ``(gm) -> GraphModule``: a pure graph pass. It finds the fusable
  patterns in a traced graph and returns a *new* GraphModule (the input is not touched; the new
  one shares the input's submodules and Parameters):

  ==========================================  ============================================
  pattern                                      replaced by
  ==========================================  ============================================
  ``call_module`` LLaMA-style RMSNorm          ``rms_norm(x, weight, eps)``
  ``call_module nn.LayerNorm`` / F.layer_norm  ``layer_norm(x, weight, bias, eps)``
  ``call_module nn.GELU`` / ``F.gelu``         ``gelu(x, approximate)``
  ``F.silu(a) * b`` (or ``nn.SiLU``)           ``swiglu(a, b)``
  ``apply_rotary_pos_emb(x, cos, sin)``        ``rope(x, cos, sin)``
  Linear → flatten/view/float → CE             ``fused_linear_cross_entropy`` (chunked)
  ==========================================  ============================================

  A module or function is only replaced after a ``supports_*`` check: the RMSNorm and RoPE
  candidates are recognised by *probing* them on a tiny input against the reference (so e.g.
  Gemma's ``(1 + weight)`` RMSNorm is left alone), and every fused op checks its tensors again at
  run time and falls back to torch where Triton cannot run.

* :func:`fuse_module` ``(module) -> nn.Module``: for dipc's layers, which stay opaque
  ``call_module`` leaves of the glue graph. It returns a copy of the layer (same class, same
  Parameter objects, same ``state_dict`` keys) whose norm/GELU submodules are swapped for the
  fused modules, and whose ``forward`` traces the layer on first call (specialised on the call's
  non-tensor arguments and on ``training``), rewrites that graph with :func:`rewrite_fused`, and
  caches it. Layers that ``torch.fx`` cannot trace keep the submodule swaps only.

Switch: ``DIPC_FUSED_KERNELS=0`` makes :func:`fuse_module` and :func:`rewrite_fused` return
their input unchanged; ``DIPC_DISABLE_TRITON=1`` keeps the rewrite but runs every op in torch.

Not handled: patterns split across layers, RMSNorm written inline as functional ops (only the
module form is matched), RoPE written inline (only ``apply_rotary_pos_emb``-style functions).
"""
from __future__ import annotations

import copy
import inspect
import logging
import operator
import os
from typing import Any, Callable, Iterable

import torch
import torch.nn.functional as F
from torch import fx, nn

from .activations import gelu, swiglu
from .fused_linear_ce import fused_linear_cross_entropy
from .layer_norm import layer_norm
from .modules import FusedGELU, FusedLayerNorm, FusedRMSNorm
from .rms_norm import rms_norm, rms_norm_reference
from .rope import rope, rope_reference

__all__ = ["ALL_OPS", "fuse_module", "fused_kernels_enabled", "linear_cross_entropy_from_chain",
           "rewrite_fused", "supports_rms_norm_module", "supports_rope_function"]

_log = logging.getLogger(__name__)

ALL_OPS = frozenset({"rms_norm", "layer_norm", "gelu", "swiglu", "rope", "linear_cross_entropy"})
_ROPE_NAMES = ("apply_rotary_pos_emb", "apply_rotary_emb", "apply_rope")
_SHAPE_METHODS = {"float", "to", "flatten", "view", "reshape", "contiguous"}


def fused_kernels_enabled() -> bool:
    return os.environ.get("DIPC_FUSED_KERNELS", "1") not in ("0", "false", "False")


# ------------------------------------------------------------------------------------------------
# supports_*: is this module / function one the fused op reproduces exactly?
# ------------------------------------------------------------------------------------------------

_KNOWN_RMSNORM_CLASSES = {"RMSNorm", "LlamaRMSNorm", "Qwen2RMSNorm", "MistralRMSNorm"}


def supports_rms_norm_module(module: nn.Module) -> bool:
    """A LLaMA-style RMSNorm: 1-D ``weight``, float ``eps``/``variance_epsilon``, and (probed on a
    tiny input) the same output as :func:`rms_norm_reference`."""
    weight = getattr(module, "weight", None)
    eps = getattr(module, "eps", getattr(module, "variance_epsilon", None))
    if not isinstance(weight, torch.Tensor) or weight.dim() != 1 or not isinstance(eps, float):
        return False
    if "RMSNorm" not in type(module).__name__ or list(module.children()):
        return False
    if weight.device.type == "meta":
        return type(module).__name__ in _KNOWN_RMSNORM_CLASSES
    gen = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(3, weight.shape[0], generator=gen).to(weight.device, weight.dtype)
    w = torch.randn(weight.shape[0], generator=gen).to(weight.device, weight.dtype)
    try:
        probe = copy.deepcopy(module)  # probe with a non-trivial weight (init is all ones)
        with torch.no_grad():
            probe.weight.copy_(w)
            got = type(module).forward(probe, x)
            return got.shape == x.shape and torch.allclose(got, rms_norm_reference(x, w, eps), rtol=1e-3, atol=1e-3)
    except Exception:
        return False


def supports_rope_function(fn: Callable[..., Any]) -> bool:
    """A 3-argument ``(x, cos, sin)`` rotary function with rotate_half semantics (probed)."""
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return False
    if len(params) != 3 or any(p.kind not in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) for p in params):
        return False
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 5, 8, generator=gen)
    cos, sin = torch.randn(5, 8, generator=gen), torch.randn(5, 8, generator=gen)
    try:
        with torch.no_grad():
            return torch.allclose(fn(x, cos, sin), rope_reference(x, cos, sin), rtol=1e-5, atol=1e-5)
    except Exception:
        return False


# ------------------------------------------------------------------------------------------------
# the graph pass
# ------------------------------------------------------------------------------------------------

def _single_user(node: fx.Node) -> bool:
    return len(node.users) == 1


def _is_silu(node: Any, modules: dict[str, nn.Module]) -> bool:
    if not isinstance(node, fx.Node):
        return False
    if node.op == "call_function" and node.target is F.silu:
        return not node.kwargs.get("inplace", False) and not (len(node.args) > 1 and node.args[1])
    if node.op == "call_module":
        m = modules.get(str(node.target))
        return isinstance(m, nn.SiLU) and not m.inplace
    return False


def _gelu_signature(input: Any, approximate: str = "none") -> None:  # noqa: A002  (F.gelu is a builtin)
    """Stand-in for the signature of the builtin ``F.gelu``."""


_SIGNATURES: dict[Any, Callable[..., Any]] = {F.gelu: _gelu_signature}


def _bind(fn: Callable[..., Any], node: fx.Node) -> dict[str, Any] | None:
    try:
        bound = inspect.signature(_SIGNATURES.get(fn, fn)).bind(*node.args, **node.kwargs)
    except (TypeError, ValueError):
        return None
    bound.apply_defaults()
    return dict(bound.arguments)


def _contains_node(value: Any) -> bool:
    found = False

    def visit(n: fx.Node) -> fx.Node:
        nonlocal found
        found = True
        return n

    fx.node.map_arg(value, visit)
    return found


def linear_cross_entropy_from_chain(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                                    target: torch.Tensor, chain: tuple, ignore_index: int,
                                    reduction: str) -> torch.Tensor:
    """``F.cross_entropy(<chain>(F.linear(x, weight, bias)), target, ...)`` fused when the chain of
    view/float ops turns the logits into ``[rows, vocab]`` (replayed on a meta tensor), else the
    original ops verbatim. ``chain`` is ``((method, args, kwargs), ...)`` innermost first."""
    vocab = weight.shape[0]
    probe = torch.empty(*x.shape[:-1], vocab, device="meta", dtype=x.dtype)
    for method, args, kwargs in chain:
        probe = getattr(probe, method)(*args, **kwargs)
    rows = x.numel() // max(1, x.shape[-1])
    if probe.dim() == 2 and tuple(probe.shape) == (rows, vocab) and target.dim() == 1 and target.numel() == rows:
        loss = fused_linear_cross_entropy(x, weight, target, bias, ignore_index, reduction)
        return loss.to(probe.dtype) if probe.dtype != torch.float32 else loss
    logits = F.linear(x, weight, bias)
    for method, args, kwargs in chain:
        logits = getattr(logits, method)(*args, **kwargs)
    return F.cross_entropy(logits, target, ignore_index=ignore_index, reduction=reduction)


def _match_linear_ce(node: fx.Node, modules: dict[str, nn.Module], graph: fx.Graph) -> bool:
    args = _bind(F.cross_entropy, node)
    if args is None or args["weight"] is not None or args["size_average"] is not None or args["reduce"] is not None:
        return False
    if args["label_smoothing"] != 0.0 or args["reduction"] not in ("mean", "sum"):
        return False
    if not isinstance(args["ignore_index"], int):
        return False
    chain: list[tuple[str, tuple, dict]] = []
    cur = args["input"]
    while isinstance(cur, fx.Node) and cur.op == "call_method" and cur.target in _SHAPE_METHODS:
        if not _single_user(cur) or _contains_node((cur.args[1:], cur.kwargs)):
            return False
        chain.append((str(cur.target), tuple(cur.args[1:]), dict(cur.kwargs)))
        cur = cur.args[0]
    if not isinstance(cur, fx.Node) or not _single_user(cur):
        return False
    if cur.op == "call_module" and isinstance(modules.get(str(cur.target)), nn.Linear):
        x = cur.args[0]
        with graph.inserting_before(node):
            weight = graph.get_attr(f"{cur.target}.weight")
            bias = graph.get_attr(f"{cur.target}.bias") if modules[str(cur.target)].bias is not None else None
    elif cur.op == "call_function" and cur.target is F.linear:
        lin = _bind(F.linear, cur)
        if lin is None:
            return False
        x, weight, bias = lin["input"], lin["weight"], lin["bias"]
    else:
        return False
    with graph.inserting_before(node):
        new = graph.call_function(linear_cross_entropy_from_chain,
                                  (x, weight, bias, args["target"], tuple(reversed(chain)),
                                   args["ignore_index"], args["reduction"]))
    node.replace_all_uses_with(new)
    return True


def _rewrite_node(node: fx.Node, modules: dict[str, nn.Module], graph: fx.Graph, ops: frozenset[str]) -> str | None:
    """Rewrite one node in place (in the *copied* graph); returns the op name if it did."""
    if node.op == "call_module":
        m = modules.get(str(node.target))
        if isinstance(m, (FusedRMSNorm, FusedLayerNorm, FusedGELU)):
            return None  # already fused
        if "rms_norm" in ops and m is not None and supports_rms_norm_module(m) and len(node.args) == 1 and not node.kwargs:
            with graph.inserting_before(node):
                w = graph.get_attr(f"{node.target}.weight")
                new = graph.call_function(_rms_norm_module_semantics, (node.args[0], w, float(getattr(m, "eps", getattr(m, "variance_epsilon", 0.0)))))
            node.replace_all_uses_with(new)
            return "rms_norm"
        if "layer_norm" in ops and isinstance(m, nn.LayerNorm) and len(m.normalized_shape) == 1 and len(node.args) == 1:
            with graph.inserting_before(node):
                w = graph.get_attr(f"{node.target}.weight") if m.weight is not None else None
                b = graph.get_attr(f"{node.target}.bias") if m.bias is not None else None
                new = graph.call_function(layer_norm, (node.args[0], w, b, m.eps))
            node.replace_all_uses_with(new)
            return "layer_norm"
        if "gelu" in ops and type(m) is nn.GELU and len(node.args) == 1:
            with graph.inserting_before(node):
                new = graph.call_function(gelu, (node.args[0], m.approximate))
            node.replace_all_uses_with(new)
            return "gelu"
        return None
    if node.op != "call_function":
        return None
    if node.target is F.layer_norm and "layer_norm" in ops:
        a = _bind(F.layer_norm, node)
        shape = a["normalized_shape"] if a else None
        if isinstance(shape, (tuple, list)) and len(shape) == 1:
            with graph.inserting_before(node):
                new = graph.call_function(layer_norm, (a["input"], a["weight"], a["bias"], a["eps"]))
            node.replace_all_uses_with(new)
            return "layer_norm"
    elif node.target is F.gelu and "gelu" in ops:
        a = _bind(F.gelu, node)
        if a is not None and isinstance(a["approximate"], str):
            with graph.inserting_before(node):
                new = graph.call_function(gelu, (a["input"], a["approximate"]))
            node.replace_all_uses_with(new)
            return "gelu"
    elif node.target in (operator.mul, torch.mul) and "swiglu" in ops and len(node.args) == 2 and not node.kwargs:
        lhs, rhs = node.args
        for silu_node, other in ((lhs, rhs), (rhs, lhs)):
            if _is_silu(silu_node, modules) and _single_user(silu_node) and isinstance(other, fx.Node):
                with graph.inserting_before(node):
                    new = graph.call_function(swiglu, (silu_node.args[0], other))
                node.replace_all_uses_with(new)
                return "swiglu"
    elif getattr(node.target, "__name__", "") in _ROPE_NAMES and "rope" in ops and len(node.args) == 3 \
            and not node.kwargs and supports_rope_function(node.target):
        with graph.inserting_before(node):
            new = graph.call_function(rope, tuple(node.args))
        node.replace_all_uses_with(new)
        return "rope"
    elif node.target is F.cross_entropy and "linear_cross_entropy" in ops:
        if _match_linear_ce(node, modules, graph):
            return "linear_cross_entropy"
    return None


def _rms_norm_module_semantics(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # the module's own semantics when dtypes/devices differ (e.g. bf16 input, fp32 weight)
    if x.dtype != weight.dtype or x.device != weight.device:
        return rms_norm_reference(x, weight, eps)
    return rms_norm(x, weight, eps)


torch.fx.wrap("_rms_norm_module_semantics")


def rewrite_fused(gm: fx.GraphModule, ops: Iterable[str] = ALL_OPS) -> fx.GraphModule:
    """A new GraphModule with fusable patterns swapped for the fused ops (input untouched).

    >>> import torch.fx as fx
    >>> gm = fx.symbolic_trace(torch.nn.Sequential(torch.nn.LayerNorm(8), torch.nn.GELU()))
    >>> [n.target.__name__ for n in rewrite_fused(gm).graph.nodes if n.op == "call_function"]
    ['layer_norm', 'gelu']
    """
    ops = frozenset(ops)
    unknown = ops - ALL_OPS
    if unknown:
        raise ValueError(f"rewrite_fused: unknown ops {sorted(unknown)}. Fix: choose from {sorted(ALL_OPS)}.")
    graph = fx.Graph()
    out = graph.graph_copy(gm.graph, {})
    graph.output(out)
    if not fused_kernels_enabled():
        return fx.GraphModule(gm, graph)
    modules = dict(gm.named_modules())
    rewritten: list[str] = []
    for node in list(graph.nodes):
        if node.op == "output":
            continue
        op = _rewrite_node(node, modules, graph, ops)
        if op is not None:
            rewritten.append(op)
    new = fx.GraphModule(gm, graph)
    new.graph.eliminate_dead_code()  # the replaced nodes (needs owning_module for call_module purity)
    new.graph.lint()
    new.recompile()
    new.meta["dipc.fused_ops"] = rewritten
    _log.debug("rewrite_fused: %s", rewritten)
    return new


# ------------------------------------------------------------------------------------------------
# layers: submodule swaps + lazily traced rewrite
# ------------------------------------------------------------------------------------------------

def _fused_leaf(m: nn.Module, ops: frozenset[str]) -> nn.Module | None:
    if "rms_norm" in ops and supports_rms_norm_module(m):
        return FusedRMSNorm.from_module(m)
    if "layer_norm" in ops and type(m) is nn.LayerNorm and len(m.normalized_shape) == 1:
        return FusedLayerNorm.from_module(m)
    if "gelu" in ops and type(m) is nn.GELU:
        return FusedGELU.from_module(m)
    return None


def _clone_tree(m: nn.Module, ops: frozenset[str], memo: dict[int, nn.Module]) -> nn.Module:
    if id(m) in memo:
        return memo[id(m)]
    new = _fused_leaf(m, ops)
    if new is None:
        new = object.__new__(type(m))
        new.__dict__ = dict(m.__dict__)
        new._parameters = dict(m._parameters)
        new._buffers = dict(m._buffers)
        new._non_persistent_buffers_set = set(m._non_persistent_buffers_set)
        new._modules = {k: (_clone_tree(c, ops, memo) if c is not None else None) for k, c in m._modules.items()}
    memo[id(m)] = new
    return new


class _FusionTracer(fx.Tracer):
    """Keeps the fused modules opaque and wraps rotary functions so they stay one node."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, (FusedRMSNorm, FusedLayerNorm, FusedGELU)) or super().is_leaf_module(m, qualname)


def _rope_functions(module: nn.Module) -> tuple[Callable[..., Any], ...]:
    found = {}
    for m in module.modules():
        for name in _ROPE_NAMES:
            fn = getattr(type(m).forward, "__globals__", {}).get(name)
            if callable(fn) and supports_rope_function(fn):
                found[id(fn)] = fn
    return tuple(found.values())


_LAZY_CLASSES: dict[type, type] = {}


def _lazy_class(cls: type) -> type:
    if cls not in _LAZY_CLASSES:
        _LAZY_CLASSES[cls] = type(cls.__name__, (cls,), {"forward": _lazy_forward, "_dipc_base": cls,
                                                         "__module__": cls.__module__})
    return _LAZY_CLASSES[cls]


def _lazy_forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
    base = type(self)._dipc_base
    try:
        bound = inspect.signature(base.forward).bind(self, *args, **kwargs)
    except TypeError:
        return base.forward(self, *args, **kwargs)
    bound.apply_defaults()
    params = inspect.signature(base.forward).parameters
    if any(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in params.values()):
        return base.forward(self, *args, **kwargs)
    names = list(bound.arguments)[1:]
    concrete = {n: v for n, v in bound.arguments.items() if n != "self" and not isinstance(v, torch.Tensor)}
    try:
        key = (self.training, tuple(sorted(concrete.items())))
        hash(key)
    except TypeError:
        return base.forward(self, *args, **kwargs)
    cache = self.__dict__.setdefault("_dipc_fused_graphs", {})
    if key not in cache:
        cache[key] = _trace_and_rewrite(self, base, concrete)
    fused = cache[key]
    if fused is None:
        return base.forward(self, *args, **kwargs)
    _bind_live_attrs(fused, self)
    return fused(*[bound.arguments[n] for n in names])


def _bind_live_attrs(gm: fx.GraphModule, layer: nn.Module) -> None:
    """Point the cached graph's ``get_attr`` tensors at the layer's current ones.

    ``fx.GraphModule`` copies the tensor a ``get_attr`` names when it is built, so without this
    the graph would keep using the Parameters it was traced with after the layer's own are swapped
    (``torch.func.functional_call``, which SEMU uses to trace layers on fake tensors): the weights
    would not be the inputs whose gradients SEMU counts, and a swapped-in copy would be ignored."""
    targets = gm.meta.get("dipc.attr_targets")
    if targets is None:
        targets = gm.meta["dipc.attr_targets"] = [str(n.target) for n in gm.graph.nodes if n.op == "get_attr"]
    for target in targets:
        prefix, _, name = target.rpartition(".")
        owner = layer.get_submodule(prefix) if prefix else layer
        holder = gm.get_submodule(prefix) if prefix else gm
        if owner is holder:
            continue
        live = getattr(owner, name)
        for table in (holder._parameters, holder._buffers):
            if name in table:
                if table[name] is not live:
                    table[name] = live
                break
        else:
            if getattr(holder, name, None) is not live:
                holder.__dict__[name] = live


def _trace_and_rewrite(layer: nn.Module, base: type, concrete: dict[str, Any]) -> fx.GraphModule | None:
    plain = object.__new__(base)
    plain.__dict__ = {k: v for k, v in layer.__dict__.items() if k != "_dipc_fused_graphs"}
    try:
        tracer = _FusionTracer(autowrap_functions=_rope_functions(plain))
        graph = tracer.trace(plain, concrete_args=concrete or None)
        gm = fx.GraphModule(plain, graph, base.__name__)
    except Exception as exc:  # data-dependent control flow etc.: keep the submodule swaps only
        _log.debug("fuse_module: %s not traceable (%s); submodule swaps only", base.__name__, exc)
        return None
    fused = rewrite_fused(gm, layer.__dict__.get("_dipc_fuse_ops", ALL_OPS))
    return fused


def fuse_module(module: nn.Module, ops: Iterable[str] = ALL_OPS) -> nn.Module:
    """A fused copy of ``module`` sharing its Parameters (see the module docstring).

    >>> from torch import nn
    >>> block = nn.Sequential(nn.LayerNorm(8), nn.Linear(8, 8), nn.GELU())
    >>> fused = fuse_module(block)
    >>> fused[0].weight is block[0].weight
    True
    """
    ops = frozenset(ops)
    if not fused_kernels_enabled():
        return module
    new = _clone_tree(module, ops, {})
    if isinstance(new, (FusedRMSNorm, FusedLayerNorm, FusedGELU)) or isinstance(new, fx.GraphModule):
        return new
    new.__dict__["_dipc_fuse_ops"] = ops
    new.__class__ = _lazy_class(type(new))
    return new
