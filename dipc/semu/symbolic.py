"""Capture one layer alone under symbolic fake tensors and read off its costs as sympy expressions.

Every dimension of every tensor input is a fresh symbol (``DimDynamic.DYNAMIC``, no duck sizing);
the trace's guards unify the ones the code ties together (a mask's sides with the token count) and
pin the static ones (hidden sizes) to constants, so what stays free are the length-like dimensions.
Under that trace:

- ``FlopCounterMode`` gives matmul/conv FLOPs as sympy-backed SymInts, for the forward, for the
  backward with respect to the inputs only (zero-bubble ``B``) and for the whole backward (inputs and
  weights); the weight-gradient part (``W``) is the difference.
- ``scaled_dot_product_attention`` is replaced by a stand-in (same shapes, same saved tensors as a
  flash kernel, no FLOPs seen by the counter) and costed by dipc's own formula: ``2·H·pairs·(E+Ev)``
  forward and twice that backward, where ``pairs`` is the number of attended (query, key) pairs per
  head: ``B·Nq·Nk`` without a mask, ``B·N(N+1)/2`` causal, and a symbol ``p<k>`` with a mask (for a
  block-diagonal mask over packed sequences it is ``ΣL²``; the caller binds it).
  FlopCounterMode itself counts CPU SDPA as 0 and the meta/math path as full attention, neither
  of which is the work a varlen flash kernel does.
- Bytes moved are an *unfused* estimate: the tensor bytes every non-view ATen op reads and writes.
- Activation memory is the bytes of the distinct storages autograd saves for backward (parameters
  excluded, the layer's own input included), plus the softmax statistics a flash kernel keeps.
- The zero-bubble split's held gradients (``wgrad_seed_bytes``): the layer's backward graph is
  split by the runtime's own rules (:mod:`dipc.passes.grad_split`) and the input-gradient pass is
  asked for the gradients flowing into its intermediates, as BWD_I does; the bytes of their
  distinct storages (the seed of the layer's output gradient included when one is captured) are
  what BWD_I keeps alive for BWD_W. The layer's inputs stand for the stage's activation path.
- The backward's own peak (``bwd_peak_bytes``): during the whole backward, the storages its ops
  create (intermediate gradients, the input gradients) less the saved activations it frees, at the
  moment that sum is largest for the example's sizes, as an expression (a parameter's gradient
  counts only as the transient it is before being accumulated into ``.grad``). A layer's backward
  holds far more than its input and output gradients: an encoder block's peaks at 4x its input.

Custom ops are costed by their ``register_op_cost`` entries (FLOPs, optionally bytes moved); what
they keep for backward is what their autograd saves. dipc's fused kernels are such ops
(``torch.ops.dipc.*``, registered by ``dipc.kernels``), so a rewritten layer is costed as it runs.

Not modelled here: elementwise/normalisation FLOPs (FlopCounterMode does not count them either),
fusion that torch itself would do (Inductor), recomputation, tensor parallelism (the caller
splits), data-dependent shapes (a layer whose output size depends on tensor values cannot be
captured and raises).
"""
from __future__ import annotations

import contextlib
import logging
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable

import sympy
import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_unflatten
from torch.utils.flop_counter import FlopCounterMode, flop_registry

from dipc.passes.grad_split import analyse_split
from dipc.ir.recompute import SELECTIVE_SAVED_OPS
from dipc.semu.op_costs import _NO_FLOPS, _OP_BYTES, _OP_FLOPS, register_op_cost

__all__ = ["AttentionCall", "LocalCost", "trace_layer", "COST_FIELDS", "UnknownOpCostWarning", "PinnedShapeWarning",
           "register_op_cost"]

# The symbolic quantities of one layer, in this order everywhere (LocalCost.exprs, LayerCost fields).
COST_FIELDS = ("fwd_flops", "bwd_in_flops", "bwd_w_flops", "attn_fwd_flops", "fwd_bytes", "bwd_bytes",
               "act_bytes", "out_bytes", "in_bytes", "attn_probs_bytes", "wgrad_seed_bytes", "sel_act_bytes",
               "sel_rerun_bytes", "bwd_peak_bytes")

_SDPA = {F.scaled_dot_product_attention, torch._C._nn.scaled_dot_product_attention}
_LINEAR = {F.linear, torch._C._nn.linear}


