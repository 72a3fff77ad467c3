"""``torch.compile(model, backend="dipc")``: dipc's passes on Dynamo's graphs.

Dynamo calls :func:`dipc_backend` once per graph it captures (a graph break gives several; a
recompilation on new shapes gives another). For each graph the backend

1. reads the graph (``dipc.backend_graph``): batch keys from the placeholders (``L_input_ids_`` ->
   ``input_ids``), length symbols from the ``SymInt`` inputs (by position; their ``node.expr`` is
   a sympy symbol), layers from ``nn_module_stack`` (``L['self'].`` stripped) by dipc's layer
   policy;
2. tags modalities (``dipc.passes.tag.tag_modalities``, batch keys -> modality) on a layer graph
   and copies the tags onto Dynamo's nodes (``node.meta["dipc.modality"]``, ``["dipc.layer"]``);
3. runs SEMU's symbolic cost pass (``dipc.semu.costs.layer_cost_model``) on each layer cut out of
   the graph: costs as sympy expressions over SEMU's length statistics and, substituted, over
   Dynamo's own length symbols;
4. lays the layers over ``num_stages`` pipeline stages (``dipc.passes.partition.assign_layers``);
5. rewrites fusable patterns to dipc's kernels (``dipc.kernels.rewrite.rewrite_fused``) and
   returns a callable whose forward and backward match eager: the (rewritten) graph's own
   ``forward``, run under eager autograd (dipc's fused ops are ``autograd.Function``s over Triton
   kernels with torch fallbacks, as in dipc's runtime). With ``aot=True`` and nothing fused, the
   graph goes through AOTAutograd instead (forward/backward compilers that run the ATen graphs
   as they are; the graphs are kept in ``info.aot_graphs``) — exact too, but on CPU tracing the
   joint graph of a small model takes tens of seconds, so it is off by default.

Analysis failures are recorded, not fatal. A graph dipc cannot handle (complex, sparse or quantized
tensors, or a failing rewrite/compile) runs eagerly (``gm.forward``) and the reason is logged at
WARNING on the ``dipc.backend`` logger.

Options (``torch.compile(model, backend="dipc", options={...})``; Dynamo passes them as
``options=``): ``num_stages`` (2), ``fused_kernels`` (None: on unless ``DIPC_FUSED_KERNELS=0``),
``aot`` (False), ``costs`` (True), ``layers`` (module paths, overriding discovery),
``key_modalities`` / ``module_overrides`` (as in ``tag_modalities``), ``fallback`` (True: eager on
failure; False: raise).

Inspect what it learned::

    compiled = torch.compile(model, backend=dipc_backend, dynamic=True, options={"num_stages": 2})
    compiled(**batch).backward()
    info = dipc.backend.last_compiled()
    info.length_symbols, info.layer_tags, info.graph_costs["vision.blocks.0"]["fwd_flops"], info.stages
    print(info.summary())

Registration is by entry point only (``[project.entry-points.torch_dynamo_backends] dipc =
"dipc.backend:dipc_backend"``); decorating with ``register_backend("dipc")`` as well would make
torch assert on the duplicate name.

Not handled: the backend does not run the model as a pipeline (the plan is what dipc *would*
use); continuation graphs after a graph break see local variables, not batch keys, so their
modality falls back to ``key_modality``'s rules (override with ``key_modalities``); mask pair
counts are taken as dense when weighting the stage plan.
"""
from __future__ import annotations

import collections
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import sympy
import torch
from torch import fx

from dipc.backend_graph import (GraphInput, build_layer_graph, classify_inputs, discover_graph_layers, hint,
                                sym_expr)

__all__ = ["dipc_backend", "BackendOptions", "CompiledGraphInfo", "StagePlan", "last_compiled", "compiled_graphs",
           "clear_compiled", "DEFAULT_OPTIONS"]

log = logging.getLogger("dipc.backend")

DEFAULT_OPTIONS: dict[str, Any] = {
    "num_stages": 2,
    "fused_kernels": None,
    "aot": False,
    "costs": True,
    "layers": None,
    "key_modalities": None,
    "module_overrides": None,
    "fallback": True,
}

