"""SEMU's symbolic cost model: per-layer costs as functions of a sub-microbatch's length statistics.

``layer_cost_model(captured)`` captures every layer of a captured model alone under symbolic fake
tensors (``dipc.semu.symbolic.trace_layer``) and expresses its forward FLOPs, backward FLOPs (input-
and weight-gradient parts apart, for zero-bubble), bytes moved, activations kept for backward and
parameter/gradient/optimizer memory over the *length statistics* of the stream(s) the layer reads:

====  =========================================================================================
n     number of sequences (``num_seqs``)            ``nc``, ``Lc``, ``Qc``, ``Tc``: the same for
L     tokens ΣL (``tokens``)                         the layer's *context* stream (the text a DiT
Q     ΣL² (``sum_sq``): attended pairs of a          block cross-attends to)
      block-diagonal (packed) self-attention
T     padded length (``max_len``)                   X: Σ L_i·Lc_i, pairs of a block-diagonal
                                                       cross-attention (``cross_pairs``)
====  =========================================================================================

How a layer's input dims bind to these is read off its inputs, not written per model: the first
floating input (else the first tensor) is the layer's stream; if one of its dims is free it is a
packed layout (``[ΣL, d]`` → L), if two are, a padded one (``[n, T, d]`` → n, T; its cost counts
the padding, as the kernels do). Free dims first seen in another input form the context stream
the same way. A masked attention's pair count binds to Q when its queries and keys are one
stream, to X otherwise. Lengths are in the layer's own units (an audio front-end sees frames).

Reuse. *Spatial*: layers with one signature (module type, parameter shapes/dtypes, scalar
attributes, input layout) are traced once and share one lambdified cost function. *Temporal*:
evaluated costs are cached by (signature, length bucket), across candidates and batches;
``bucket_rel > 0`` rounds statistics up on a geometric grid so near-equal batches share entries.

Not modelled: see ``dipc.semu.symbolic`` (elementwise FLOPs, fusion, recomputation); tensor
parallelism is the emulator's job (divide FLOPs/bytes by TP and add its collectives).
"""
from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass, field, fields
from typing import Any, Callable, Iterable, Mapping, Sequence

import sympy
import torch
from torch import fx, nn
from torch.utils._pytree import tree_flatten, tree_map

from dipc.errors import DipcError
from dipc.passes.symexpr import lambdify_int
from dipc.semu.symbolic import COST_FIELDS, LocalCost, PinnedShapeWarning, trace_layer

__all__ = ["LengthStats", "LayerCost", "LayerCostExpr", "CostModel", "layer_cost_model", "layer_signature",
           "STAT_SYMBOLS", "CostError"]


class CostError(DipcError):
    """A layer whose cost SEMU cannot derive or evaluate."""


STAT_SYMBOLS: tuple[sympy.Symbol, ...] = tuple(
    sympy.Symbol(s, positive=True, integer=True) for s in ("n", "L", "Q", "T", "nc", "Lc", "Qc", "Tc", "X"))
_n, _L, _Q, _T, _nc, _Lc, _Qc, _Tc, _X = STAT_SYMBOLS


