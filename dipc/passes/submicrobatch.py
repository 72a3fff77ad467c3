"""Modality sub-microbatches (DIP §4): split a modality's batch keys into pieces and join back.

A microbatch holding N_i items of modality i (images, audio clips) is split into
``M_i = max(1, ceil(N_i / B_i))`` sub-microbatches, ``B_i`` = ``items_per_sub``. Items are spread
as evenly as possible (sizes differ by at most one), which is the paper's "uniformly". A
microbatch without items still gets one (empty) sub, so the backbone always has its input.

The modality's stages (its *segment*) then run once per sub, and the values they hand to the
first stage outside the segment are joined back: every tensor leaf concatenated along dim 0 in
sub order, every other leaf (a size, a flag) required to be equal in all subs. That is exact only
when the encoder treats items independently, so :func:`check_exact_split` runs the segment on the
example batch whole and split into one item per sub and compares, before anything trains.

Splitters (how rows belong to items):

- :class:`SplitByGroup` — packed rows, ``id_key`` gives each row's item (``image_ids`` in the
  example VLM: all patches of all images along dim 0, attention block-diagonal per image);
- :class:`SplitLeadingDim` — one item per index of dim 0 of every key (``input_features``
  ``[clips, mels, frames]`` in the example audio model).

:func:`auto_splitter` picks one when the keys leave no doubt; otherwise the user passes
``dipc.compile(..., sub_microbatches={"vision": SubMicrobatches(items_per_sub=4, splitter=...)})``.
Not handled: splitting stages that read values from outside their own modality, and items whose
rows are not contiguous along dim 0.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Protocol, Sequence

import torch
from torch.utils._pytree import tree_flatten, tree_unflatten

from dipc.errors import PartitionError
from dipc.passes.partition import StageSpec

__all__ = ["Splitter", "SplitByGroup", "SplitLeadingDim", "SubMicrobatches", "SubMicrobatcher",
           "auto_splitter", "build_sub_microbatcher", "check_exact_split", "even_groups", "join_values"]


class Splitter(Protocol):
    """How one modality's batch keys split into items."""

    def num_items(self, batch: Mapping[str, Any]) -> int: ...

    def split(self, batch: Mapping[str, Any], groups: Sequence[int]) -> list[dict[str, Any]]:
        """``batch`` (only the modality's keys) cut into consecutive groups of ``groups[k]`` items."""
        ...


def _tensor_keys(batch: Mapping[str, Any], what: str) -> dict[str, torch.Tensor]:
    for k, v in batch.items():
        if not isinstance(v, torch.Tensor) or v.dim() == 0:
            raise PartitionError(f"{what}: batch key {k!r} is not a tensor with a leading dimension, so it "
                                 f"cannot be split into sub-microbatches. Fix: pass a custom splitter in "
                                 f"sub_microbatches=, or do not split this modality.")
    return dict(batch)