_REGISTRY: collections.deque["CompiledGraphInfo"] = collections.deque(maxlen=256)
_COUNTER = 0


@dataclass(frozen=True)
class BackendOptions:
    num_stages: int = 2
    fused_kernels: bool | None = None
    aot: bool = False
    costs: bool = True
    layers: tuple[str, ...] | None = None
    key_modalities: Mapping[str, str] | None = None
    module_overrides: Mapping[str, str] | None = None
    fallback: bool = True

    @classmethod
    def from_options(cls, options: Mapping[str, Any] | None) -> "BackendOptions":
        options = dict(options or {})
        unknown = sorted(set(options) - set(DEFAULT_OPTIONS))
        if unknown:
            raise ValueError(f"dipc backend: unknown option(s) {unknown}. Fix: use {sorted(DEFAULT_OPTIONS)}.")
        merged = {**DEFAULT_OPTIONS, **options}
        n = merged["num_stages"]
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ValueError(f"dipc backend: num_stages={n!r}. Fix: a positive int, e.g. options={{'num_stages': 2}}.")
        if merged["layers"] is not None:
            merged["layers"] = tuple(merged["layers"])
        return cls(**merged)


@dataclass
class StagePlan:
    """One pipeline stage dipc would build from this graph."""

    stage: int
    module: str                       # modality module (segment) the stage belongs to
    layers: list[str]
    cost: float                       # fwd + bwd FLOPs at the example lengths (params x 2 where unknown)


@dataclass
class CompiledGraphInfo:
    """What the backend learned about one Dynamo graph."""

    index: int                                            # order in which the backend saw graphs
    compile_id: str                                       # Dynamo's "frame/recompile" id
    options: BackendOptions
    graph_module: fx.GraphModule                          # Dynamo's graph, tagged (meta["dipc.*"])
    num_nodes: int = 0
    input_keys: list[str] = field(default_factory=list)   # batch keys, placeholder order
    input_shapes: dict[str, tuple[sympy.Expr, ...]] = field(default_factory=dict)
    length_symbols: dict[str, sympy.Expr] = field(default_factory=dict)   # SymInt placeholder -> its node.expr
    symbol_hints: dict[sympy.Symbol, int] = field(default_factory=dict)
    symbol_sources: dict[sympy.Symbol, list[tuple[str, int]]] = field(default_factory=dict)  # (batch key, dim)
    layers: list[str] = field(default_factory=list)
    layer_tags: list[Any] = field(default_factory=list)   # dipc.passes.tag.LayerTag per layer
    node_modality: dict[str, str] = field(default_factory=dict)   # Dynamo node name -> modality
    node_layer: dict[str, str] = field(default_factory=dict)      # Dynamo node name -> layer
    costs: dict[str, Any] = field(default_factory=dict)           # layer -> LayerCostExpr (STAT_SYMBOLS)
    # layer -> cost field -> expression over Dynamo's length symbols (mask pairs as SEMU's Q / X)
    graph_costs: dict[str, dict[str, sympy.Expr]] = field(default_factory=dict)
    layer_weights: dict[str, float] = field(default_factory=dict)
    cost_model: Any = None
    stages: list[StagePlan] = field(default_factory=list)
    fused_ops: list[str] = field(default_factory=list)
    run_module: fx.GraphModule | None = None              # what runs: the rewritten graph (fx executor)
    executor: str = ""                                    # "aot_autograd" | "fx" | "eager-fallback"
    aot_graphs: dict[str, fx.GraphModule] = field(default_factory=dict)
    fallback_reason: str | None = None
    errors: dict[str, str] = field(default_factory=dict)  # pass or layer -> what went wrong
    seconds: float = 0.0

    @property
    def modalities(self) -> dict[str, str]:
        """Layer -> modality module."""
        return {t.path: t.module for t in self.layer_tags}

    def summary(self) -> str:
        lines = [f"dipc graph #{self.index} (dynamo {self.compile_id}): {self.num_nodes} nodes, executor "
                 f"{self.executor}" + (f" [fallback: {self.fallback_reason}]" if self.fallback_reason else "")]
        if self.input_shapes:
            lines.append("  inputs: " + ", ".join(f"{k}{list(v)}" for k, v in self.input_shapes.items()))
        if self.length_symbols:
            def where(s: sympy.Expr) -> str:
                return ", ".join(f"{k}[{d}]" for k, d in self.symbol_sources.get(s, []))
            lines.append("  length symbols: " + ", ".join(
                f"{s}={self.symbol_hints.get(s, '?')} ({where(s)})" for s in self.length_symbols.values()))
        for t in self.layer_tags:
            c = self.graph_costs.get(t.path, {}).get("fwd_flops")
            lines.append(f"  {t.path:36s} {t.module:9s} fwd_flops={c if c is not None else '-'}")
        for s in self.stages:
            lines.append(f"  stage {s.stage} [{s.module}] {s.layers[0]}..{s.layers[-1]} ({len(s.layers)} layers, "
                         f"{s.cost:.3g} FLOPs)")
        if self.fused_ops:
            lines.append(f"  fused: {dict(collections.Counter(self.fused_ops))}")
        for k, v in self.errors.items():
            lines.append(f"  note {k}: {v}")
        return "\n".join(lines)