@dataclass(frozen=True, kw_only=True, slots=True)
class LengthStats:
    """Length statistics of one (sub-)microbatch as one layer sees it.

    Build with ``LengthStats.of(lengths, context=...)`` for packed sequences (the common case), or
    ``LengthStats.padded(num_seqs, max_len)`` for a padded ``[n, T]`` layout.
    """

    num_seqs: int
    tokens: int                      # ΣL
    sum_sq: int                      # ΣL²
    max_len: int
    context: "LengthStats | None" = None
    cross_pairs: int | None = None   # Σ L_i · Lc_i

    def __post_init__(self) -> None:
        if self.num_seqs < 0 or self.tokens < 0 or self.sum_sq < 0 or self.max_len < 0:
            raise ValueError(f"negative length statistics {self}. Fix: count tokens, not offsets.")

    @classmethod
    def of(cls, lengths: Sequence[int], context: Sequence[int] | None = None) -> "LengthStats":
        """Statistics of packed sequences; ``context[i]`` is what sequence ``i`` cross-attends to."""
        lengths = [int(x) for x in lengths]
        ctx = None if context is None else cls.of(context)
        cross = None
        if context is not None:
            if len(context) != len(lengths):
                raise ValueError(f"{len(lengths)} sequences but {len(context)} context lengths. "
                                 "Fix: give one context length per sequence.")
            cross = sum(a * int(b) for a, b in zip(lengths, context))
        return cls(num_seqs=len(lengths), tokens=sum(lengths), sum_sq=sum(x * x for x in lengths),
                   max_len=max(lengths, default=0), context=ctx, cross_pairs=cross)

    @classmethod
    def padded(cls, num_seqs: int, max_len: int, context: "LengthStats | None" = None) -> "LengthStats":
        return cls(num_seqs=num_seqs, tokens=num_seqs * max_len, sum_sq=num_seqs * max_len * max_len,
                   max_len=max_len, context=context)

    def values(self) -> tuple[int, ...]:
        """The values of ``STAT_SYMBOLS``, in order."""
        c = self.context or LengthStats(num_seqs=0, tokens=0, sum_sq=0, max_len=0)
        cross = self.cross_pairs if self.cross_pairs is not None else 0
        return (self.num_seqs, self.tokens, self.sum_sq, self.max_len, c.num_seqs, c.tokens, c.sum_sq, c.max_len,
                cross)


@dataclass(frozen=True, kw_only=True, slots=True)
class LayerCost:
    """Evaluated costs of one layer on one (sub-)microbatch. FLOPs and bytes are for the whole
    layer on one device (no tensor parallelism); memory in bytes."""

    fwd_flops: float
    bwd_in_flops: float              # backward for inputs (zero-bubble B), attention backward included
    bwd_w_flops: float               # backward for weights (zero-bubble W)
    attn_fwd_flops: float            # the attention part of fwd_flops
    fwd_bytes: float                 # unfused memory traffic estimate
    bwd_bytes: float
    act_bytes: float                 # kept from forward to backward
    out_bytes: float                 # the layer's output (what a send moves)
    param_bytes: int
    grad_bytes: int
    optim_bytes: int                 # Adam moments (+ fp32 master copy for non-fp32 params)
    num_params: int
    in_bytes: float = 0.0            # the layer's stream input (kept instead of act_bytes when recomputed)
    # extra stash of a kernel that materialises masked attention (CPU SDPA's math path): the
    # softmax probabilities of every masked call, less the output and log-sum-exp a fused kernel keeps
    attn_probs_bytes: float = 0.0
    # gradients the zero-bubble BWD_I captures at the layer's intermediates (the output gradients
    # of its weight-carrying ops) and keeps alive as BWD_W's seeds (dipc.runtime.split_backward)
    wgrad_seed_bytes: float = 0.0
    # selective checkpointing (``<layer>~sel``, dipc.ir.recompute): what it stashes (the stream
    # input and the outputs of SELECTIVE_SAVED_OPS) and the bytes its re-run moves (every other
    # forward op); 0 where unknown, which offers no selective choice
    sel_act_bytes: float = 0.0
    sel_rerun_bytes: float = 0.0
    # the layer's backward at its peak: gradients it creates less the stash it frees by then,
    # parameter gradients left out (dipc.semu.symbolic); 0 where unknown
    bwd_peak_bytes: float = 0.0

    @property
    def bwd_flops(self) -> float:
        return self.bwd_in_flops + self.bwd_w_flops


_SUM_FIELDS = (*COST_FIELDS, "param_bytes", "grad_bytes", "optim_bytes", "num_params")