def _cut_rows(batch: Mapping[str, torch.Tensor], row_counts: Sequence[int]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = [{} for _ in row_counts]
    for k, v in batch.items():
        for part, piece in zip(out, torch.split(v, list(row_counts), dim=0)):
            part[k] = piece
    return out


@dataclass(frozen=True, slots=True)
class SplitLeadingDim:
    """Item ``n`` is index ``n`` of dim 0 of every key (all keys agree on dim 0)."""

    def num_items(self, batch: Mapping[str, Any]) -> int:
        keys = _tensor_keys(batch, "SplitLeadingDim")
        sizes = {k: v.shape[0] for k, v in keys.items()}
        if len(set(sizes.values())) > 1:
            raise PartitionError(f"SplitLeadingDim: keys disagree on dim 0 {sizes}. Fix: use "
                                 f"SplitByGroup(id_key) for packed rows, or a custom splitter.")
        return next(iter(sizes.values()), 0)

    def split(self, batch: Mapping[str, Any], groups: Sequence[int]) -> list[dict[str, Any]]:
        self.num_items(batch)
        return _cut_rows(batch, groups)


@dataclass(frozen=True, slots=True)
class SplitByGroup:
    """Packed rows: ``id_key`` (1-D) names each row's item; an item's rows are contiguous, and
    every key of the modality has one row per entry of ``id_key`` along dim 0."""

    id_key: str

    def _runs(self, batch: Mapping[str, Any]) -> list[int]:
        keys = _tensor_keys(batch, f"SplitByGroup({self.id_key!r})")
        if self.id_key not in keys or keys[self.id_key].dim() != 1:
            raise PartitionError(f"SplitByGroup: {self.id_key!r} is not a 1-D key of this modality "
                                 f"(keys: {sorted(keys)}). Fix: name the key that gives each row's item.")
        ids = keys[self.id_key]
        rows = ids.shape[0]
        bad = {k: tuple(v.shape) for k, v in keys.items() if v.shape[0] != rows}
        if bad:
            raise PartitionError(f"SplitByGroup({self.id_key!r}): keys {bad} do not have {rows} rows along "
                                 f"dim 0 like {self.id_key!r}. Fix: pass a custom splitter in sub_microbatches=.")
        if rows == 0:
            return []
        values, counts = torch.unique_consecutive(ids, return_counts=True)
        if values.numel() != torch.unique(values).numel():
            raise PartitionError(f"SplitByGroup({self.id_key!r}): the rows of one item are not contiguous "
                                 f"(ids {ids.tolist()[:16]}...). Fix: collate each item's rows together.")
        return counts.tolist()

    def num_items(self, batch: Mapping[str, Any]) -> int:
        return len(self._runs(batch))

    def split(self, batch: Mapping[str, Any], groups: Sequence[int]) -> list[dict[str, Any]]:
        runs = self._runs(batch)
        rows, start = [], 0
        for g in groups:
            rows.append(sum(runs[start:start + g]))
            start += g
        return _cut_rows(batch, rows)


def auto_splitter(modality: str, batch: Mapping[str, Any]) -> Splitter:
    """The splitter the keys make unambiguous: all keys share dim 0, and either exactly one of
    them is a 1-D integer key named ``*_ids`` (packed rows, grouped by it) or none is (one item
    per row). Anything else raises, naming the keys and what to pass."""
    fix = (f"Fix: pass sub_microbatches={{{modality!r}: SubMicrobatches(items_per_sub=..., "
           f"splitter=SplitByGroup('<id key>') or SplitLeadingDim() or your own)}}.")
    shapes = {k: tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__ for k, v in batch.items()}
    if not batch or any(not isinstance(v, torch.Tensor) or v.dim() == 0 for v in batch.values()):
        raise PartitionError(f"cannot tell how to split modality {modality!r} into sub-microbatches: its "
                             f"keys {shapes} are not all tensors with a leading dimension. {fix}")
    if len({v.shape[0] for v in batch.values()}) > 1:
        raise PartitionError(f"cannot tell how to split modality {modality!r} into sub-microbatches: its "
                             f"keys {shapes} disagree on dim 0. {fix}")
    ids = [k for k, v in batch.items() if v.dim() == 1 and not v.is_floating_point() and k.endswith("_ids")]
    if len(ids) > 1:
        raise PartitionError(f"cannot tell how to split modality {modality!r}: several id keys {ids}. {fix}")
    return SplitByGroup(ids[0]) if ids else SplitLeadingDim()


@dataclass(frozen=True, kw_only=True, slots=True)
class SubMicrobatches:
    """How to split one modality: ``items_per_sub`` (B_i) items per sub-microbatch, by ``splitter``
    (None: :func:`auto_splitter`)."""

    items_per_sub: int
    splitter: Splitter | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.items_per_sub, int) or isinstance(self.items_per_sub, bool) or self.items_per_sub < 1:
            raise PartitionError(f"items_per_sub={self.items_per_sub!r}. Fix: pass a whole number >= 1.")


def even_groups(num_items: int, items_per_sub: int) -> list[int]:
    """Items per sub: ``max(1, ceil(N / B))`` subs, sizes as equal as possible (earlier ones larger)."""
    m = max(1, math.ceil(num_items / items_per_sub))
    base, extra = divmod(num_items, m)
    return [base + (k < extra) for k in range(m)]