def last_compiled() -> CompiledGraphInfo:
    """The info of the graph the backend saw last."""
    if not _REGISTRY:
        raise LookupError("dipc backend has compiled nothing yet. Fix: call the torch.compile'd model first.")
    return _REGISTRY[-1]


def compiled_graphs() -> list[CompiledGraphInfo]:
    """Every graph's info, oldest first (the last 256)."""
    return list(_REGISTRY)


def clear_compiled() -> None:
    _REGISTRY.clear()


# ------------------------------------------------------------------------------------------------

def _unsupported(inputs: list[GraphInput]) -> str | None:
    for gi in inputs:
        v = gi.value
        if not isinstance(v, torch.Tensor):
            continue
        what = gi.key if gi.kind == "batch" else f"{gi.kind} {gi.key}"
        if v.is_complex():
            return f"input {what!r} is a {v.dtype} tensor; dipc's passes handle real dtypes only"
        if v.layout != torch.strided:
            return f"input {what!r} has layout {v.layout}; dipc's passes handle dense (strided) tensors only"
        if v.is_quantized:
            return f"input {what!r} is quantized; dipc's passes do not handle quantized tensors"
        if getattr(v, "is_nested", False):
            return f"input {what!r} is a nested tensor; pack it (one [ΣL, ...] tensor) for dipc"
    return None


def _record_inputs(info: CompiledGraphInfo, inputs: list[GraphInput]) -> None:
    for gi in inputs:
        if gi.kind == "symint":
            info.length_symbols[gi.node.name] = gi.symbol
            try:
                info.symbol_hints[gi.symbol] = int(hint(gi.value)) if isinstance(gi.value, torch.SymInt) \
                    else int(gi.value)
            except Exception:
                pass
    for gi in inputs:
        if gi.kind != "batch":
            continue
        info.input_keys.append(gi.key)
        meta = gi.node.meta.get("example_value")
        shape = meta.shape if isinstance(meta, torch.Tensor) else getattr(gi.value, "shape", ())
        dims = tuple(sym_expr(d) for d in shape)
        info.input_shapes[gi.key] = dims
        for d, e in enumerate(dims):
            if e.is_Symbol:
                info.symbol_sources.setdefault(e, []).append((gi.key, d))
                if e not in info.symbol_hints:
                    info.symbol_hints[e] = int(gi.value.shape[d]) if isinstance(gi.value, torch.Tensor) \
                        else int(hint(shape[d]))


