"""Front end: find the layers of a model and capture the glue between them as one FX graph.

Layers come from the module tree (numbered children of a ``ModuleList`` or of a ``Sequential`` of
repeated blocks, plus
parameter-holding modules that contain no such list, e.g. an embedding, a norm, a head), and are
kept as opaque ``call_module`` leaves. So a layer may contain anything (data-dependent attention,
custom kernels); only the glue between layers must be traceable. Users can name the layers
themselves (``layers=``) or add leaves for glue that cannot be traced (``leaf_modules=``).
"""
from __future__ import annotations

import contextlib
import functools
import inspect
import keyword
import operator
import sys
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping

import torch
from torch import fx, nn
from torch.utils._pytree import tree_flatten, tree_unflatten

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


_UNKNOWN = object()
# Tensor metadata that is the same for every microbatch (the plan keys on rank and dtype too):
# glue may branch on it, so it is answered from the example value instead of being traced.
STATIC_TENSOR_ATTRS = frozenset({"ndim", "dtype", "is_sparse", "is_quantized", "is_nested"})
STATIC_TENSOR_METHODS = frozenset({"dim", "is_floating_point", "is_complex"})


@contextlib.contextmanager
def _fx_patches_lifted():
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
            v = getattr(self.tracer, "concrete", {}).get(self.node, _UNKNOWN)
            if isinstance(v, torch.Tensor):
                attr = getattr(v, k)
                return (lambda *a, **kw: attr(*a, **kw)) if k in STATIC_TENSOR_METHODS else attr
        return super().__getattr__(k)


class _LayerTracer(fx.Tracer):
    """An FX tracer that keeps layers opaque and remembers which module it is inside (for errors)."""

    def __init__(self, layer_paths: Iterable[str], layer_frames: set | None = None,
                 example_batch: Mapping[str, Any] | None = None):
        super().__init__()
        self.layer_paths = set(layer_paths)
        self.module_path_stack: list[str] = []
        self.layer_frames = layer_frames if layer_frames is not None else set()  # code objects around layer calls
        self.example_batch = example_batch
        self.concrete: dict[fx.Node, Any] = {}   # example value of every node (when an example is given)
        self.model: nn.Module | None = None      # set for guard fallback (see to_bool)
        self.failed_module: str | None = None
        self.layer_paths_only: set[str] = set()

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
            return self.example_batch[node.target] if node.target in self.example_batch else _UNKNOWN
        if node.op == "output":
            return _UNKNOWN
        vals = [_UNKNOWN]

        def get(n: fx.Node) -> Any:
            v = self.concrete.get(n, _UNKNOWN)
            if v is _UNKNOWN:
                vals[0] = None
            return v
        args = fx.node.map_arg(node.args, get)
        kwargs = fx.node.map_arg(node.kwargs, get)
        if vals[0] is None:
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
        if value is _UNKNOWN or self.model is None:
            return super().to_bool(obj)
        frames, f = [], sys._getframe(1)
        while f is not None:
            frames.append(f)
            f = f.f_back
        frames.reverse()
        if not _size_only(obj.node, self.concrete) or \
                _find_opaque_site(frames, self.model, self.layer_paths_only, self.layer_paths, self.layer_frames):
            return super().to_bool(obj)
        taken = bool(value)
        where = next((f"{fr.f_code.co_filename}:{fr.f_lineno}" for fr in reversed(frames)
                      if not _is_library_frame(fr)), "?")
        self.create_proxy("call_function", branch_guard, (obj, taken, where), {})
        return taken

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return module_qualified_name in self.layer_paths

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


class _OpaqueCall:
    """A glue helper recorded as one opaque ``call_function`` node: it runs eagerly (per
    microbatch) instead of being traced. Only the Proxy leaves of its arguments become graph
    inputs; every other argument (configs, flags, ``None``) is kept in the call's template."""

    def __init__(self, fn: Any, label: str, spec: Any, consts: list[Any], slots: list[int]):
        self.fn, self.label, self.spec, self.consts, self.slots = fn, label, spec, consts, slots
        self.__name__ = self.__qualname__ = "opaque_" + "".join(c if c.isalnum() else "_" for c in label)
        self.__module__ = __name__

    def __call__(self, *proxied: Any) -> Any:
        leaves = list(self.consts)
        for i, v in zip(self.slots, proxied):
            leaves[i] = v
        args, kwargs = tree_unflatten(leaves, self.spec)
        return self.fn(*args, **kwargs)

    def __repr__(self) -> str:
        return f"opaque({self.label})"

    def __deepcopy__(self, memo: dict) -> "_OpaqueCall":
        return self   # bound to the user's modules, like the layers themselves