def _linear(input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear`` spelled with the ops torch's C++ ``linear``/``matmul`` dispatch for it (rows
    flattened, one ``mm``/``addmm``, the leading dims restored), so the trace records the same ops,
    bytes and saved tensors.

    Why: on torch 2.11 (found on a GPU machine) ``linear`` read a symbolic input's sizes as plain
    integers (``aten.size.default`` on the fake tensor), which pinned the batch and sequence dims
    to the example's values and left every linear layer with constant costs. Here every size is
    read symbolically, through ops with Python meta functions."""
    if input.dim() < 2:
        return F.linear(input, weight, bias)
    if input.dim() == 2:
        return torch.mm(input, weight.t()) if bias is None else torch.addmm(bias, input, weight.t())
    lead = input.shape[:-1]
    if bias is not None and input.dim() == 3 and input.is_contiguous():   # C++ _flatten_nd_linear
        return torch.addmm(bias, input.view(-1, input.shape[-1]), weight.t()).view(*lead, weight.shape[0])
    # matmul's fold of the leading dims into rows (a copy when the input is not contiguous)
    rows = input.contiguous().view(-1, input.shape[-1])
    out = torch.ops.aten._unsafe_view(torch.mm(rows, weight.t()), (*lead, weight.shape[0]))
    return out if bias is None else torch.add(out, bias)


class UnknownOpCostWarning(UserWarning):
    """A layer runs an op SEMU has no FLOP formula for; its FLOPs are counted as 0."""


class PinnedShapeWarning(UserWarning):
    """The trace pinned a layer's row dims to the example's sizes: its costs ignore the batch."""


def _flop_counter() -> FlopCounterMode:
    return FlopCounterMode(display=False, custom_mapping=dict(_OP_FLOPS))


def _has_formula(func: Any) -> bool:
    """Whether SEMU knows ``func``'s FLOPs: a FLOP formula (torch's or a registered one), a view,
    a pointwise op, or an op that does no matmul-like work (deliberately costed by bytes only)."""
    packet = func.overloadpacket
    if packet in flop_registry or packet in _OP_FLOPS or packet in _NO_FLOPS or packet in _BYTES_ONLY:
        return True
    return func.is_view or torch.Tag.pointwise in func.tags


def _expr(x: Any) -> sympy.Expr:
    if isinstance(x, torch.SymInt):
        return sympy.sympify(x.node.expr)
    return sympy.Integer(int(x))


def _nbytes(t: torch.Tensor) -> sympy.Expr:
    return _expr(t.numel()) * t.element_size()


def _stream_bytes(inputs: list[Any]) -> sympy.Expr:
    """Bytes of the layer's stream input (the first floating tensor, else the first tensor): what
    a recomputed (checkpointed) layer keeps for its backward. Other inputs (masks, RoPE tables)
    are shared by the stage's layers and kept by the glue anyway, so they are not counted."""
    tensors = [t for t in inputs if isinstance(t, torch.Tensor)]
    stream = next((t for t in tensors if t.is_floating_point()), tensors[0] if tensors else None)
    return _nbytes(stream) if stream is not None else sympy.Integer(0)


@dataclass(frozen=True)
class AttentionCall:
    """One SDPA call seen in the layer: shapes as expressions, how pairs were counted."""

    heads: sympy.Expr
    batch: sympy.Expr           # product of q's leading dims before the head dim
    q_len: sympy.Expr
    k_len: sympy.Expr
    qk_dim: sympy.Expr
    v_dim: sympy.Expr
    kind: str                   # "full" | "causal" | "mask"
    pairs: sympy.Expr           # attended pairs per head, summed over the batch dims

    @property
    def fwd_flops(self) -> sympy.Expr:
        return 2 * self.heads * self.pairs * (self.qk_dim + self.v_dim)