def _analyse(gm: fx.GraphModule, inputs: list[GraphInput], opts: BackendOptions, info: CompiledGraphInfo) -> None:
    from dipc.passes.tag import tag_modalities

    layers = list(opts.layers) if opts.layers is not None else discover_graph_layers(gm, inputs)
    lg = build_layer_graph(gm, inputs, layers)
    info.errors.update({f"layer {k}": v for k, v in lg.errors.items()})
    present = [p for p in layers if any(n.op == "call_module" and n.target == p for n in lg.graph_module.graph.nodes)]
    if opts.layers is not None and len(present) < len(layers):
        missing = [p for p in layers if p not in present]
        info.errors["layers"] = f"{missing} have no node in this graph"
    info.layers = present
    info.layer_tags = tag_modalities(lg.graph_module, present, key_modalities=opts.key_modalities,
                                     module_overrides=opts.module_overrides)
    qmod = {n.name: n.meta.get("dipc.modality") for n in lg.graph_module.graph.nodes}
    for n in gm.graph.nodes:
        if n.op == "placeholder":
            gi = next((i for i in inputs if i.node is n), None)
            if gi is not None and gi.kind == "batch":
                n.meta["dipc.modality"] = qmod.get(gi.key)
        elif n.name in lg.quotient:
            n.meta["dipc.modality"] = qmod.get(lg.quotient[n.name])
        if n.name in lg.layer_of:
            n.meta["dipc.layer"] = lg.layer_of[n.name]
        if n.meta.get("dipc.modality") is not None:
            info.node_modality[n.name] = n.meta["dipc.modality"]
    info.node_layer = dict(lg.layer_of)
    if opts.costs and lg.layers:
        _costs(lg, info)
    weights = {p: info.layer_weights.get(p, 2.0 * lg.num_params.get(p, 0)) for p in present}
    info.layer_weights = weights
    if present:
        from dipc.passes.partition import assign_layers
        try:
            stage_layers, stage_mod = assign_layers(info.layer_tags, weights, opts.num_stages, 1)
            info.stages = [StagePlan(i, m, ls, float(sum(weights[p] for p in ls)))
                           for i, (ls, m) in enumerate(zip(stage_layers, stage_mod))]
        except Exception as e:
            info.errors["partition"] = f"{type(e).__name__}: {e}"


def _costs(lg: Any, info: CompiledGraphInfo) -> None:
    from dipc.semu.costs import layer_cost_model

    try:
        cm = layer_cost_model(lg.captured())
        models = [cm]
    except Exception:   # one layer failed: the others still get costs
        models = []
        for p in lg.layers:
            try:
                models.append(layer_cost_model(lg.captured([p])))
            except Exception as e:
                info.errors[f"cost {p}"] = f"{type(e).__name__}: {str(e)[:300]}"
        cm = models[0] if len(models) == 1 else None
    info.cost_model = cm
    for m in models:
        for p in m.layers:
            e = m.expr(p)
            info.costs[p] = e
            local = e.local
            dims = lg.layer_input_dims.get(p, [])
            try:
                subs = {s: dims[leaf][d] for s, (leaf, d) in zip(local.dim_symbols, local.dim_sources)}
            except IndexError:
                continue
            subs.update({s: e.binding.get(s, s) for s in local.pair_symbols})
            info.graph_costs[p] = {k: sympy.expand(v.xreplace(subs)) for k, v in local.exprs.items()}
            # plan weight at the example lengths (masked attention counted dense)
            hints = lg.layer_input_hints[p]
            at = {s: sympy.Integer(int(hints[leaf][d])) for s, (leaf, d) in zip(local.dim_symbols, local.dim_sources)}
            pairs = [c for c in local.attention if c.kind == "mask"]
            at.update({s: (c.batch * c.q_len * c.k_len).xreplace(at) for s, c in zip(local.pair_symbols, pairs)})
            try:
                w = float(sum(local.exprs[k].xreplace(at) for k in ("fwd_flops", "bwd_in_flops", "bwd_w_flops")))
            except TypeError:
                w = 0.0
            if w > 0:
                info.layer_weights[p] = w