@dataclass
class LayerCostExpr:
    """One layer's costs as sympy expressions over ``STAT_SYMBOLS`` (rides on ``node.meta["dipc.cost"]``)."""

    path: str
    signature: str
    exprs: dict[str, sympy.Expr]                 # COST_FIELDS -> expression over STAT_SYMBOLS
    local: LocalCost                             # the same over the layer's own dims (d<i>, p<k>)
    binding: dict[sympy.Symbol, sympy.Expr]      # d<i>/p<k> -> stat symbol

    def __str__(self) -> str:
        return f"{self.path} [{self.signature}] " + ", ".join(f"{k}={v}" for k, v in self.exprs.items())


@dataclass
class _Compiled:
    """One signature's lambdified cost functions (shared by every layer with that signature)."""

    expr: LayerCostExpr
    fn_stats: Callable[..., Sequence[float]]
    fn_local: Callable[..., Sequence[float]]


def _attrs(module: nn.Module) -> tuple:
    out = []
    for name, m in module.named_modules():
        for k, v in sorted(vars(m).items()):
            if not k.startswith("_") and k != "training" and isinstance(v, (int, float, bool, str, type(None))):
                out.append((name, k, v))
        out.append((name, type(m).__qualname__))
    return tuple(out)


def layer_signature(module: nn.Module, args: tuple, kwargs: Mapping[str, Any] | None = None) -> str:
    """Equal for layers that must have equal costs: module tree types and scalar attributes,
    parameter/buffer shapes and dtypes, and the inputs' example shapes, dtypes and grad flags."""
    leaves = tree_flatten((tuple(args), dict(kwargs or {})))[0]
    key = (
        _attrs(module),
        tuple((n, tuple(p.shape), str(p.dtype), p.requires_grad) for n, p in module.named_parameters()),
        tuple((n, tuple(b.shape), str(b.dtype)) for n, b in module.named_buffers()),
        tuple((tuple(x.shape), str(x.dtype), x.requires_grad) if isinstance(x, torch.Tensor) else repr(x)
              for x in leaves),
    )
    import hashlib
    return f"{type(module).__name__}:{hashlib.sha1(repr(key).encode()).hexdigest()[:10]}"


def _bind(local: LocalCost, path: str) -> dict[sympy.Symbol, sympy.Expr]:
    """Which stat symbol each of the layer's own symbols is (see module docstring)."""
    # A dim is a length if the FLOPs or an output's shape depend on it; any other free dim (the 2 of
    # ``patch_pos[N, 2]``, read only through indexing) stays at its example value.
    used = set().union(*(local.exprs[k].free_symbols for k in ("fwd_flops", "bwd_in_flops", "bwd_w_flops")),
                       *(sympy.sympify(d).free_symbols for dims in local.out_dims for d in dims))
    used &= set(local.dim_symbols) | set(local.pair_symbols)
    binding: dict[sympy.Symbol, sympy.Expr] = {
        s: sympy.Integer(v) for s, v in zip(local.dim_symbols, local.example_dims) if s not in used}
    tensors = [i for i, dims in enumerate(local.leaf_dims) if dims is not None]
    floats = [i for i in tensors if local.leaf_float[i]]
    order = floats[:1] + [i for i in tensors if i not in floats[:1]]
    streams: list[list[sympy.Symbol]] = []
    for i in order:
        free = [s for s in local.leaf_dims[i] if s.is_Symbol and s in used and s not in binding]
        free = list(dict.fromkeys(free))
        if not free:
            continue
        role = (_n, _L, _Q, _T) if not streams else (_nc, _Lc, _Qc, _Tc)
        if len(streams) >= 2:
            raise CostError(f"layer {path!r} reads three or more independent length streams "
                            f"({[str(s) for s in free]} beyond two), which LengthStats cannot describe. "
                            "Fix: mark it as two layers, or pass explicit dims to CostModel.cost_at.")
        if len(free) == 1:
            binding[free[0]] = role[1]
        elif len(free) == 2:
            binding[free[0]], binding[free[1]] = role[0], role[3]
        else:
            raise CostError(f"layer {path!r}: input {i} has {len(free)} free dims {[str(s) for s in free]}; "
                            "SEMU binds one ([ΣL, d], packed) or two ([n, T, d], padded). "
                            "Fix: flatten the extra dims before the layer, or use CostModel.cost_at.")
        streams.append(free)
    pair_i = 0
    for call in local.attention:
        if call.kind != "mask":
            continue
        p = local.pair_symbols[pair_i]
        pair_i += 1
        q, k = call.q_len, call.k_len
        if q == k:
            binding[p] = _Q if q in (streams[0] if streams else []) else _Qc
        else:
            binding[p] = _X
    missing = (used | set().union(*(e.free_symbols for e in local.exprs.values()))) - set(binding)
    if missing:
        raise CostError(f"layer {path!r}: cannot tell which length statistic {sorted(map(str, missing))} is. "
                        "Fix: use CostModel.cost_at with the layer's input shapes.")
    return binding