@dataclass
class LocalCost:
    """A layer's costs over its own symbols: ``d<i>`` (input dims) and ``p<k>`` (mask pair counts)."""

    exprs: dict[str, sympy.Expr]
    dim_symbols: list[sympy.Symbol]                   # d0, d1, ... in order of first appearance
    dim_sources: list[tuple[int, int]]                # (tensor leaf index, dim) of each d<i>
    pair_symbols: list[sympy.Symbol]                  # p0, p1, ...
    attention: list[AttentionCall]
    leaf_dims: list[tuple[sympy.Expr, ...] | None]    # every input leaf's dims in d-symbols (None: not a tensor)
    leaf_float: list[bool]
    specialized: list[tuple[int, int, int]]           # (leaf, dim, value): a dim the trace pinned to a constant
    example_dims: list[int]                           # each d<i>'s value in the example inputs
    out_dims: list[tuple[sympy.Expr, ...]]            # every output tensor's dims in d-symbols
    num_params: int
    param_bytes: int
    grad_bytes: int
    optim_bytes: int
    guards: list[sympy.Expr] = field(default_factory=list)
    # ATen ops one call dispatches (views included): forward, input-gradient backward, whole backward.
    # Fixed per layer (shapes do not change the op sequence of a traceable layer); SEMU charges the
    # profile's per-op overhead for each, which dominates small layers on CPU.
    ops: dict[str, int] = field(default_factory=dict)


class _AttentionStandIn(torch.autograd.Function):
    """Same output shape and saved tensors as a flash-attention kernel, no work seen by counters."""

    @staticmethod
    def forward(ctx, q, k, v):  # type: ignore[override]
        out = q.new_empty(q.shape[:-1] + v.shape[-1:])
        ctx.save_for_backward(q, k, v, out)
        return out

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        q, k, v, _ = ctx.saved_tensors
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


class _Recorder(TorchDispatchMode):
    """Bytes read + written by every non-view op, per phase; silent while ``quiet``."""

    def __init__(self) -> None:
        super().__init__()
        self.phase = "fwd"
        self.quiet = False
        self.terms: dict[str, list[sympy.Expr]] = {"fwd": [], "bwd": []}
        self.ops: dict[str, int] = {"fwd": 0, "skip": 0, "bwd": 0, "sel_fwd": 0}   # ATen ops dispatched per phase
        # selective checkpointing (dipc.ir.recompute.SELECTIVE_SAVED_OPS): the forward outputs it
        # keeps, and the bytes (ops: ``ops["sel_fwd"]``) of the forward ops its backward re-runs
        self.sel_saved: list[sympy.Expr] = []
        self.sel_rerun: list[sympy.Expr] = []
        self.unknown: dict[str, None] = {}                            # ops without a FLOP formula, in order

    def add(self, phase: str, e: sympy.Expr) -> None:
        self.terms[phase].append(e)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        # count what eager dispatches: fake mode's own prim.device / sym_size queries are not kernels
        saved_op = False
        if not self.quiet and func.namespace != "prim" and not func.__name__.startswith("sym_"):
            self.ops[self.phase] += 1
            if not _has_formula(func):
                self.unknown.setdefault(str(func.overloadpacket), None)
            if self.phase == "fwd":
                saved_op = func.overloadpacket.__name__ in SELECTIVE_SAVED_OPS
                if saved_op:
                    self.sel_saved.append(sympy.Add(*(_nbytes(t) for t in tree_flatten(out)[0]
                                                      if isinstance(t, torch.Tensor))))
                elif not func.is_view:
                    self.ops["sel_fwd"] += 1
        if (self.quiet or self.phase == "skip" or func.is_view or func.overloadpacket in _NO_TRAFFIC
                or func.namespace == "prim"):   # prim.device and the like read metadata, not memory
            return out
        phase = "fwd" if self.phase == "fwd" else "bwd"
        formula = _OP_BYTES.get(func.overloadpacket)
        if formula is not None:
            moved = _expr(formula(*args, out=out, **kwargs))
        else:
            leaves = [x for x in tree_flatten((args, kwargs))[0] + tree_flatten(out)[0] if isinstance(x, torch.Tensor)]
            if not leaves:
                return out
            moved = sympy.Add(*(_nbytes(t) for t in leaves))
        self.terms[phase].append(moved)
        if phase == "fwd" and not saved_op:
            self.sel_rerun.append(moved)
        return out