def _compile(gm: fx.GraphModule, example_inputs: list, opts: BackendOptions, info: CompiledGraphInfo) -> Callable:
    from dipc.kernels.rewrite import fused_kernels_enabled, rewrite_fused

    run = gm
    use_fused = fused_kernels_enabled() if opts.fused_kernels is None else bool(opts.fused_kernels)
    if use_fused:
        run = rewrite_fused(gm)
        info.fused_ops = list(run.meta.get("dipc.fused_ops", []))
    info.run_module = run
    if info.fused_ops:
        # dipc's fused ops run eagerly here. They are torch custom ops (torch.ops.dipc.*) with fake
        # impls, so AOTAutograd could trace them too; that path is not enabled or tested yet.
        info.executor = "fx"
        return run.forward
    if not opts.aot:
        info.executor = "fx"
        return gm.forward
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    def fw(g: fx.GraphModule, _inputs: list) -> Callable:
        info.aot_graphs.setdefault("forward", g)
        return make_boxed_func(g.forward)

    def bw(g: fx.GraphModule, _inputs: list) -> Callable:
        info.aot_graphs["backward"] = g
        return make_boxed_func(g.forward)

    def inference(g: fx.GraphModule, _inputs: list) -> Callable:
        info.aot_graphs["inference"] = g
        return make_boxed_func(g.forward)

    compiled = aot_autograd(fw_compiler=fw, bw_compiler=bw, inference_compiler=inference)(gm, example_inputs)
    info.executor = "aot_autograd"
    return compiled


def _reraise_control(e: BaseException) -> None:
    """Dynamo's own control-flow exceptions (restart the analysis) must reach Dynamo."""
    from torch._dynamo.exc import RestartAnalysis

    if isinstance(e, RestartAnalysis):
        raise e


def _fallback(gm: fx.GraphModule, info: CompiledGraphInfo, reason: str) -> Callable:
    info.executor = "eager-fallback"
    info.fallback_reason = reason
    log.warning("dipc backend: graph %s (%s) falls back to eager: %s", info.index, info.compile_id, reason)
    return gm.forward


def _register(info: CompiledGraphInfo) -> None:
    global _COUNTER
    info.index = _COUNTER
    _COUNTER += 1
    _REGISTRY.append(info)


def dipc_backend(gm: fx.GraphModule, example_inputs: list, *, options: Mapping[str, Any] | None = None,
                 mode: str | None = None) -> Callable:
    """The ``torch.compile`` backend (see the module docstring). ``mode`` is accepted and ignored.

    Every call that returns records one :class:`CompiledGraphInfo` (``last_compiled()``)."""
    opts = BackendOptions.from_options(options)
    t0 = time.perf_counter()
    cid = gm.meta.get("dynamo_compile_id")
    info = CompiledGraphInfo(index=-1, compile_id=str(cid) if cid is not None else "?", options=opts,
                             graph_module=gm, num_nodes=len(gm.graph.nodes))
    try:
        inputs = classify_inputs(gm, list(example_inputs))
        _record_inputs(info, inputs)
    except Exception as e:
        if not opts.fallback:
            raise
        _register(info)
        return _fallback(gm, info, f"could not read the graph's inputs ({type(e).__name__}: {e})")
    reason = _unsupported(inputs)
    if reason is not None:
        if not opts.fallback:
            raise NotImplementedError(f"dipc backend: {reason}")
        _register(info)
        return _fallback(gm, info, reason)
    try:   # compile first: AOTAutograd may ask Dynamo to restart (then this call never happened)
        fn = _compile(gm, list(example_inputs), opts, info)
        _register(info)
    except Exception as e:
        _reraise_control(e)
        if not opts.fallback:
            raise
        _register(info)
        fn = _fallback(gm, info, f"compiling the graph failed ({type(e).__name__}: {str(e)[:300]})")
    try:
        _analyse(gm, inputs, opts, info)
    except Exception as e:   # the analysis informs; it never decides correctness
        if not opts.fallback:
            raise
        info.errors["analysis"] = f"{type(e).__name__}: {str(e)[:300]}"
        log.info("dipc backend: analysis of graph %s incomplete: %s", info.index, info.errors["analysis"])
    info.seconds = time.perf_counter() - t0
    log.info("%s", info.summary())
    return fn
