"""The fx tracer behind capture: layers stay ``call_module`` leaves, only the glue is traced.

So a layer may contain anything (data-dependent attention, custom kernels); only the glue between
layers must be traceable. To cope with HF-style glue, the tracer answers rank/dtype queries from
the example batch, guards size-only branches, records ``list``/``tuple``/``len`` of proxies, and
makes untraceable helpers opaque (see ``dipc.passes.opaque``).
"""
from __future__ import annotations

import contextlib
import inspect
import keyword
import sys
import traceback
from typing import Any, Iterable, Iterator, Mapping

import torch
from torch import fx, nn

from dipc.errors import BatchError, TraceError
from dipc.passes.opaque import OpaqueSite, _find_opaque_site, _is_library_frame, _opaque_patches

_UNKNOWN = object()   # no example value for a node
_MISSING = object()   # an attribute/global that did not exist before patching
# Tensor metadata that is the same for every microbatch (the plan keys on rank and dtype too):
# glue may branch on it, so it is answered from the example value instead of being traced.
STATIC_TENSOR_ATTRS = frozenset({"ndim", "dtype", "is_sparse", "is_quantized", "is_nested"})
STATIC_TENSOR_METHODS = frozenset({"dim", "is_floating_point", "is_complex"})
MAX_OPAQUE_RETRIES = 32


@contextlib.contextmanager
def _fx_patches_lifted() -> Iterator[None]:
    """Run real code in the middle of a trace: ``nn.Module.__call__``/``__getattr__`` as unpatched."""
    from torch.fx import _symbolic_trace as st
    cur_get, cur_call = nn.Module.__getattr__, nn.Module.__call__
    nn.Module.__getattr__, nn.Module.__call__ = st._orig_module_getattr, st._orig_module_call
    try:
        yield
    finally:
        nn.Module.__getattr__, nn.Module.__call__ = cur_get, cur_call


@torch.fx.node.has_side_effect
def branch_guard(value: Any, taken: bool, where: str) -> None:
    """Checks at run time that glue takes the branch it took when the model was captured."""
    if bool(value) != taken:
        raise TraceError(
            f"the model's glue at {where} branches on a traced value, and this microbatch takes the other "
            f"branch than the example batch did ({not taken} vs {taken}), so the captured graph does not "
            "apply. Fix: compile with an example batch like this one, or mark the module around that "
            "code as a leaf (leaf_modules=[...]).")


_SIZE_READS = {("call_function", getattr, "shape"), ("call_method", "size", None), ("call_method", "numel", None),
               ("call_method", "dim", None), ("call_function", len, None)}


def _size_only(node: fx.Node, concrete: Mapping[fx.Node, Any]) -> bool:
    """Whether ``node``'s value depends on tensors only through their sizes (not their data):
    branching on it specialises the graph on shapes, which a guard can check cheaply."""
    seen: set[fx.Node] = set()
    stack = [node]
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        if n.op == "placeholder" or n.op == "get_attr":
            return False     # reached a value (tensor) without going through a size read
        for i in n.all_input_nodes:
            if isinstance(concrete.get(i), torch.Tensor):
                key = (n.op, n.target, n.args[1] if n.target is getattr else None)
                if key not in _SIZE_READS:
                    return False
            else:
                stack.append(i)
    return True


class _MetaProxy(fx.Proxy):
    """A Proxy that answers static tensor metadata (rank, dtype) from the example value, so HF
    glue like ``if position_ids.ndim == 3:`` traces; everything else is recorded as usual."""

    def __getattr__(self, k: str) -> Any:
        if k in STATIC_TENSOR_ATTRS or k in STATIC_TENSOR_METHODS:
            v = self.tracer.concrete.get(self.node, _UNKNOWN)
            if isinstance(v, torch.Tensor):
                attr = getattr(v, k)
                return (lambda *a, **kw: attr(*a, **kw)) if k in STATIC_TENSOR_METHODS else attr
        return super().__getattr__(k)