def _opaque_wrapper(fn: Any, label: str, tracer: fx.Tracer) -> Any:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        leaves, spec = tree_flatten((args, kwargs))
        slots = [i for i, v in enumerate(leaves) if isinstance(v, fx.Proxy)]
        if not slots:
            return fn(*args, **kwargs)
        consts = [None if i in slots else v for i, v in enumerate(leaves)]
        call = _OpaqueCall(fn, label, spec, consts, slots)
        return tracer.create_proxy("call_function", call, tuple(leaves[i] for i in slots), {})
    wrapper.__dipc_opaque__ = True  # type: ignore[attr-defined]
    return wrapper


@dataclass(frozen=True)
class OpaqueSite:
    """Glue code to run opaquely: method ``name`` of the module at ``module_path``, or the global
    function ``name`` of the Python module ``globals_of`` (as seen by its callers)."""

    name: str
    module_path: str | None = None
    globals_of: str | None = None

    def __str__(self) -> str:
        return f"{self.module_path or '<root>'}.{self.name}()" if self.globals_of is None \
            else f"{self.globals_of}.{self.name}()"


@contextlib.contextmanager
def _opaque_patches(model: nn.Module, sites: Iterable[OpaqueSite], tracer: fx.Tracer):
    undo: list[Callable[[], None]] = []
    try:
        for site in sites:
            if site.globals_of is not None:
                g = sys.modules[site.globals_of].__dict__
                orig = g[site.name]
                g[site.name] = _opaque_wrapper(orig, str(site), tracer)
                undo.append(lambda g=g, n=site.name, o=orig: g.__setitem__(n, o))
            else:
                mod = model.get_submodule(site.module_path or "")
                bound = getattr(mod, site.name)
                had = site.name in mod.__dict__
                old = mod.__dict__.get(site.name)
                object.__setattr__(mod, site.name, _opaque_wrapper(bound, str(site), tracer))

                def restore(mod=mod, n=site.name, had=had, old=old) -> None:
                    if had:
                        object.__setattr__(mod, n, old)
                    else:
                        del mod.__dict__[n]
                undo.append(restore)
        yield
    finally:
        for f in reversed(undo):
            f()


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


_LIST = _ProxyAwareMeta("list", (), {"_builtin": list})
_TUPLE = _ProxyAwareMeta("tuple", (), {"_builtin": tuple})


def _proxy_len(obj: Any) -> Any:
    if isinstance(obj, fx.Proxy):
        return obj.tracer.create_proxy("call_function", len, (obj,), {})
    return len(obj)


_PROXY_BUILTINS = {"list": _LIST, "tuple": _TUPLE, "len": _proxy_len}


@contextlib.contextmanager
def _proxy_aware_builtins(model: nn.Module):
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


_MISSING = object()


@contextlib.contextmanager
def _module_state_kept(model: nn.Module):
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


def _is_library_frame(frame: Any) -> bool:
    """Frames of torch itself or of dipc: never a candidate for an opaque call."""
    mod = frame.f_globals.get("__name__", "")
    return mod == "torch" or mod.startswith(("torch.", "dipc.")) or mod == "functools" or mod == "contextlib"


def _code_of(obj: Any) -> Any:
    try:
        return getattr(inspect.unwrap(obj), "__code__", None)
    except Exception:
        return None


def _find_opaque_site(exc: BaseException | list, model: nn.Module, layer_paths: set[str],
                      leaves: set[str], layer_frames: set) -> tuple[str, Any] | None:
    """From a tracing failure, the innermost enclosing piece of glue that can run opaquely:
    ('module', path) for a forward of a module without layers, ('site', OpaqueSite) for a helper
    method of a model module or a global helper function. None if there is none."""
    frames = exc if isinstance(exc, list) else [f for f, _ in traceback.walk_tb(exc.__traceback__)]
    paths = {id(m): p for p, m in model.named_modules()}
    for k in range(len(frames) - 1, -1, -1):
        f = frames[k]
        if _is_library_frame(f) or f.f_code.co_name.startswith("<"):
            continue
        code, name = f.f_code, f.f_code.co_name
        if code in layer_frames:
            return None   # this code calls layers: it cannot run as one opaque call
        this = f.f_locals.get("self")
        if isinstance(this, nn.Module) and id(this) in paths:
            path = paths[id(this)]
            attr = next((a for a in dir(type(this)) if not a.startswith("__")
                         and _code_of(getattr(type(this), a, None)) is code), None)
            if attr is None:
                continue
            if attr == "forward":
                # A module's own forward is not made opaque automatically: that would move its
                # parameters out of the layers; the error names it and the leaf_modules= fix.
                return None
            if getattr(getattr(this, attr), "__dipc_opaque__", False):
                return None
            return ("site", OpaqueSite(name=attr, module_path=path))
        # a plain function: patch it where its callers look it up (their module globals)
        for outer in frames[k - 1::-1] if k else []:
            g = outer.f_globals
            hit = next((n for n, v in g.items() if callable(v) and _code_of(v) is code), None)
            if hit is not None:
                if getattr(g[hit], "__dipc_opaque__", False):
                    return None
                return ("site", OpaqueSite(name=hit, globals_of=g["__name__"]))
    return None


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


