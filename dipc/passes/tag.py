"""Modality tagging: every node gets a modality from data flow out of the batch keys.

A node's modality is the set of modalities its inputs carry; a node reached from several
modalities is ``backbone`` (where modalities meet). Labels only make a node ``loss``.
Layers are then grouped into *modality modules* (e.g. vision encoder + projector, the backbone):
layers under the same top-level component share one module, and a modality that has no repeated
blocks of its own (a bare patch embedding or time embedding) joins the module that consumes it.
Results ride on the graph: ``node.meta["dipc.modality"]`` and ``node.meta["dipc.layer"]``.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Mapping

from torch import fx

from dipc.errors import TaggingError

BACKBONE = "backbone"
LOSS = "loss"

# Default batch key -> modality rules (first match wins); users extend them with key_modalities=.
DEFAULT_KEY_RULES: tuple[tuple[str, str], ...] = (
    (r"^labels?$|_labels$", LOSS),
    (r"pixel|image|patch|vision|img", "vision"),
    (r"audio|input_features|mel|speech|wave", "audio"),
    (r"video|latent|noise|timestep|frame", "video"),
    (r"input_ids|text|token|attention_mask|position", "text"),
)


@dataclass(frozen=True)
class LayerTag:
    path: str
    modality: str          # data-flow modality of the layer's node
    module: str            # modality module it belongs to (what gets its own pipeline segments)


def key_modality(key: str, overrides: Mapping[str, str] | None = None) -> str:
    if overrides and key in overrides:
        return overrides[key]
    for pattern, modality in DEFAULT_KEY_RULES:
        if re.search(pattern, key):
            return modality
    return "text"


def _component(path: str) -> str:
    """``language_model.layers.3`` -> ``language_model``; ``lm_head`` -> ``lm_head``."""
    parts = path.split(".")
    for i, p in enumerate(parts):
        if p.isdigit():
            return ".".join(parts[: max(i - 1, 1)])
    return ".".join(parts[:-1]) or parts[0]


def _has_blocks(paths: list[str]) -> bool:
    return any(any(p.isdigit() for p in path.split(".")) for path in paths)


def tag_modalities(gm: fx.GraphModule, layers: list[str], *, key_modalities: Mapping[str, str] | None = None,
                   module_overrides: Mapping[str, str] | None = None) -> list[LayerTag]:
    """Tag nodes in place (meta only) and return each layer's modality module, in layer order."""
    layer_set = set(layers)
    for n in gm.graph.nodes:
        if n.op == "placeholder":
            mods = {key_modality(n.target, key_modalities)}
        elif n.op in ("get_attr", "output"):
            mods = set()
        else:
            mods = set()
            for inp in n.all_input_nodes:
                mods |= inp.meta.get("dipc.modalities", set())
        n.meta["dipc.modalities"] = mods
        data = mods - {LOSS}
        if LOSS in mods:
            n.meta["dipc.modality"] = LOSS
        elif len(data) == 1:
            n.meta["dipc.modality"] = next(iter(data))
        else:
            n.meta["dipc.modality"] = BACKBONE
        if n.op == "call_module" and n.target in layer_set:
            n.meta["dipc.layer"] = n.target

    first_node = {}
    for n in gm.graph.nodes:
        if n.op == "call_module" and n.target in layer_set:
            first_node.setdefault(n.target, n)
    layer_mod = {}
    for path in layers:
        m = first_node[path].meta["dipc.modality"]
        layer_mod[path] = BACKBONE if m == LOSS else m

    # Group by component; a component that touches the backbone is backbone.
    comps: dict[str, list[str]] = {}
    for path in layers:
        comps.setdefault(_component(path), []).append(path)
    comp_mod = {}
    for comp, paths in comps.items():
        kinds = {layer_mod[p] for p in paths}
        comp_mod[comp] = kinds.pop() if len(kinds) == 1 else BACKBONE
    # A modality without repeated blocks of its own joins the backbone (e.g. a DiT's patch embedding).
    by_mod: dict[str, list[str]] = {}
    for path in layers:
        by_mod.setdefault(comp_mod[_component(path)], []).append(path)
    module_of = {}
    for mod, paths in by_mod.items():
        target = mod if mod == BACKBONE or _has_blocks(paths) else BACKBONE
        for p in paths:
            module_of[p] = target
    if module_overrides:
        for prefix, mod in module_overrides.items():
            hits = [p for p in layers if p == prefix or p.startswith(prefix + ".")]
            if not hits:
                raise TaggingError(f"modality override {prefix!r} matches no layer (layers: {layers[:6]}...). "
                                   "Fix: use a module path prefix of some layer.")
            for p in hits:
                module_of[p] = mod
    return [LayerTag(path=p, modality=layer_mod[p], module=module_of[p]) for p in layers]