class _LayerTracer(fx.Tracer):
    """An FX tracer that keeps ``leaves`` opaque, shadows every node with its example value, and
    remembers which module it is inside (for errors)."""

    def __init__(self, model: nn.Module, leaves: Iterable[str], layer_frames: set,
                 example_batch: Mapping[str, Any] | None):
        super().__init__()
        self.model = model
        self.leaves = set(leaves)
        self.layer_frames = layer_frames          # code objects around layer calls (kept across retries)
        self.example_batch = example_batch
        self.concrete: dict[fx.Node, Any] = {}   # example value of every node (when an example is given)
        self.module_path_stack: list[str] = []
        self.failed_module: str | None = None

    # -- concrete shadow values: what each node computes on the example batch --------------------
    def create_node(self, kind, target, args, kwargs, name=None, type_expr=None):
        node = super().create_node(kind, target, args, kwargs, name, type_expr)
        if self.example_batch is not None:
            try:
                self.concrete[node] = self._concrete_value(node)
            except Exception:
                self.concrete[node] = _UNKNOWN
        return node

    def _concrete_value(self, node: fx.Node) -> Any:
        if node.op == "placeholder":
            return self.example_batch.get(node.target, _UNKNOWN)
        if node.op == "output":
            return _UNKNOWN
        missing = False

        def get(n: fx.Node) -> Any:
            nonlocal missing
            v = self.concrete.get(n, _UNKNOWN)
            missing = missing or v is _UNKNOWN
            return v
        args = fx.node.map_arg(node.args, get)
        kwargs = fx.node.map_arg(node.kwargs, get)
        if missing:
            return _UNKNOWN
        with _fx_patches_lifted(), torch.no_grad():
            if node.op == "get_attr":
                obj: Any = self.root
                for part in node.target.split("."):
                    obj = getattr(obj, part)
                return obj
            if node.op == "call_function":
                return node.target(*args, **kwargs)
            if node.op == "call_method":
                return getattr(args[0], node.target)(*args[1:], **kwargs)
            if node.op == "call_module":   # forward only: hooks already ran on the proxies
                return self.root.get_submodule(node.target).forward(*args, **kwargs)
        return _UNKNOWN

    def proxy(self, node: fx.Node) -> fx.Proxy:
        return _MetaProxy(node, self)

    def to_bool(self, obj: fx.Proxy) -> bool:
        """Glue branches on a traced value. If the code around it can run opaquely, fail (the
        retry makes it an opaque call). Otherwise take the example's branch and record a guard
        that checks, for every microbatch, that the branch would be the same (else a clear error)."""
        value = self.concrete.get(obj.node, _UNKNOWN)
        if value is _UNKNOWN:
            return super().to_bool(obj)
        frames, f = [], sys._getframe(1)
        while f is not None:
            frames.append(f)
            f = f.f_back
        frames.reverse()
        if not _size_only(obj.node, self.concrete) or _find_opaque_site(frames, self.model, self.layer_frames):
            return super().to_bool(obj)
        taken = bool(value)
        where = next((f"{fr.f_code.co_filename}:{fr.f_lineno}" for fr in reversed(frames)
                      if not _is_library_frame(fr)), "?")
        self.create_proxy("call_function", branch_guard, (obj, taken, where), {})
        return taken

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return module_qualified_name in self.leaves

    def call_module(self, m, forward, args, kwargs):
        path = self.path_of_module(m)
        self.module_path_stack.append(path)
        try:
            out = super().call_module(m, forward, args, kwargs)
            if self.is_leaf_module(m, path):
                frame = sys._getframe(1)
                while frame is not None:
                    self.layer_frames.add(frame.f_code)
                    frame = frame.f_back
                self._replay_forward_hooks(m, args, kwargs, out)
            return out
        except Exception:
            if self.failed_module is None:
                self.failed_module = path     # innermost module the failure came from (for errors)
            raise
        finally:
            self.module_path_stack.pop()

    @staticmethod
    def _replay_forward_hooks(m: nn.Module, args: Any, kwargs: Any, out: Any) -> None:
        """A leaf's forward hooks run on the proxies for their side effects (HF's output capturing
        records layer outputs with hooks). Their return values are not recorded: at run time the
        leaf is called through ``nn.Module.__call__``, which applies them itself."""
        for hook_id, hook in list(m._forward_hooks.items()):
            if hook_id in m._forward_hooks_with_kwargs:
                hook(m, args, kwargs, out)
            else:
                hook(m, args, out)


