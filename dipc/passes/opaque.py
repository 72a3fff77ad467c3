"""Opaque glue helpers: glue that fx cannot trace runs eagerly, as one graph node.

When a trace fails (or branches on data), the innermost helper method of a model module or
global helper function around the failure is patched, for the next trace, to record itself as
one ``call_function`` node instead of being traced. It then runs per microbatch, so it stays
correct for every batch.
"""
from __future__ import annotations

import contextlib
import functools
import inspect
import sys
from dataclasses import dataclass
from types import FrameType
from typing import Any, Callable, Iterator, Iterable

from torch import fx, nn
from torch.utils._pytree import tree_flatten, tree_unflatten


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
    """``fn`` as seen while tracing: called on proxies, it records one ``_OpaqueCall`` node."""
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
def _opaque_patches(model: nn.Module, sites: Iterable[OpaqueSite], tracer: fx.Tracer) -> Iterator[None]:
    """Patch every site to its opaque wrapper for the duration of one trace."""
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

                def restore(mod: nn.Module = mod, n: str = site.name, had: bool = had, old: Any = old) -> None:
                    if had:
                        object.__setattr__(mod, n, old)
                    else:
                        del mod.__dict__[n]
                undo.append(restore)
        yield
    finally:
        for f in reversed(undo):
            f()


def _is_library_frame(frame: FrameType) -> bool:
    """Frames of torch itself or of dipc: never a candidate for an opaque call."""
    mod = frame.f_globals.get("__name__", "")
    return mod == "torch" or mod.startswith(("torch.", "dipc.")) or mod == "functools" or mod == "contextlib"


def _code_of(obj: Any) -> Any:
    try:
        return getattr(inspect.unwrap(obj), "__code__", None)
    except Exception:
        return None


def _find_opaque_site(frames: list[FrameType], model: nn.Module, layer_frames: set) -> OpaqueSite | None:
    """The innermost piece of glue in ``frames`` (outermost first) that can run opaquely: a helper
    method of a model module or a global helper function. None if there is none — e.g. the code
    calls layers, is a module's own forward, or is already opaque."""
    paths = {id(m): p for p, m in model.named_modules()}
    for k in range(len(frames) - 1, -1, -1):
        f = frames[k]
        if _is_library_frame(f) or f.f_code.co_name.startswith("<"):
            continue
        code = f.f_code
        if code in layer_frames:
            return None   # this code calls layers: it cannot run as one opaque call
        this = f.f_locals.get("self")
        if isinstance(this, nn.Module) and id(this) in paths:
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
            return OpaqueSite(name=attr, module_path=paths[id(this)])
        # a plain function: patch it where its callers look it up (their module globals)
        for outer in frames[k - 1::-1] if k else []:
            g = outer.f_globals
            hit = next((n for n, v in g.items() if callable(v) and _code_of(v) is code), None)
            if hit is not None:
                if getattr(g[hit], "__dipc_opaque__", False):
                    return None
                return OpaqueSite(name=hit, globals_of=g["__name__"])
    return None