def _lambdify(symbols: Sequence[sympy.Symbol], exprs: Sequence[sympy.Expr]) -> Callable[..., Sequence[float]]:
    return lambdify_int(symbols, list(exprs))


def _quantize(v: int, rel: float) -> int:
    if rel <= 0 or v <= 1:
        return v
    return int(math.ceil((1 + rel) ** math.ceil(math.log(v) / math.log1p(rel)) - 1e-9))


@dataclass
class CostModel:
    """Per-layer cost functions of a captured model; ``cost(path, stats)`` evaluates (cached)."""

    layers: list[str]
    exprs: dict[str, LayerCostExpr]
    bucket_rel: float = 0.0
    _compiled: dict[str, _Compiled] = field(default_factory=dict, repr=False)
    _cache: dict[tuple, LayerCost] = field(default_factory=dict, repr=False)
    _static: dict[str, tuple[int, int, int, int]] = field(default_factory=dict, repr=False)
    _groups: dict[tuple, list[tuple[str, int]]] = field(default_factory=dict, repr=False)
    build_seconds: float = 0.0
    num_traced: int = 0
    hits: int = 0
    misses: int = 0

    def signature(self, path: str) -> str:
        return self._layer(path).signature

    def expr(self, path: str) -> LayerCostExpr:
        return self._layer(path)

    def _layer(self, path: str) -> LayerCostExpr:
        try:
            return self.exprs[path]
        except KeyError:
            raise CostError(f"no layer {path!r} in the cost model. Fix: use one of {self.layers[:4]}...") from None

    def cost(self, path: str, stats: LengthStats) -> LayerCost:
        """The layer's costs at these statistics (temporal cache: one evaluation per bucket)."""
        e = self._layer(path)
        vals = stats.values()
        if self.bucket_rel > 0:
            vals = tuple(_quantize(v, self.bucket_rel) for v in vals)
        key = (e.signature, vals)
        hit = self._cache.get(key)
        if hit is not None:
            self.hits += 1
            return hit
        self.misses += 1
        c = self._compiled[e.signature]
        out = self._make(e.signature, c.fn_stats(*vals))
        self._cache[key] = out
        return out

    def cost_sum(self, paths: Sequence[str], stats: LengthStats) -> LayerCost:
        """Summed costs of ``paths`` (e.g. one stage's layers) at one statistics: identical layers are
        evaluated once and multiplied (spatial reuse), each evaluation goes through the cache."""
        key = tuple(paths)
        groups = self._groups.get(key)
        if groups is None:
            counts: dict[str, int] = {}
            first: dict[str, str] = {}
            for p in paths:
                sig = self._layer(p).signature
                counts[sig] = counts.get(sig, 0) + 1
                first.setdefault(sig, p)
            groups = self._groups[key] = [(first[s], c) for s, c in counts.items()]
        parts = [(self.cost(p, stats), c) for p, c in groups]
        tot = {f: sum(getattr(x, f) * c for x, c in parts) for f in _SUM_FIELDS}
        return LayerCost(**tot)

    def cost_uncached(self, path: str, stats: LengthStats) -> LayerCost:
        e = self._layer(path)
        return self._make(e.signature, self._compiled[e.signature].fn_stats(*stats.values()))

    def cost_at(self, path: str, args: tuple, kwargs: Mapping[str, Any] | None = None,
                pairs: Sequence[int] | None = None) -> LayerCost:
        """The layer's costs on concrete inputs (shapes read from ``args``; mask pair counts from
        ``pairs`` or, if the layer has masked attention and none are given, measured by running it)."""
        e = self._layer(path)
        local = e.local
        leaves = tree_flatten((tuple(args), dict(kwargs or {})))[0]
        dims = [int(leaves[i].shape[d]) for i, d in local.dim_sources]
        if local.pair_symbols and pairs is None:
            raise CostError(f"layer {path!r} has masked attention: pass pairs= (see "
                            "dipc.semu.symbolic.measure_attention_pairs).")
        vals = dims + [int(p) for p in (pairs or [])][:len(local.pair_symbols)]
        return self._make(e.signature, self._compiled[e.signature].fn_local(*vals))

    def _make(self, sig: str, vals: Sequence[float]) -> LayerCost:
        pb, gb, ob, npar = self._static[sig]
        return LayerCost(**dict(zip(COST_FIELDS, (float(v) for v in vals))), param_bytes=pb, grad_bytes=gb,
                         optim_bytes=ob, num_params=npar)

    def table(self, stats: Mapping[str, LengthStats] | LengthStats) -> str:
        """One line per layer: forward/backward GFLOPs and activation MB at the given statistics
        (a mapping from layer path prefix to stats, or one stats for all layers)."""
        lines = [f"{'layer':40s} {'fwd GF':>10s} {'bwdB GF':>10s} {'bwdW GF':>10s} {'act MB':>9s} {'param MB':>9s}"]
        for p in self.layers:
            s = stats if isinstance(stats, LengthStats) else _lookup(stats, p)
            c = self.cost(p, s)
            lines.append(f"{p:40s} {c.fwd_flops / 1e9:10.3f} {c.bwd_in_flops / 1e9:10.3f} "
                         f"{c.bwd_w_flops / 1e9:10.3f} {c.act_bytes / 2**20:9.2f} {c.param_bytes / 2**20:9.2f}")
        return "\n".join(lines)