class _ProxyAwareMeta(type):
    """Metaclass of the stand-ins for ``list``/``tuple`` in glue modules' globals while tracing:
    ``list(proxy)`` records one node (its length is then known only when it runs, so e.g.
    ``torch.cat(list(features))`` stays correct for any number of images), while ``isinstance``
    and plain calls behave exactly like the builtin."""

    def __instancecheck__(cls, obj: Any) -> bool:
        return isinstance(obj, cls._builtin)

    def __subclasscheck__(cls, sub: type) -> bool:
        return issubclass(sub, cls._builtin)

    def __getitem__(cls, item: Any) -> Any:
        return cls._builtin[item]

    def __call__(cls, *args: Any, **kwargs: Any) -> Any:
        if args and isinstance(args[0], fx.Proxy):
            return args[0].tracer.create_proxy("call_function", cls._builtin, args, kwargs)
        return cls._builtin(*args, **kwargs)


def _proxy_len(obj: Any) -> Any:
    if isinstance(obj, fx.Proxy):
        return obj.tracer.create_proxy("call_function", len, (obj,), {})
    return len(obj)


_PROXY_BUILTINS = {"list": _ProxyAwareMeta("list", (), {"_builtin": list}),
                   "tuple": _ProxyAwareMeta("tuple", (), {"_builtin": tuple}),
                   "len": _proxy_len}


@contextlib.contextmanager
def _proxy_aware_builtins(model: nn.Module) -> Iterator[None]:
    """Shadow ``list``/``tuple``/``len`` (see ``_ProxyAwareMeta``) in the globals of the Python
    modules that define the model's module classes, for the duration of a trace."""
    names = set()
    for m in model.modules():
        for cls in type(m).__mro__:
            mod = getattr(cls, "__module__", "") or ""
            if mod in sys.modules and not mod.startswith(("torch", "builtins", "dipc")):
                names.add(mod)
    patched: list[tuple[dict, str, Any]] = []
    try:
        for name in names:
            g = sys.modules[name].__dict__
            for k, v in _PROXY_BUILTINS.items():
                patched.append((g, k, g.get(k, _MISSING)))
                g[k] = v
        yield
    finally:
        for g, k, old in reversed(patched):
            if old is _MISSING:
                g.pop(k, None)
            else:
                g[k] = old


@contextlib.contextmanager
def _module_state_kept(model: nn.Module) -> Iterator[None]:
    """Glue may store traced values on modules (Qwen2-VL keeps ``self.rope_deltas``): put every
    module's plain attributes back as they were after tracing."""
    saved = [(m, {k: v for k, v in m.__dict__.items() if not k.startswith("_")}) for m in model.modules()]
    try:
        yield
    finally:
        for m, attrs in saved:
            for k in [k for k in m.__dict__ if not k.startswith("_") and k not in attrs]:
                del m.__dict__[k]
            for k, v in attrs.items():
                if m.__dict__.get(k, _MISSING) is not v:
                    m.__dict__[k] = v


def _check_batch_args(model: nn.Module, batch_keys: Iterable[str]) -> None:
    """The batch must supply every required argument of ``forward`` and nothing it cannot take;
    arguments not in the batch keep their defaults (HF-style optional args)."""
    sig = inspect.signature(model.forward)
    keys = set(batch_keys)
    for name, p in sig.parameters.items():
        if name not in keys and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD) \
                and p.default is inspect.Parameter.empty:
            raise BatchError(
                f"{type(model).__name__}.forward requires argument {name!r} but the example batch has no "
                f"key {name!r} (keys: {sorted(keys)}). Fix: add {name!r} to the example batch.")
    unknown = keys - set(sig.parameters)
    if unknown and not any(p.kind == p.VAR_KEYWORD for p in sig.parameters.values()):
        raise BatchError(
            f"batch key(s) {sorted(unknown)} are not arguments of {type(model).__name__}.forward "
            f"(arguments: {list(sig.parameters)}). Fix: rename or drop those keys.")


