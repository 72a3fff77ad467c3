"""Plan-time shape inference: the exact specs of every message of one microbatch.

The stages are run once under ``FakeTensorMode`` with every batch dimension symbolic, which
gives each message leaf's shape as a sympy expression over the batch's input dimensions plus the
guards (facts the trace relied on, e.g. two keys sharing a length). Per microbatch, the guards are
checked and the expressions evaluated — microseconds, no tensor work. A microbatch that breaks a
guard (or a model whose shapes depend on data values) is shape-propagated concretely instead and
cached by its input shapes. Either way the plan knows every receive's shape and dtype before
anything runs: no padding, no runtime shape handshake.
"""
from __future__ import annotations

import copy
import logging
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import sympy
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from dipc.errors import BatchError
from dipc.ir import TensorSpec
from dipc.passes.partition import StageSpec
from dipc.passes.symexpr import lambdify_int
from dipc.passes.values import DTYPE_NAMES, is_grad_leaf, leaves_of, spec_of

EdgeSpecs = dict[tuple[int, int], tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]]


def batch_signature(batch: Mapping[str, Any]) -> tuple:
    return tuple((k, tuple(v.shape), str(v.dtype)) if isinstance(v, torch.Tensor) else (k, repr(v))
                 for k, v in sorted(batch.items()))


def grad_leaves(stage: StageSpec, names: Sequence[str], values: Mapping[str, Any]) -> list[Any]:
    """The leaves of ``names`` that carry gradients, in message order."""
    out = []
    for n in names:
        if n in stage.grad_values:
            out.extend(leaf for leaf in tree_flatten(values[n])[0] if is_grad_leaf(leaf))
    return out


def _meta_stage_modules(stages: Sequence[StageSpec]) -> list[torch.nn.Module]:
    """The stage graphs over a meta-device replica of the model (no parameter memory is copied)."""
    memo: dict[int, Any] = {}
    for st in stages:
        for t in list(st.module.parameters()) + list(st.module.buffers()):
            if id(t) not in memo:
                meta = torch.empty_like(t, device="meta")
                memo[id(t)] = torch.nn.Parameter(meta, t.requires_grad) if isinstance(t, torch.nn.Parameter) else meta
    return [copy.deepcopy(st.module, memo) for st in stages]


def _propagate(stages: Sequence[StageSpec], batch: Mapping[str, Any],
               modules: Sequence[torch.nn.Module] | None = None) -> dict[str, Any]:
    """Run every stage (no grad) on the given inputs; returns every cross-stage value by name."""
    values: dict[str, Any] = {}
    for i, st in enumerate(stages):
        try:
            args = [batch[k] for k in st.input_keys] + [values[v] for v, _ in st.input_values]
        except KeyError as e:
            raise BatchError(f"stage {st.id} reads batch key {e.args[0]!r}, which this batch lacks "
                             f"(keys: {sorted(batch)}). Fix: give every microbatch the keys of the "
                             "example batch.") from None
        with torch.no_grad():
            outs = (modules[i] if modules is not None else st.module)(*args)
        values.update(zip(st.output_values, outs))
    return values


def _edge_leaves(stages: Sequence[StageSpec], values: Mapping[str, Any], producers: set[int] | None = None):
    for st in stages:
        for p in st.producers:
            if producers is not None and p not in producers:
                continue
            names = st.values_from(p)
            yield (p, st.id), leaves_of(values[n] for n in names), grad_leaves(st, names, values)