_aten = torch.ops.aten
# Ops that do no matmul-like work: costed by the bytes they move (plus the per-op overhead of a
# calibrated profile), so they raise no UnknownOpCostWarning. Pointwise ops and views need no entry.
_BYTES_ONLY: set[Any] = {
    getattr(ns, n) for ns, names in (
        (torch.ops.aten, "_to_copy _unsafe_view arange cat stack embedding embedding_dense_backward empty empty_like "
                         "empty_strided new_empty new_empty_strided zeros zeros_like ones ones_like full full_like "
                         "new_zeros new_ones new_full scalar_tensor mean sum amax amin max min argmax argmin var "
                         "var_mean std logsumexp native_layer_norm native_layer_norm_backward native_group_norm "
                         "native_group_norm_backward _fused_rms_norm _fused_rms_norm_backward _softmax "
                         "_softmax_backward_data _log_softmax _log_softmax_backward_data nll_loss_forward "
                         "nll_loss_backward nll_loss2d_forward nll_loss2d_backward copy copy_ clone index "
                         "index_select index_put index_put_ index_add gather scatter scatter_add scatter_reduce "
                         "cumsum cumprod sort topk repeat repeat_interleave constant_pad_nd slice_backward "
                         "select_backward index_select_backward fill fill_ zero_ nonzero _local_scalar_dense "
                         "lift_fresh lift_fresh_copy detach alias bincount one_hot masked_scatter masked_select "
                         "native_dropout native_dropout_backward sym_size sym_stride sym_numel sym_storage_offset"),
        (torch.ops.prim, "device layout"),
    ) for n in names.split() if hasattr(ns, n)
}
_NO_TRAFFIC = {_aten.empty, _aten.empty_like, _aten.new_empty, _aten.empty_strided, _aten.new_empty_strided,
               _aten.detach, _aten.lift_fresh, _aten.zeros_like, _aten.ones_like, _aten.full_like}


class _AttentionMode(TorchFunctionMode):
    """Replaces SDPA by the stand-in and records one ``AttentionCall`` per call."""

    def __init__(self, recorder: _Recorder) -> None:
        super().__init__()
        self.calls: list[tuple[AttentionCall, Any, Any]] = []   # (call, q_len SymInt, k_len SymInt)
        self.recorder = recorder
        self.extra_saved: sympy.Expr = sympy.Integer(0)
        # what a kernel that materialises masked attention (CPU's math path) stashes besides q, k, v
        self.probs_saved: sympy.Expr = sympy.Integer(0)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _LINEAR:
            return _linear(*args, **kwargs)
        if func not in _SDPA:
            return func(*args, **kwargs)
        names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
        bound = dict(zip(names, args)) | kwargs
        q, k, v = bound["query"], bound["key"], bound["value"]
        mask, causal = bound.get("attn_mask"), bool(bound.get("is_causal", False))
        heads = _expr(q.shape[-3]) if q.dim() >= 3 else sympy.Integer(1)
        batch = sympy.Integer(1)
        for s in q.shape[:-3]:
            batch = batch * _expr(s)
        nq, nk = _expr(q.shape[-2]), _expr(k.shape[-2])
        if isinstance(mask, torch.Tensor):   # ties the mask's sides to the lengths (as SDPA's broadcast does)
            mask.expand(tuple(q.shape[:-2]) + (q.shape[-2], k.shape[-2]))
        if mask is not None:
            kind, pairs = "mask", sympy.Symbol(f"_mask{len(self.calls)}", positive=True, integer=True)
        elif causal:
            kind, pairs = "causal", batch * nq * (nq + 1) / 2
        else:
            kind, pairs = "full", batch * nq * nk
        call = AttentionCall(heads=heads, batch=batch, q_len=nq, k_len=nk, qk_dim=_expr(q.shape[-1]),
                             v_dim=_expr(v.shape[-1]), kind=kind, pairs=pairs)
        self.calls.append((call, q.shape[-2], k.shape[-2]))
        rec = self.recorder
        io = _nbytes(q) + _nbytes(k) + _nbytes(v) + (_nbytes(mask) if isinstance(mask, torch.Tensor) else 0)
        out_bytes = _expr(q.numel()) // _expr(q.shape[-1]) * _expr(v.shape[-1]) * q.element_size()
        lse = batch * heads * nq * 4                       # fp32 log-sum-exp per query row
        rec.add("fwd", io + out_bytes + lse)
        rec.add("bwd", 2 * io + 3 * out_bytes + lse)       # read q,k,v,out,dout,lse; write dq,dk,dv
        self.extra_saved = self.extra_saved + lse
        rec.sel_saved.append(out_bytes + lse)   # a fused attention kernel: selective checkpointing keeps its outputs
        if kind == "mask":   # the dense softmax probabilities instead of the output and lse
            self.probs_saved = self.probs_saved + heads * batch * nq * nk * q.element_size() - out_bytes - lse
        rec.ops["fwd"] += 1   # one fused kernel forward; its backward is counted as one below
        rec.ops["skip"] += 1
        rec.ops["bwd"] += 1
        rec.quiet = True
        try:
            return _AttentionStandIn.apply(q, k, v)
        finally:
            rec.quiet = False