def _root_for(model: nn.Module, keys: list[str]) -> nn.Module:
    """A module sharing ``model``'s state whose ``forward`` takes exactly the batch keys and calls
    ``model.forward(**batch)``: arguments outside the batch keep their Python defaults, and
    decorated or ``**kwargs`` HF-style signatures need no ``concrete_args``."""
    bad = [k for k in keys if not k.isidentifier() or keyword.iskeyword(k)]
    if bad:
        raise BatchError(f"batch key {bad[0]!r} is not a Python identifier. Fix: rename it.")
    src = (f"def forward(self, {', '.join(keys)}):\n"
           f"    return self.__dict__['_dipc_forward']({', '.join(f'{k}={k}' for k in keys)})\n")
    ns: dict[str, Any] = {}
    exec(compile(src, f"<dipc root of {type(model).__name__}>", "exec"), ns)
    cls = type(f"{type(model).__name__}Root", (nn.Module,), {"forward": ns["forward"]})
    root = cls()
    for attr in ("_modules", "_parameters", "_buffers"):
        root.__dict__[attr] = model.__dict__[attr]
    root.__dict__["_dipc_forward"] = model.forward
    root.training = model.training
    return root


def _trace_error(model: nn.Module, tracer: _LayerTracer, e: Exception, sites: list[OpaqueSite]) -> TraceError:
    """The error for glue that stays untraceable: where it failed and how to fix it."""
    culprit = tracer.module_path_stack[-1] if tracer.module_path_stack else (tracer.failed_module or "")
    where = f"module {culprit!r} ({type(model.get_submodule(culprit)).__name__})" if culprit \
        else f"the top-level forward of {type(model).__name__}"
    fix = (f"mark it a leaf so it runs opaquely inside one stage: dipc.compile(..., leaf_modules=[{culprit!r}])"
           if culprit else "move the data-dependent code into a submodule and pass that module's path in "
           "leaf_modules=[...], or name the layers explicitly with layers=[...]")
    tried = f" (already made opaque: {', '.join(map(str, sites))})" if sites else ""
    return TraceError(f"could not trace {where}: {type(e).__name__}: {e}{tried}. "
                      f"This usually means data-dependent Python control flow. Fix: {fix}.")


def trace_with_layer_leaves(model: nn.Module, batch_keys: list[str], layer_paths: list[str],
                            leaf_modules: Iterable[str] = (),
                            example_batch: Mapping[str, Any] | None = None) -> fx.GraphModule:
    """Trace the glue with layers as leaves. Glue that fx cannot trace (data-dependent control
    flow, ``bool``/``int``/iteration of a traced value, …) is found from the failure's traceback
    and made opaque — the innermost helper method or function around it becomes one
    ``call_function`` node — and the trace is retried. Opaque glue runs eagerly per microbatch,
    so it stays correct for every batch."""
    _check_batch_args(model, batch_keys)
    root = _root_for(model, batch_keys)
    leaves = set(layer_paths) | set(leaf_modules)
    sites: list[OpaqueSite] = []
    layer_frames: set = set()
    while True:
        tracer = _LayerTracer(model, leaves, layer_frames, example_batch)
        try:
            with _module_state_kept(model), _proxy_aware_builtins(model), _opaque_patches(model, sites, tracer):
                graph = tracer.trace(root)
            break
        except Exception as e:  # fx raises TraceError/TypeError/etc. from inside user code
            frames = [f for f, _ in traceback.walk_tb(e.__traceback__)]
            site = _find_opaque_site(frames, model, layer_frames) if len(sites) < MAX_OPAQUE_RETRIES else None
            if site is None:
                raise _trace_error(model, tracer, e, sites) from e
            sites.append(site)
    called = {n.target for n in graph.nodes if n.op == "call_module"}
    for site in sites:   # an opaque helper that hid layers (it failed before calling them)
        hidden = [p for p in layer_paths if p not in called and site.module_path is not None
                  and (site.module_path == "" or p.startswith(site.module_path + "."))]
        if hidden:
            raise TraceError(
                f"{type(model).__name__}: the glue helper {site} cannot be traced, and running it opaquely "
                f"would hide layers {hidden[:3]} inside it. Fix: mark a module around the untraceable code as "
                "a leaf (leaf_modules=[...]) or name coarser layers with layers=[...].")
    # root, not model: tensor constants the tracer made (e.g. torch.ones(4) in the glue) live on root
    gm = fx.GraphModule(root, graph, class_name=f"{type(model).__name__}Glue")
    gm.meta["dipc.opaque"] = [str(s) for s in sites]
    return gm