def _lookup(stats: Mapping[str, LengthStats], path: str) -> LengthStats:
    best = max((k for k in stats if path == k or path.startswith(k + ".") or k == ""), key=len, default=None)
    if best is None:
        raise CostError(f"no statistics for layer {path!r} (given prefixes {sorted(stats)}). "
                        "Fix: add an entry for its module path prefix, or '' for all.")
    return stats[best]


def _layer_inputs(captured: Any, node: fx.Node) -> tuple[tuple, dict]:
    values = captured.example_values
    get = lambda a: values[a.name] if isinstance(a, fx.Node) else a
    return tree_map(get, tuple(node.args)), tree_map(get, dict(node.kwargs))


def _out_matches(local: LocalCost, example_out: Any) -> bool:
    outs = [o for o in tree_flatten(example_out)[0] if isinstance(o, torch.Tensor)]
    at = dict(zip(local.dim_symbols, local.example_dims))
    if len(outs) != len(local.out_dims):
        return False
    return all(tuple(int(sympy.sympify(d).subs(at)) for d in dims) == tuple(o.shape)
               for dims, o in zip(local.out_dims, outs))


def _warn_if_rows_pinned(local: LocalCost, path: str) -> None:
    """A layer whose stream input (its first floating-point tensor) kept none of its leading dims
    free costs the same for every batch: say so rather than predict silently wrong numbers."""
    leaf = next((k for k, (dims, fl) in enumerate(zip(local.leaf_dims, local.leaf_float)) if dims and fl), None)
    if leaf is None or len(local.leaf_dims[leaf]) < 2:
        return
    pinned = {d for k, d, _ in local.specialized if k == leaf}
    if set(range(len(local.leaf_dims[leaf]) - 1)) <= pinned:
        warnings.warn(PinnedShapeWarning(
            f"layer {path!r}: tracing pinned every leading dim of its input to the example's sizes "
            f"({[v for k, _, v in local.specialized if k == leaf]}), so SEMU's costs for it will not follow the "
            f"batch (torch {torch.__version__}). Fix: report the op that reads sizes as integers, or give the "
            "layer a profiled cost."), stacklevel=3)