def _storage_key(t: torch.Tensor) -> int:
    return t.untyped_storage()._cdata


class _LivePeak(TorchDispatchMode):
    """Bytes alive over time while ``active``: every storage an op creates (+ its bytes, until it
    is freed) and every watched storage freed (- its bytes), as (id, bytes) events in order; ids
    are per allocation, so a freed storage's address reused later is a new id."""

    def __init__(self) -> None:
        super().__init__()
        self.active = False
        self.events: list[tuple[int, sympy.Expr]] = []
        self.current: dict[int, int] = {}     # storage key -> id of its live allocation
        self._next = 0
        self._refs: dict[int, Any] = {}

    def watch(self, t: torch.Tensor, nbytes: sympy.Expr) -> None:
        """Count ``t``'s storage as freed (``-nbytes``) if it dies while active (a saved activation)."""
        storage = t.untyped_storage()
        key = storage._cdata
        if key in self._refs:
            return
        self._refs[key] = weakref.ref(storage, lambda _, k=key, n=nbytes: self._freed(k, -n))

    def _freed(self, key: int, nbytes: sympy.Expr) -> None:
        self._refs.pop(key, None)
        ident = self.current.pop(key, None)
        if self.active:
            self.events.append((-1 if ident is None else ident, nbytes))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not self.active or func.is_view:
            return out
        inputs = {_storage_key(x) for x in tree_flatten((args, kwargs))[0] if isinstance(x, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            key = storage._cdata
            if key in inputs or key in self._refs:
                continue
            nbytes = _expr(storage.nbytes())
            self._next += 1
            self.current[key] = self._next
            self.events.append((self._next, nbytes))
            self._refs[key] = weakref.ref(storage, lambda _, k=key, n=nbytes: self._freed(k, -n))
        return out

    def peak(self, hints: dict, transient: set[int]) -> sympy.Expr:
        """The sum of the events up to the one where it is largest at ``hints`` (symbol -> value);
        the allocations ``transient`` (ids) count only at their own event (freed right after, as a
        parameter gradient once accumulated into ``.grad``); 0 if it never rises."""
        def value(e: sympy.Expr) -> float:
            try:
                return float(e.xreplace(hints)) if isinstance(e, sympy.Expr) else float(e)
            except TypeError:    # a size without an example value (unbacked): not placed
                return 0.0

        total, best, best_at, spike = 0.0, 0.0, 0, None
        for k, (ident, e) in enumerate(self.events):
            if ident in transient:
                if total + value(e) > best:
                    best, best_at, spike = total + value(e), k, e
                continue
            total += value(e)
            if total > best:
                best, best_at, spike = total, k + 1, None
        kept = [e for ident, e in self.events[:best_at] if ident not in transient]
        return sympy.Add(*kept, *([spike] if spike is not None else []))


def trace_layer(module: nn.Module, args: tuple, kwargs: dict | None = None, *,
                name: str = "layer", bump_ones: bool = True) -> LocalCost:
    """Costs of ``module(*args, **kwargs)`` as expressions over its input dims (see module docstring).

    ``args``/``kwargs`` are example values (real, meta or fake-free tensors; their ``requires_grad``
    says which inputs get gradients). Parameters are taken to the meta device (nothing is copied).
    ``bump_ones``: trace with every size-1 input dim at 2, so an example batch of one sequence
    does not pin the batch size to 1 (the caller checks the result against the example outputs).
    """
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv, StatelessSymbolicContext

    kwargs = kwargs or {}
    meta_module = _to_meta(module)
    flat, spec = tree_flatten((tuple(args), dict(kwargs)))
    real = [torch.empty(tuple(2 if bump_ones and d == 1 else d for d in x.shape), dtype=x.dtype, device="meta")
            if isinstance(x, torch.Tensor) else x for x in flat]
    env = ShapeEnv(specialize_zero_one=False, duck_shape=False)
    fake_log = logging.getLogger("torch._subclasses.fake_tensor")
    level, fake_log.level = fake_log.level, logging.CRITICAL
    raw_syms: list[list[sympy.Expr] | None] = []
    try:
        with FakeTensorMode(shape_env=env, allow_non_fake_inputs=True) as mode:
            fake: list[Any] = []
            for orig, x in zip(flat, real):
                if not isinstance(x, torch.Tensor):
                    fake.append(x)
                    raw_syms.append(None)
                    continue
                ctx = StatelessSymbolicContext(dynamic_sizes=[DimDynamic.DYNAMIC] * x.dim())
                f = mode.from_tensor(x, symbolic_context=ctx)
                if orig.requires_grad and f.is_floating_point():
                    f.requires_grad_(True)
                fake.append(f)
                raw_syms.append([_expr(s) for s in f.shape])
            fargs, fkwargs = tree_unflatten(fake, spec)
            # Parameters and buffers as fake tensors of our own, so saved ones are recognised (and
            # not counted as activations) by their storage.
            state = {n: mode.from_tensor(t, static_shapes=True)
                     for n, t in [*meta_module.named_parameters(), *meta_module.named_buffers()]}
            params = []
            for n, p in meta_module.named_parameters():
                if p.requires_grad:
                    state[n].requires_grad_(True)
                    params.append(state[n])
            param_keys = {_storage_key(t) for t in state.values()}
            saved: dict[int, sympy.Expr] = {}

            live = _LivePeak()

            def pack(t: torch.Tensor) -> torch.Tensor:
                key = _storage_key(t)
                if key not in param_keys and key not in saved:
                    base = t._base if t._base is not None else t
                    saved[key] = _nbytes(base)
                    live.watch(t, saved[key])
                return t

            rec = _Recorder()
            attn = _AttentionMode(rec)
            fwd = _flop_counter()
            with rec, attn, fwd, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                out = torch.func.functional_call(meta_module, state, tuple(fargs), dict(fkwargs))
            outs = [o for o in tree_flatten(out)[0] if isinstance(o, torch.Tensor)]
            out_shapes = [[_expr(s) for s in o.shape] for o in outs]
            out_bytes = sympy.Add(*(_nbytes(o) for o in outs))
            grad_outs = [o for o in outs if o.requires_grad]
            inputs = [f for f in fake if isinstance(f, torch.Tensor) and f.requires_grad]
            bwd_in, bwd_all, seeds, bwd_peak = sympy.Integer(0), sympy.Integer(0), sympy.Integer(0), sympy.Integer(0)
            if grad_outs:
                gouts = [torch.empty_like(o) for o in grad_outs]
                rec.phase = "skip"
                if inputs:
                    c = _flop_counter()
                    with c, rec:
                        torch.autograd.grad(grad_outs, inputs, gouts, retain_graph=True, allow_unused=True)
                    bwd_in = _expr(c.get_total_flops())
                    seeds = _wgrad_seed_bytes(grad_outs, gouts, inputs, params)
                rec.phase = "bwd"
                c = _flop_counter()
                live.active = True
                with c, rec, live:
                    grads = torch.autograd.grad(grad_outs, inputs + params, gouts, allow_unused=True)
                live.active = False
                bwd_all = _expr(c.get_total_flops())
                # a parameter's gradient lives on in .grad (the cost model places those) and, from
                # the second backward on, exists only until it is accumulated there: a transient
                param_grads = {live.current.get(_storage_key(g)) for g in grads[len(inputs):] if g is not None}
                hints = getattr(env, "backed_var_to_val", None) or env.var_to_val
                bwd_peak = live.peak(hints, param_grads - {None})
                del grads
            attn_fwd = sympy.Add(*(call.fwd_flops for call, _, _ in attn.calls))
            stream = _stream_bytes(fake)   # what full recomputation keeps, and selective on top of its outputs
            exprs = {
                "fwd_flops": _expr(fwd.get_total_flops()) + attn_fwd,
                "bwd_in_flops": bwd_in + 2 * attn_fwd,
                "bwd_w_flops": bwd_all - bwd_in,
                "attn_fwd_flops": attn_fwd,
                "fwd_bytes": sympy.Add(*rec.terms["fwd"]),
                "bwd_bytes": sympy.Add(*rec.terms["bwd"]),
                "act_bytes": sympy.Add(*saved.values()) + attn.extra_saved,
                "out_bytes": out_bytes,
                "in_bytes": stream,
                "attn_probs_bytes": attn.probs_saved,
                "wgrad_seed_bytes": seeds,
                # selective checkpointing keeps the layer's stream input and its expensive ops' outputs
                "sel_act_bytes": stream + sympy.Add(*rec.sel_saved),
                "sel_rerun_bytes": sympy.Add(*rec.sel_rerun),
                "bwd_peak_bytes": bwd_peak,
            }
            if not grad_outs:   # nothing differentiable leaves the layer: no stash either
                exprs["act_bytes"] = sympy.Integer(0)
                exprs["attn_probs_bytes"] = sympy.Integer(0)
                exprs["sel_act_bytes"] = sympy.Integer(0)
    finally:
        fake_log.level = level
    local = _canonicalize(env, exprs, raw_syms, [isinstance(x, torch.Tensor) and x.is_floating_point() for x in real],
                         attn.calls, module, name, [x.shape if isinstance(x, torch.Tensor) else None for x in flat],
                         out_shapes)
    local.ops = {"fwd": rec.ops["fwd"], "bwd_in": rec.ops["skip"], "bwd": rec.ops["bwd"], "sel_fwd": rec.ops["sel_fwd"]}
    if rec.unknown:
        import warnings

        ops = ", ".join(rec.unknown)
        warnings.warn(UnknownOpCostWarning(
            f"layer {name!r} ({type(module).__name__}): SEMU has no FLOP formula for {ops}; their FLOPs count as 0 "
            "(only their bytes are costed). Fix: dipc.semu.symbolic.register_op_cost(torch.ops.<ns>.<op>, "
            "flops=lambda *shapes, out_shape=None, **kw: ...) before building the cost model, or flops=None if "
            "the op does no matmul-like work."), stacklevel=2)
    return local


def _wgrad_seed_bytes(outs: list[torch.Tensor], grads: list[torch.Tensor], inputs: list[torch.Tensor],
                      params: list[torch.Tensor]) -> sympy.Expr:
    """Bytes of the gradients the zero-bubble BWD_I captures at the layer's intermediates and keeps
    for BWD_W (:func:`dipc.runtime.split_backward.backward_input`'s rules), each storage once.
    Runs one more input-gradient pass on the fake graph, outside the counters."""
    from torch.autograd.graph import get_gradient_edge

    if not params:
        return sympy.Integer(0)
    split = analyse_split([get_gradient_edge(o).node for o in outs], {get_gradient_edge(x).node for x in inputs},
                          {get_gradient_edge(p).node for p in params})
    kept = split.kept_edges()
    if not kept:
        return sympy.Integer(0)
    got = torch.autograd.grad(outs, [*inputs, *kept], grads, retain_graph=True, allow_unused=True)[len(inputs):]
    storages: dict[int, sympy.Expr] = {}
    for g in got:
        if g is not None:
            storages.setdefault(_storage_key(g), _nbytes(g._base if g._base is not None else g))
    return sympy.Add(*storages.values())


def _to_meta(module: nn.Module) -> nn.Module:
    """A meta-device replica of ``module`` (same structure and requires_grad, no memory)."""
    import copy
    memo: dict[int, Any] = {}
    for t in list(module.parameters()) + list(module.buffers()):
        if id(t) not in memo:
            m = torch.empty_like(t, device="meta")
            memo[id(t)] = nn.Parameter(m, t.requires_grad) if isinstance(t, nn.Parameter) else m
    return copy.deepcopy(module, memo)


def _canonicalize(env, exprs: dict[str, sympy.Expr], raw_syms, leaf_float, calls, module: nn.Module,
                  name: str, shapes: list, out_shapes: list) -> LocalCost:
    """Rename the trace's free symbols to ``d0, d1, ...`` (order of appearance in the inputs) and the
    mask pair counts to ``p0, p1, ...``, so identical layers give identical expressions."""
    from dipc.errors import TraceError

    dim_symbols: list[sympy.Symbol] = []
    dim_sources: list[tuple[int, int]] = []
    rename: dict[sympy.Symbol, sympy.Symbol] = {}
    specialized: list[tuple[int, int, int]] = []
    for i, dims in enumerate(raw_syms):
        for d, s in enumerate(dims or ()):
            r = env.replace(s)
            if r.is_Integer:
                if s.free_symbols:
                    specialized.append((i, d, int(r)))
                continue
            if r.is_Symbol and r not in rename:
                sym = sympy.Symbol(f"d{len(dim_symbols)}", positive=True, integer=True)
                rename[r] = sym
                dim_symbols.append(sym)
                dim_sources.append((i, d))
    pair_symbols: list[sympy.Symbol] = []
    attention: list[AttentionCall] = []
    for call, _, _ in calls:
        c = call
        if call.kind == "mask":
            p = sympy.Symbol(f"p{len(pair_symbols)}", positive=True, integer=True)
            rename[call.pairs] = p
            pair_symbols.append(p)
        attention.append(c)

    def canon(e: sympy.Expr) -> sympy.Expr:
        return sympy.expand(env.replace(sympy.sympify(e)).xreplace(rename))

    out = {k: canon(v) for k, v in exprs.items()}
    allowed = set(dim_symbols) | set(pair_symbols)
    for k, v in out.items():
        extra = v.free_symbols - allowed
        if extra:
            raise TraceError(f"layer {name!r}: its {k} depends on {sorted(map(str, extra))}, which no input "
                             "dimension gives (a data-dependent size?). Fix: make the layer's shapes follow "
                             "its input shapes, or give SEMU a profiled cost for it.")
    attention = [AttentionCall(heads=canon(c.heads), batch=canon(c.batch), q_len=canon(c.q_len),
                               k_len=canon(c.k_len), qk_dim=canon(c.qk_dim), v_dim=canon(c.v_dim), kind=c.kind,
                               pairs=canon(c.pairs)) for c in attention]
    leaf_dims = [None if dims is None else tuple(canon(s) for s in dims) for dims in raw_syms]
    params = list(module.parameters())
    num_params = sum(p.numel() for p in params)
    param_bytes = sum(p.numel() * p.element_size() for p in params)
    grad_bytes = sum(p.numel() * p.element_size() for p in params if p.requires_grad)
    # Adam: two fp32 moments, plus an fp32 master copy when parameters are not fp32.
    optim_bytes = sum(p.numel() * (8 + (0 if p.dtype == torch.float32 else 4)) for p in params if p.requires_grad)
    guards = [canon(g.expr) for g in env.guards]
    example_dims = [int(shapes[i][d]) for i, d in dim_sources]
    out_dims = [tuple(canon(s) for s in o) for o in out_shapes]
    return LocalCost(exprs=out, dim_symbols=dim_symbols, dim_sources=dim_sources, pair_symbols=pair_symbols,
                     attention=attention, leaf_dims=leaf_dims, leaf_float=leaf_float, specialized=specialized,
                     example_dims=example_dims, out_dims=out_dims,
                     num_params=num_params, param_bytes=param_bytes, grad_bytes=grad_bytes,
                     optim_bytes=optim_bytes, guards=guards)


def measure_attention_pairs(module: nn.Module, args: tuple, kwargs: dict | None = None) -> list[int]:
    """Concrete pair counts of every masked SDPA call of ``module(*args)`` (for checking the binding):
    attended (query, key) pairs per head, summed over batch dims."""
    counts: list[int] = []

    class _Count(TorchFunctionMode):
        def __torch_function__(self, func, types, a=(), kw=None):
            kw = kw or {}
            if func in _SDPA:
                names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale")
                b = dict(zip(names, a)) | kw
                q, k, m = b["query"], b["key"], b.get("attn_mask")
                if m is not None:
                    full = torch.broadcast_to(m if m.dtype == torch.bool else m > float("-inf"),
                                              q.shape[:-2] + (q.shape[-2], k.shape[-2]))
                    heads = q.shape[-3] if q.dim() >= 3 else 1
                    counts.append(int(full.sum()) // heads)
            return func(*a, **kw)

    with torch.no_grad(), _Count():
        module(*args, **(kwargs or {}))
    return counts
