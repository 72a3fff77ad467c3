"""Modality-aware partitioning: layers -> modality segments -> stages over ranks -> stage GraphModules.

Each modality module (vision encoder + projector, the backbone, ...) gets its own contiguous run
of stages (a *segment*), never mixed with another module's layers; within a segment, layers are
cut into contiguous chunks balanced by a simple per-layer measure (forward FLOPs on the example
batch; the SEMU cost model replaces it later). Stage ``s`` lives on rank ``s % num_ranks``, so with
``chunks > 1`` a rank holds several virtual stages (interleaving).

Glue nodes (everything between layers) go to the stage of their first consumer (as late as
possible: e.g. the image-token merge lands in the backbone), except non-tensor values (sizes,
ints), which stay with their producer so a whole tensor is never shipped only for its shape.
A later stage on another rank that reads a cheap, gradient-free glue value (RoPE tables, masks
made from batch keys) recomputes it rather than receiving it (:mod:`dipc.passes.remat`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch
from torch import fx, nn
from torch.utils._pytree import tree_flatten, tree_map
from torch.utils.flop_counter import FlopCounterMode

from dipc.errors import PartitionError
from dipc.passes.capture import CapturedModel
from dipc.passes.remat import remat_plan
from dipc.passes.tag import LayerTag
from dipc.passes.values import spec_of


@dataclass
class StageSpec:
    """One executable pipeline stage."""

    id: int
    rank: int
    modality: str
    layers: list[str]
    module: fx.GraphModule
    input_keys: list[str]                         # batch keys, first arguments of module
    input_values: list[tuple[str, int]]           # (value name, producer stage), following arguments
    output_values: list[str]                      # values later stages read, in output order
    has_loss: bool                                # the loss is the last output
    grad_values: frozenset[str] = field(default_factory=frozenset)  # values (in or out) carrying grads
    scalar_outputs: frozenset[str] = field(default_factory=frozenset)  # outputs that are Python scalars
    params: list[nn.Parameter] = field(default_factory=list)

    @property
    def producers(self) -> tuple[int, ...]:
        return tuple(sorted({p for _, p in self.input_values}))

    @property
    def grad_producers(self) -> tuple[int, ...]:
        return tuple(sorted({p for v, p in self.input_values if v in self.grad_values}))

    def values_from(self, producer: int) -> list[str]:
        return [v for v, p in self.input_values if p == producer]


def layer_costs(captured: CapturedModel) -> dict[str, float]:
    """Forward FLOPs of every layer on the example batch (parameter count where FLOPs are 0)."""
    gm = captured.graph_module
    values = captured.example_values
    costs: dict[str, float] = {}
    layer_set = set(captured.layers)
    for n in gm.graph.nodes:
        if n.op != "call_module" or n.target not in layer_set:
            continue
        mod = gm.get_submodule(n.target)
        args = tree_map(lambda a: values[a.name] if isinstance(a, fx.Node) else a, n.args)
        kwargs = tree_map(lambda a: values[a.name] if isinstance(a, fx.Node) else a, n.kwargs)
        counter = FlopCounterMode(display=False)
        with counter, torch.no_grad():
            mod(*args, **kwargs)
        flops = float(counter.get_total_flops())
        params = float(sum(p.numel() for p in mod.parameters()))
        costs[n.target] = costs.get(n.target, 0.0) + (flops if flops > 0 else 2.0 * params)
    return costs


def _balanced_cuts(costs: list[float], parts: int) -> list[int]:
    """Split ``costs`` into ``parts`` contiguous non-empty chunks minimising the largest chunk sum.
    Returns the start index of each chunk (DP, exact; layer counts are small)."""
    n = len(costs)
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + c)
    inf = math.inf
    best = [[inf] * (n + 1) for _ in range(parts + 1)]
    arg = [[0] * (n + 1) for _ in range(parts + 1)]
    best[0][0] = 0.0
    for k in range(1, parts + 1):
        for i in range(k, n + 1):
            for j in range(k - 1, i):
                v = max(best[k - 1][j], prefix[i] - prefix[j])
                if v < best[k][i]:
                    best[k][i], arg[k][i] = v, j
    starts, i = [], n
    for k in range(parts, 0, -1):
        j = arg[k][i]
        starts.append(j)
        i = j
    return starts[::-1]


def _allocate_stages(modules: list[tuple[str, list[str]]], costs: dict[str, float], total: int) -> list[int]:
    """Stages per modality module: proportional to cost, >= 1 each, <= its layer count."""
    sizes = [len(paths) for _, paths in modules]
    weights = [sum(costs[p] for p in paths) or 1.0 for _, paths in modules]
    alloc = [1] * len(modules)
    for _ in range(total - len(modules)):
        # give the next stage to the module with the largest per-stage cost that can still split
        cands = [i for i in range(len(modules)) if alloc[i] < sizes[i]]
        i = max(cands, key=lambda i: weights[i] / alloc[i])
        alloc[i] += 1
    return alloc


def assign_layers(tags: list[LayerTag], costs: dict[str, float], num_ranks: int, chunks: int,
                  segments: Mapping[str, int] | str = "cost") -> tuple[list[list[str]], list[str]]:
    """Layers of each stage and each stage's modality module.

    ``segments``: how many stages each modality module gets — ``"cost"`` (proportional to its cost on
    the example batch), ``"spread"`` (the same number each, so with ``chunks`` equal to the number of
    modules every module is laid over all ranks, DIP's placement, and per-batch schedules can move
    work between modalities), or an explicit ``{module: stages}``.
    """
    total = num_ranks * chunks
    if total > len(tags):
        raise PartitionError(
            f"{total} stages ({num_ranks} ranks x {chunks} chunks) but the model has only {len(tags)} layers "
            f"({', '.join(t.path for t in tags[:8])}{'...' if len(tags) > 8 else ''}). "
            "Fix: use fewer stages/chunks, or name finer layers with layers=[...].")
    modules: list[tuple[str, list[str]]] = []
    for t in tags:
        if modules and modules[-1][0] == t.module:
            modules[-1][1].append(t.path)
        elif any(m == t.module for m, _ in modules):
            # the module's layers are not contiguous in execution order: keep it in one segment anyway
            next(paths for m, paths in modules if m == t.module).append(t.path)
        else:
            modules.append((t.module, [t.path]))
    if total < len(modules):
        # Fewer stages than modality modules: adjacent modules must share stages.
        merged = [p for _, paths in modules for p in paths]
        modules = [("+".join(m for m, _ in modules), merged)]
    alloc = _segment_sizes(modules, costs, total, segments)
    stage_layers: list[list[str]] = []
    stage_mod: list[str] = []
    for (mod, paths), k in zip(modules, alloc):
        starts = _balanced_cuts([costs[p] for p in paths], k) + [len(paths)]
        for a, b in zip(starts, starts[1:]):
            stage_layers.append(paths[a:b])
            stage_mod.append(mod)
    return stage_layers, stage_mod


def _segment_sizes(modules: list[tuple[str, list[str]]], costs: dict[str, float], total: int,
                   segments: Mapping[str, int] | str) -> list[int]:
    if segments == "cost":
        return _allocate_stages(modules, costs, total)
    if segments == "spread":
        sizes = [total // len(modules)] * len(modules)
        by_cost = sorted(range(len(modules)), key=lambda i: -sum(costs[p] for p in modules[i][1]))
        for i in by_cost[: total - sum(sizes)]:
            sizes[i] += 1
    elif isinstance(segments, Mapping):
        names = [m for m, _ in modules]
        if set(segments) != set(names) or sum(segments.values()) != total:
            raise PartitionError(f"segments={dict(segments)} must give every modality module {names} a stage "
                                 f"count, summing to {total} stages. Fix: e.g. segments={dict.fromkeys(names, 1)} "
                                 "adjusted to the total, or segments='cost'.")
        sizes = [int(segments[m]) for m in names]
    else:
        raise PartitionError(f"segments={segments!r}. Fix: use 'cost', 'spread' or a {{module: stages}} dict.")
    for (mod, paths), k in zip(modules, sizes):
        if not 1 <= k <= len(paths):
            raise PartitionError(f"modality module {mod!r} has {len(paths)} layers but would get {k} stages. "
                                 "Fix: give it between 1 and its layer count (segments=...).")
    return sizes


def _is_tensor_like(value: Any) -> bool:
    leaves, _ = tree_flatten(value)
    return any(isinstance(v, torch.Tensor) for v in leaves)


def assign_nodes(gm: fx.GraphModule, stage_layers: list[list[str]], example_values: dict[str, Any]) -> dict[str, int]:
    """Stage of every non-placeholder node (placeholders are loaded by each stage that reads them)."""
    layer_stage = {p: s for s, paths in enumerate(stage_layers) for p in paths}
    last = len(stage_layers) - 1
    nodes = list(gm.graph.nodes)
    stage: dict[str, int] = {}
    for n in reversed(nodes):   # as late as possible: with the first consumer
        if n.op == "placeholder":
            continue
        if n.op == "output":
            stage[n.name] = last
        elif n.op == "call_module" and n.target in layer_stage:
            stage[n.name] = layer_stage[n.target]
        else:
            users = [stage[u.name] for u in n.users]
            stage[n.name] = min(users) if users else last
    for n in nodes:             # non-tensor values stay with their producer (as early as possible)
        if n.op in ("placeholder", "output", "get_attr") or n.name not in stage:
            continue
        if n.op == "call_module" and n.target in layer_stage:
            continue
        if not _is_tensor_like(example_values.get(n.name)):
            inputs = [stage[i.name] for i in n.all_input_nodes if i.op != "placeholder" and i.op != "get_attr"]
            if inputs:
                stage[n.name] = min(stage[n.name], max(inputs))
    for n in nodes:
        if n.op == "placeholder":
            continue
        for i in n.all_input_nodes:
            if i.op in ("placeholder", "get_attr"):
                continue
            if stage[i.name] > stage[n.name]:
                raise PartitionError(
                    f"node {n.name!r} (stage {stage[n.name]}) reads {i.name!r} from a later stage "
                    f"{stage[i.name]}: the layer order does not follow the data flow. Fix: pass layers=[...] in "
                    "execution order, or a module_overrides= that keeps dependent layers in one modality module.")
    return stage


def _requires_grad(value: Any) -> bool:
    leaves, _ = tree_flatten(value)
    return any(isinstance(v, torch.Tensor) and v.requires_grad and v.is_floating_point() for v in leaves)


def build_stages(captured: CapturedModel, stage_layers: list[list[str]], stage_mod: list[str],
                 num_ranks: int, *, remat: bool = True) -> list[StageSpec]:
    """Cut the glue graph into one GraphModule per stage (layers stay the user's module objects).
    ``remat``: recompute cheap gradient-free glue values (RoPE tables...) on the stages that read
    them instead of sending them (see :mod:`dipc.passes.remat`)."""
    gm = captured.graph_module
    values = captured.example_values
    node_stage = assign_nodes(gm, stage_layers, values)
    nodes = list(gm.graph.nodes)
    order = {n: k for k, n in enumerate(nodes)}
    out_node = next(n for n in nodes if n.op == "output")
    loss_node = out_node.args[0]
    num = len(stage_layers)
    owned = [[n for n in nodes if n.op not in ("placeholder", "output") and node_stage[n.name] == s]
             for s in range(num)]
    computed = [list(own) for own in owned]
    device_reads: list[dict[fx.Node, fx.Node]] = [{} for _ in range(num)]
    if remat:
        plan = remat_plan(gm, node_stage, [_stage_inputs(c, order) for c in computed],
                          [s % num_ranks for s in range(num)], stage_mod, values)
        computed = [sorted(set(own) | extra, key=order.__getitem__) for own, (extra, _) in zip(owned, plan)]
        device_reads = [reads for _, reads in plan]
    needed = [_stage_inputs(c, order, r) for c, r in zip(computed, device_reads)]
    read_later = {v for vs in needed for v in vs}
    stages: list[StageSpec] = []
    for s in range(num):
        graph = fx.Graph()
        env: dict[fx.Node, fx.Node] = {}
        own, needed_vals = computed[s], needed[s]
        # get_attr nodes are copied into every stage that reads them
        needed_keys = list(dict.fromkeys(i.target for n in own for i in n.all_input_nodes if i.op == "placeholder"))
        key_nodes = {n.target: n for n in nodes if n.op == "placeholder"}
        ordered_keys = [k for k in captured.input_keys if k in needed_keys]
        extra = [k for k in needed_keys if k not in captured.input_keys]
        for k in ordered_keys:
            env[key_nodes[k]] = graph.placeholder(k)
        for v in needed_vals:
            env[v] = graph.placeholder(f"in_{v.name}")
        for n in own:
            if n in device_reads[s]:   # x.device of a tensor made elsewhere: the device of one received
                env[n] = graph.call_function(getattr, (env[device_reads[s][n]], "device"))
                continue
            for i in n.all_input_nodes:
                if i.op == "get_attr" and i not in env:
                    env[i] = graph.node_copy(i, lambda x: env[x])
                if i.op == "placeholder" and i.target in extra and i not in env:
                    # a forward() argument fixed to its default during tracing
                    env[i] = graph.placeholder(i.target)
            env[n] = graph.node_copy(n, lambda x: env[x])
        outs = [n for n in owned[s] if n in read_later]
        has_loss = node_stage[loss_node.name] == s if isinstance(loss_node, fx.Node) else False
        result = [env[n] for n in outs] + ([env[loss_node]] if has_loss else [])
        graph.output(tuple(result))
        graph.lint()
        module = fx.GraphModule(gm, graph, class_name=f"Stage{s}")
        for v in needed_vals:
            _check_transferable(v.name, values.get(v.name), node_stage[v.name], s)
        grad_values = {n.name for n in needed_vals + outs if _requires_grad(values.get(n.name))}
        params = list(dict.fromkeys(module.parameters()))
        stages.append(StageSpec(
            id=s, rank=s % num_ranks, modality=stage_mod[s], layers=list(stage_layers[s]), module=module,
            input_keys=ordered_keys + extra, input_values=[(v.name, node_stage[v.name]) for v in needed_vals],
            output_values=[n.name for n in outs], has_loss=has_loss, grad_values=frozenset(grad_values),
            scalar_outputs=frozenset(n.name for n in outs if isinstance(values.get(n.name), (bool, int, float))),
            params=params))
    _check_shared_params(stages)
    return stages


def _stage_inputs(computed: list[fx.Node], order: Mapping[fx.Node, int],
                  device_reads: Mapping[fx.Node, fx.Node] | None = None) -> list[fx.Node]:
    """Values a stage computing ``computed`` reads from other stages, in graph ``order`` (a
    ``device_reads`` node reads its mapped value instead of its own input)."""
    mine = set(computed)
    seen: dict[fx.Node, None] = {}
    for n in computed:
        if device_reads and n in device_reads:
            seen.setdefault(device_reads[n])
            continue
        for i in n.all_input_nodes:
            if i.op not in ("placeholder", "get_attr") and i not in mine:
                seen.setdefault(i)
    return sorted(seen, key=order.__getitem__)


def _check_transferable(name: str, value: Any, producer: int, consumer: int) -> None:
    """Every leaf of a value that crosses stages must be a tensor of a sendable dtype or a scalar."""
    for leaf in tree_flatten(value)[0]:
        if leaf is None:
            continue
        try:
            spec_of(leaf)
        except TypeError as e:
            raise PartitionError(
                f"value {name!r} flows from stage {producer} to stage {consumer}, but {e}. Fix: compute it inside "
                "the layer that uses it (e.g. build RoPE tables in each block), or pass layers=[...] / "
                "leaf_modules=[...] so producer and consumer land in one stage.") from None


def _check_shared_params(stages: list[StageSpec]) -> None:
    owner: dict[int, int] = {}
    for st in stages:
        for p in st.params:
            if id(p) in owner and stages[owner[id(p)]].rank != st.rank:
                raise PartitionError(
                    f"a parameter is used by stage {owner[id(p)]} (layers {stages[owner[id(p)]].layers[:3]}) and by "
                    f"stage {st.id} (layers {st.layers[:3]}) on different ranks (tied weights). dipc does not yet "
                    "reduce tied weights across ranks. Fix: untie them (e.g. tie_word_embeddings=False) or pick a "
                    "stage count that puts both layers on one rank.")
            owner.setdefault(id(p), st.id)