def join_values(parts: Sequence[Any], where: str = "value") -> Any:
    """Join one boundary value's per-sub parts: tensor leaves concatenated along dim 0, other leaves
    equal in every part (else a PartitionError naming ``where``)."""
    flat = [tree_flatten(p) for p in parts]
    spec = flat[0][1]
    if any(s != spec for _, s in flat):
        raise PartitionError(f"{where}: the sub-microbatches produced differently structured values. "
                             f"Fix: do not split this modality.")
    leaves = []
    for column in zip(*(leaves for leaves, _ in flat)):
        if isinstance(column[0], torch.Tensor):
            if any(c.dim() == 0 for c in column):
                raise PartitionError(f"{where}: a 0-d tensor cannot be concatenated across sub-microbatches. "
                                     f"Fix: do not split this modality, or return per-item tensors.")
            leaves.append(torch.cat(list(column), dim=0))
        else:
            if any(c != column[0] for c in column):
                raise PartitionError(f"{where}: a non-tensor output differs between sub-microbatches "
                                     f"({list(column)}). Fix: do not split this modality.")
            leaves.append(column[0])
    return tree_unflatten(leaves, spec)


@dataclass
class SubMicrobatcher:
    """The sub-microbatch layout of a compiled pipeline: which stages run per sub, and how batches
    split. Built by ``dipc.compile`` from its ``sub_microbatches`` option."""

    stages: Sequence[StageSpec]
    config: dict[str, SubMicrobatches]            # modality -> how (splitter resolved)
    keys: dict[str, list[str]] = field(default_factory=dict)   # modality -> its batch keys

    def modality_batch(self, modality: str, batch: Mapping[str, Any]) -> dict[str, Any]:
        return {k: batch[k] for k in self.keys[modality]}

    def splitter(self, modality: str) -> Splitter:
        """The modality's splitter (resolved by :func:`build_sub_microbatcher`, never None here)."""
        splitter = self.config[modality].splitter
        if splitter is None:
            raise PartitionError(f"modality {modality!r} has no splitter. Fix: build the layout with "
                                 f"build_sub_microbatcher, which resolves it.")
        return splitter

    def groups(self, modality: str, batch: Mapping[str, Any]) -> list[int]:
        """Items per sub of ``batch``'s ``modality`` part (:func:`even_groups`)."""
        items = self.splitter(modality).num_items(self.modality_batch(modality, batch))
        return even_groups(items, self.config[modality].items_per_sub)

    def counts(self, microbatches: Sequence[Mapping[str, Any]]) -> tuple[tuple[str, tuple[int, ...]], ...]:
        """``Program.subs`` for these microbatches."""
        return tuple((mod, tuple(len(self.groups(mod, mb)) for mb in microbatches)) for mod in self.config)

    def parts(self, modality: str, batch: Mapping[str, Any]) -> list[dict[str, Any]]:
        """``batch``'s ``modality`` keys cut into its sub-microbatches, in order."""
        return self.splitter(modality).split(self.modality_batch(modality, batch), self.groups(modality, batch))

    def sub_batches(self, microbatches: Sequence[Mapping[str, Any]]) -> dict[tuple[str, int, int], dict[str, Any]]:
        """``(modality, mb, sub) -> the sub's batch keys``: what LOAD with a sub reads."""
        return {(mod, m, j): part for mod in self.config for m, mb in enumerate(microbatches)
                for j, part in enumerate(self.parts(mod, mb))}