class _ShapeOnlyOps(TorchDispatchMode):
    """Shape rules for ops whose meta kernels reject symbolic sizes (torch 2.13: ``masked_scatter``
    with a broadcast mask). Only shapes matter during plan-time inference, so an empty tensor of
    the right shape is an exact stand-in."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.aten.masked_scatter.default:
            target, mask = args[0], args[1]
            return target.new_empty(torch.broadcast_shapes(target.shape, mask.shape))
        return func(*args, **kwargs)


@dataclass
class _SymbolicTemplate:
    """Message specs as functions of the batch's input dimensions, valid where the guards hold."""

    dims: list[tuple[str, int]]                      # (batch key, dim) in symbol order
    check: Callable[..., bool]                       # guards, lambdified
    shapes: Callable[..., list[int]]                 # every tensor leaf's dims, flattened, lambdified
    layout: list[tuple[tuple[int, int], list[tuple[str, str, int]], list[tuple[str, str, int]]]]
    signature_keys: tuple                            # (key, ndim, dtype) the template was built for

    def specs(self, batch: Mapping[str, Any]) -> EdgeSpecs | None:
        vals = [int(batch[k].shape[d]) for k, d in self.dims]
        if not self.check(*vals):
            return None
        flat = self.shapes(*vals)
        pos = 0

        def build(items):
            nonlocal pos
            out = []
            for kind, dtype, ndim in items:
                if kind == "tensor":
                    out.append(TensorSpec(kind="tensor", dtype=dtype, shape=tuple(int(x) for x in flat[pos:pos + ndim])))
                    pos += ndim
                else:
                    out.append(TensorSpec(kind=kind))
            return tuple(out)

        return {edge: (build(act), build(grad)) for edge, act, grad in self.layout}


def _key_layout(batch: Mapping[str, Any]) -> tuple:
    """What a template is specialised to: tensor ranks and dtypes, and non-tensor values themselves
    (the trace bakes them in as constants)."""
    return tuple((k, v.dim(), str(v.dtype)) if isinstance(v, torch.Tensor) else (k, repr(v))
                 for k, v in sorted(batch.items()))


