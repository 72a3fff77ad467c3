"""Layer policy: which modules of a model are the layers that stages are built from.

Layers come from the module tree (numbered children of a ``ModuleList`` or of a ``Sequential`` of
repeated blocks, plus parameter-holding modules that contain no such list, e.g. an embedding, a
norm, a head). Users can name the layers themselves (``layers=``) or add leaves (``leaf_modules=``).
"""
from __future__ import annotations

from typing import Iterable

from torch import nn

from dipc.errors import TraceError


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
        if path and (path in leaves or _has_params(module) and (numbered or not _contains_list(module))):
            found.append(path)
            return
        is_list = is_layer_list(module)
        for name, child in module.named_children():
            visit(child, f"{path}.{name}" if path else name, is_list and name.isdigit())

    visit(model, "", False)
    return found


def resolve_layers(model: nn.Module, layers: Iterable[str] | None, leaf_modules: Iterable[str]) -> list[str]:
    """The user's ``layers=`` (checked to exist), else the discovered ones: one place decides."""
    if layers is None:
        return discover_layers(model, leaf_modules)
    layer_paths = list(layers)
    known = dict(model.named_modules())
    for path in layer_paths:
        if path not in known:
            raise TraceError(f"layer {path!r} is not a module of {type(model).__name__}. "
                             "Fix: use paths from model.named_modules().")
    return layer_paths