def build_sub_microbatcher(stages: Sequence[StageSpec], options: Mapping[str, int | SubMicrobatches],
                           example_batch: Mapping[str, Any]) -> SubMicrobatcher:
    """Resolve ``dipc.compile``'s ``sub_microbatches`` option against the partition and check it."""
    modalities = {s.modality for s in stages}
    config: dict[str, SubMicrobatches] = {}
    keys: dict[str, list[str]] = {}
    for mod, opt in options.items():
        if mod not in modalities:
            raise PartitionError(f"sub_microbatches names modality {mod!r}, but the stages have "
                                 f"{sorted(modalities)}. Fix: use one of those names.")
        if mod == "backbone" or any(s.has_loss for s in stages if s.modality == mod):
            raise PartitionError(f"sub_microbatches cannot split {mod!r}: it holds the loss, whose "
                                 f"microbatch is the unit of the step. Fix: split an encoder modality.")
        cfg = SubMicrobatches(items_per_sub=opt) if isinstance(opt, int) and not isinstance(opt, bool) else opt
        if not isinstance(cfg, SubMicrobatches):
            raise PartitionError(f"sub_microbatches[{mod!r}]={opt!r}. Fix: pass an int (items per sub) or "
                                 f"SubMicrobatches(items_per_sub=..., splitter=...).")
        own = [s for s in stages if s.modality == mod]
        for s in own:
            for name, p in s.input_values:
                if stages[p].modality != mod:
                    raise PartitionError(f"cannot split modality {mod!r}: its stage {s.id} reads {name!r} from "
                                         f"stage {p} ({stages[p].modality!r}), which runs per whole microbatch. "
                                         f"Fix: do not split {mod!r}, or move that glue into its segment.")
        keys[mod] = list(dict.fromkeys(k for s in own for k in s.input_keys))
        if not keys[mod]:
            raise PartitionError(f"cannot split modality {mod!r}: its stages read no batch keys. "
                                 f"Fix: do not split it.")
        batch = {k: example_batch[k] for k in keys[mod]}
        if cfg.splitter is None:
            cfg = SubMicrobatches(items_per_sub=cfg.items_per_sub, splitter=auto_splitter(mod, batch))
        config[mod] = cfg
    sm = SubMicrobatcher(stages=stages, config=config, keys=keys)
    for mod in config:
        check_exact_split(sm, mod, example_batch)
    return sm


def _run_segment(stages: Sequence[StageSpec], modality: str, batch: Mapping[str, Any]) -> dict[str, Any]:
    """Run the modality's stages (no grad) on ``batch``; their output values by name."""
    values: dict[str, Any] = {}
    with torch.no_grad():
        for st in stages:
            if st.modality != modality:
                continue
            args = [batch[k] for k in st.input_keys] + [values[v] for v, _ in st.input_values]
            values.update(zip(st.output_values, st.module(*args)))
    return values


def check_exact_split(sm: SubMicrobatcher, modality: str, example_batch: Mapping[str, Any]) -> None:
    """Run the segment on the example batch whole and one item per sub; the joined boundary values
    must equal the whole run (else the encoder mixes items and splitting would change training)."""
    splitter = sm.splitter(modality)
    batch = sm.modality_batch(modality, example_batch)
    n = splitter.num_items(batch)
    if n < 2:
        return   # nothing to compare: the example batch has at most one item
    parts = splitter.split(batch, [1] * n)
    whole = _run_segment(sm.stages, modality, batch)
    runs = [_run_segment(sm.stages, modality, p) for p in parts]
    boundary = [(name, s.id) for s in sm.stages if s.modality == modality
                for name in s.output_values if any(name == v and c.modality != modality
                                                   for c in sm.stages for v, _ in c.input_values)]
    fix = (f"Fix: pass sub_microbatches={{{modality!r}: SubMicrobatches(items_per_sub=..., splitter=...)}} with "
           f"a splitter that cuts between independent items, or do not split {modality!r}.")
    for name, stage in boundary:
        where = f"modality {modality!r}, stage {stage} output {name!r} (splitter {splitter!r})"
        try:
            joined = join_values([r[name] for r in runs], where)
        except PartitionError as e:
            raise PartitionError(f"{e} {fix}") from None
        a, b = tree_flatten(joined)[0], tree_flatten(whole[name])[0]
        for x, y in zip(a, b):
            if isinstance(x, torch.Tensor):
                ok = x.shape == y.shape and torch.allclose(x, y, rtol=1e-4, atol=1e-5)
            else:
                ok = x == y
            if not ok:
                shape = f"{tuple(x.shape)} vs {tuple(y.shape)}" if isinstance(x, torch.Tensor) else f"{x} vs {y}"
                raise PartitionError(f"splitting {where} is not exact: running the segment on one item per "
                                     f"sub-microbatch and concatenating along dim 0 differs from running it on "
                                     f"the whole example batch ({shape}); the encoder mixes items. {fix}")