def _trace_checked(module: nn.Module, args: tuple, kwargs: dict, path: str, example_out: Any) -> LocalCost:
    """Trace with size-1 dims bumped to 2 (so a one-sequence example batch does not pin the batch
    size); if that fails or disagrees with the example outputs, trace the example shapes as they are."""
    try:
        local = trace_layer(module, args, kwargs, name=path, bump_ones=True)
        if example_out is None or _out_matches(local, example_out):
            return local
    except Exception:
        pass
    return trace_layer(module, args, kwargs, name=path, bump_ones=False)


def layer_cost_model(captured: Any, *, reuse: bool = True, bucket_rel: float = 0.0,
                     annotate: bool = True) -> CostModel:
    """Symbolic costs of every layer of ``captured`` (a ``CapturedModel``), one trace per signature.

    ``reuse=False`` traces and lambdifies every layer on its own (for measuring spatial reuse).
    ``annotate`` puts each layer's ``LayerCostExpr`` on its node as ``node.meta["dipc.cost"]``.

    Example::

        pipe = dipc.compile(model, batch, num_stages=4)
        cm = layer_cost_model(pipe.captured)
        cm.cost("vision.blocks.0", LengthStats.of([169] * 8)).fwd_flops
    """
    t0 = time.perf_counter()
    gm = captured.graph_module
    layer_set = set(captured.layers)
    model = CostModel(layers=[], exprs={}, bucket_rel=bucket_rel)
    by_sig: dict[str, tuple[LocalCost, dict]] = {}
    for node in gm.graph.nodes:
        if node.op != "call_module" or node.target not in layer_set or node.target in model.exprs:
            continue
        path = node.target
        module = gm.get_submodule(path)
        args, kwargs = _layer_inputs(captured, node)
        sig = layer_signature(module, args, kwargs)
        if not reuse:
            sig = f"{sig}@{path}"
        if sig not in by_sig:
            try:
                local = _trace_checked(module, args, kwargs, path, captured.example_values.get(node.name))
            except DipcError:
                raise
            except Exception as e:
                raise CostError(f"layer {path!r} ({type(module).__name__}) could not be traced under symbolic "
                                f"fake tensors: {type(e).__name__}: {str(e)[:300]}. Fix: make its shapes follow "
                                "its input shapes, or give SEMU a profiled cost for it.") from e
            _warn_if_rows_pinned(local, path)
            binding = _bind(local, path)
            by_sig[sig] = (local, binding)
            model.num_traced += 1
            exprs = {k: sympy.expand(v.xreplace(binding)) for k, v in local.exprs.items()}
            expr = LayerCostExpr(path=path, signature=sig, exprs=exprs, local=local, binding=binding)
            model._compiled[sig] = _Compiled(
                expr=expr,
                fn_stats=_lambdify(STAT_SYMBOLS, [exprs[k] for k in COST_FIELDS]),
                fn_local=_lambdify(local.dim_symbols + local.pair_symbols, [local.exprs[k] for k in COST_FIELDS]))
            model._static[sig] = (local.param_bytes, local.grad_bytes, local.optim_bytes, local.num_params)
        local, binding = by_sig[sig]
        shared = model._compiled[sig].expr
        e = shared if shared.path == path else LayerCostExpr(path=path, signature=sig, exprs=shared.exprs,
                                                             local=local, binding=binding)
        model.exprs[path] = e
        model.layers.append(path)
        if annotate:
            node.meta["dipc.cost"] = e
    model.build_seconds = time.perf_counter() - t0
    return model