class ShapeInference:
    """Message specs per microbatch: symbolic template first, meta-device propagation as fallback."""

    MAX_TEMPLATES = 4
    TEMPLATE_AFTER_MISSES = 16
    MAX_CACHED = 4096

    def __init__(self, stages: list[StageSpec], symbolic: bool = True,
                 edge_stages: Sequence[StageSpec] | None = None):
        """``stages`` are propagated; the edges reported are those out of them into ``edge_stages``
        (default: the same stages). A subset (one modality's segment, for its sub-microbatches)
        needs only that segment's batch keys."""
        self.stages = stages
        self._edge_stages = edge_stages
        self._producers = None if edge_stages is None else {s.id for s in stages}
        self.symbolic = symbolic
        self._templates: dict[tuple, list[_SymbolicTemplate]] = {}
        self._misses: dict[tuple, int] = {}
        self._cache: OrderedDict[tuple, EdgeSpecs] = OrderedDict()   # LRU of concrete results
        self._meta_stages: list[torch.nn.Module] | None = None
        self.fallbacks = 0
        self.template_error: str | None = None   # why the symbolic template could not be built

    def edge_specs(self, batch: Mapping[str, Any]) -> EdgeSpecs:
        if self.symbolic:
            layout = _key_layout(batch)
            templates = self._templates.setdefault(layout, [])
            for template in templates:
                specs = template.specs(batch)
                if specs is not None:
                    return specs
            key = batch_signature(batch)
            if key in self._cache:   # propagated before: free, and no reason to trace a template
                self._cache.move_to_end(key)
                return self._cache[key]
            # No template's guards hold. Tracing one costs about a second, a concrete propagation
            # tens of milliseconds: trace once concrete propagations pile up for this layout. Only
            # new batch signatures count: a planner asks for the same microbatches' specs once per
            # candidate it lowers, and counting those (audio LLM: 4 microbatches x 3 candidates per
            # plan) traced a template every other plan, 2.3-2.6 s each.
            misses = self._misses.get(layout, 0) + 1
            self._misses[layout] = misses
            if (len(templates) < self.MAX_TEMPLATES and misses % self.TEMPLATE_AFTER_MISSES == 0
                    and self.template_error is None):
                template = self._build_template(batch)
                if template is not None:
                    templates.append(template)
                    specs = template.specs(batch)
                    if specs is not None:
                        return specs
        key = batch_signature(batch)
        if key in self._cache:
            self._cache.move_to_end(key)
        else:
            self.fallbacks += 1
            self._cache[key] = self._infer_concrete(batch)
            if len(self._cache) > self.MAX_CACHED:
                self._cache.popitem(last=False)
        return self._cache[key]

    def _infer_concrete(self, batch: Mapping[str, Any]) -> EdgeSpecs:
        """Meta-device propagation (fast, no data); real execution if a stage needs data values."""
        try:
            if self._meta_stages is None:
                self._meta_stages = _meta_stage_modules(self.stages)
            meta = {k: v.to("meta") if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
            values = _propagate(self.stages, meta, modules=self._meta_stages)
        except BatchError:
            raise
        except Exception:
            values = _propagate(self.stages, batch)   # data-dependent shapes: only real values can tell
        return {edge: (tuple(spec_of(x) for x in act), tuple(spec_of(x) for x in grad))
                for edge, act, grad in _edge_leaves(self._edge_stages or self.stages, values, self._producers)}

    def _build_template(self, batch: Mapping[str, Any]) -> _SymbolicTemplate | None:
        """Trace once with symbolic batch dimensions; None if the model's shapes are data-dependent."""
        from torch._subclasses.fake_tensor import FakeTensorMode
        from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv, StatelessSymbolicContext

        env = ShapeEnv(specialize_zero_one=False, duck_shape=False)
        fake_log = logging.getLogger("torch._subclasses.fake_tensor")
        level = fake_log.level
        fake_log.setLevel(logging.CRITICAL)  # a failed symbolic trace is expected, not news
        dims: list[tuple[str, int]] = []
        symbols: list[sympy.Symbol] = []
        try:
            with FakeTensorMode(shape_env=env, allow_non_fake_inputs=True) as mode:
                fake = {}
                for k, v in batch.items():
                    if not isinstance(v, torch.Tensor):
                        fake[k] = v
                        continue
                    ctx = StatelessSymbolicContext(dynamic_sizes=[DimDynamic.DYNAMIC] * v.dim())
                    fake[k] = mode.from_tensor(v, symbolic_context=ctx)
                    for d in range(v.dim()):
                        dims.append((k, d))
                        symbols.append(fake[k].shape[d].node.expr)
                with _ShapeOnlyOps():
                    values = _propagate(self.stages, fake)
                layout, exprs = [], []
                for edge, act, grad in _edge_leaves(self._edge_stages or self.stages, values, self._producers):
                    items = []
                    for group in (act, grad):
                        desc = []
                        for leaf in group:
                            if isinstance(leaf, torch.Tensor):
                                desc.append(("tensor", DTYPE_NAMES[leaf.dtype], leaf.dim()))
                                exprs.extend(env.replace(sympy.sympify(s.node.expr if isinstance(s, torch.SymInt) else s))
                                             for s in leaf.shape)
                            else:
                                desc.append((spec_of(leaf if not isinstance(leaf, torch.SymInt) else 0).kind, "", 0))
                        items.append(desc)
                    layout.append((edge, items[0], items[1]))
                if any(e.free_symbols - set(symbols) for e in exprs) or env.deferred_runtime_asserts:
                    self.template_error = "shapes depend on data values (unbacked symbols)"
                    return None  # data-dependent (unbacked) sizes: only concrete propagation can tell
                conds = [sympy.Eq(env.replace(s), s) for s in symbols if env.replace(s) != s]
                conds += [g.expr for g in env.guards]
                conds = [c for c in conds if c is not sympy.true]
                check = lambdify_int(symbols, sympy.And(*conds) if conds else sympy.true)
                shapes = lambdify_int(symbols, exprs)
        except BatchError:
            raise
        except Exception as e:  # anything the symbolic trace cannot handle falls back to concrete shapes
            self.template_error = f"{type(e).__name__}: {e}"
            return None
        finally:
            fake_log.setLevel(level)
        return _SymbolicTemplate(dims=dims, check=lambda *v: bool(check(*v)), shapes=lambda *v: list(shapes(*v)),
                                 layout=layout, signature_keys=_key_layout(batch))