MAX_OPAQUE_RETRIES = 32


def trace_with_layer_leaves(model: nn.Module, batch_keys: list[str], layer_paths: list[str],
                            leaf_modules: Iterable[str] = (),
                            example_batch: Mapping[str, Any] | None = None) -> fx.GraphModule:
    """Trace the glue with layers as leaves. Glue that fx cannot trace (data-dependent control
    flow, ``bool``/``int``/iteration of a traced value, …) is found from the failure's traceback
    and made opaque — the innermost helper method or function around it becomes one
    ``call_function`` node, or a module without layers becomes a leaf — and the trace is retried.
    Opaque glue runs eagerly per microbatch, so it stays correct for every batch."""
    _concrete_args_for(model, batch_keys)   # argument checks only
    root = _root_for(model, batch_keys)
    leaves = set(layer_paths) | set(leaf_modules)
    sites: list[OpaqueSite] = []
    made_opaque: list[str] = []
    layer_frames: set = set()
    while True:
        tracer = _LayerTracer(leaves, layer_frames, example_batch)
        tracer.model, tracer.layer_paths_only = model, set(layer_paths)
        try:
            with _module_state_kept(model), _proxy_aware_builtins(model), _opaque_patches(model, sites, tracer):
                graph = tracer.trace(root)
            break
        except Exception as e:  # fx raises TraceError/TypeError/etc. from inside user code
            found = _find_opaque_site(e, model, set(layer_paths), leaves, layer_frames) \
                if len(made_opaque) < MAX_OPAQUE_RETRIES else None
            if found is not None:
                kind, what = found
                if kind == "module":
                    leaves.add(what)
                    made_opaque.append(f"module {what}")
                else:
                    sites.append(what)
                    made_opaque.append(str(what))
                continue
            culprit = tracer.module_path_stack[-1] if tracer.module_path_stack else (tracer.failed_module or "")
            where = f"module {culprit!r} ({type(model.get_submodule(culprit)).__name__})" if culprit \
                else f"the top-level forward of {type(model).__name__}"
            fix = (f"mark it a leaf so it runs opaquely inside one stage: dipc.compile(..., leaf_modules=[{culprit!r}])"
                   if culprit else "move the data-dependent code into a submodule and pass that module's path in "
                   "leaf_modules=[...], or name the layers explicitly with layers=[...]")
            tried = f" (already made opaque: {', '.join(made_opaque)})" if made_opaque else ""
            raise TraceError(f"could not trace {where}: {type(e).__name__}: {e}{tried}. "
                             f"This usually means data-dependent Python control flow. Fix: {fix}.") from e
    called = {n.target for n in graph.nodes if n.op == "call_module"}
    for site in sites:   # an opaque helper that hid layers (it failed before calling them)
        hidden = [p for p in layer_paths if p not in called and site.module_path is not None
                  and (site.module_path == "" or p.startswith(site.module_path + "."))]
        if hidden:
            raise TraceError(
                f"{type(model).__name__}: the glue helper {site} cannot be traced, and running it opaquely "
                f"would hide layers {hidden[:3]} inside it. Fix: mark a module around the untraceable code as "
                "a leaf (leaf_modules=[...]) or name coarser layers with layers=[...].")
    gm = fx.GraphModule(model, graph, class_name=f"{type(model).__name__}Glue")
    gm.meta["dipc.opaque"] = made_opaque
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
    keys = list(example_batch)
    layer_paths = list(layers) if layers is not None else discover_layers(model, leaf_modules)
    known = dict(model.named_modules())
    for path in layer_paths:
        if path not in known:
            raise TraceError(f"layer {path!r} is not a module of {type(model).__name__}. "
                             "Fix: use paths from model.named_modules().")
    gm = trace_with_layer_leaves(model, keys, layer_paths, leaf_modules, example_batch)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    input_keys = [n.target for n in placeholders if n.target in example_batch]
    # Run once on the example batch: gives types/shapes of every value, and the loss output.
    recorder = _ValueRecorder(gm)
    args = [example_batch[n.target] if n.target in example_batch else None for n in placeholders]
    out = recorder.run(*args)
    _select_loss_output(gm, out)
    sink_to_first_use(gm)
    live = {n.name for n in gm.graph.nodes}
    values = {k: v for k, v in recorder.values.items() if k in live}
    order = [n.target for n in gm.graph.nodes if n.op == "call_module"]
    used_layers = [p for p in dict.fromkeys(order) if p in set(layer_paths)]
    if not used_layers:
        raise TraceError(f"{type(model).__name__} has no layers the tracer could find. "
                         "Fix: name them with layers=[...] (module paths).")
    return CapturedModel(graph_module=gm, layers=used_layers, input_keys=input_keys, example_values=values)
