"""Which layers a program recomputes (activation checkpointing), stored in ``Program.attrs``.

DIP re-plans the choice per batch, per stage and, optionally, per microbatch (phase 3 of the
paper: only the microbatches alive at a rank's memory peak need to recompute). ``recompute``
holds ``;``-separated parts, each ``<stage>:<layer>,<layer>`` (every microbatch of the stage) or
``<stage>@<mb>,<mb>:<layer>,<layer>`` (only the listed microbatches), e.g.
``0:vision.blocks.0;2@0,3:lm.layers.3,lm.layers.4;2@1:lm.layers.3``. Module paths contain
neither ``,`` ``;`` ``:`` nor ``@``. A microbatch recomputes the union of its stage's whole-stage
layers and its own. The typed form, :data:`RecomputePlan`, keys whole-stage entries by the stage
id (``int``) and per-microbatch ones by ``(stage, mb)``, so plans and dumps written before
microbatches could be named read back unchanged and mean "every microbatch".

Selective recomputation: an entry ``<layer>~sel`` (:func:`selective`) runs the layer under
*selective* checkpointing instead of full: its forward keeps the outputs of the expensive ops
(:data:`SELECTIVE_SAVED_OPS`: matmuls, convolutions, fused attention) and its backward re-runs
only the cheap ones between them (norms, activations, rotary embeddings, elementwise glue). It
frees most of what full recomputation frees at a few percent of its re-run time (the same trade
as Megatron-LM's selective recomputation and torch's selective activation checkpointing). A unit
names a layer once: either ``<layer>`` (full) or ``<layer>~sel``.

Canonical text (what :func:`format_recompute` writes and ``parse(dump(p)) == p`` relies on):
stages ascending; per stage its whole-stage part first, then one part per distinct layer list,
its microbatches ascending, ordered by their first microbatch. A program without the key
recomputes nothing, and an empty plan removes the key rather than writing an empty value.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping

from dipc.errors import IRParseError, ScheduleError
from dipc.ir.program import Program

__all__ = ["RECOMPUTE_ATTR", "SELECTIVE_SAVED_OPS", "SELECTIVE_SUFFIX", "RecomputePlan", "UnitRecompute",
           "check_recompute", "expand_recompute", "format_recompute", "is_per_microbatch", "layers_of",
           "parse_recompute", "recompute_plan", "recomputes", "selective", "split_entry", "stage_union",
           "with_recompute"]

RECOMPUTE_ATTR = "recompute"

RecomputeKey = int | tuple[int, int]
RecomputePlan = dict[RecomputeKey, tuple[str, ...]]
"""stage id (every microbatch) or (stage id, microbatch) -> module paths run under checkpointing."""

UnitRecompute = dict[tuple[int, int], frozenset[str]]
"""(stage, microbatch) -> the layers it recomputes; only pairs that recompute something."""

_SEPARATORS = (",", ";", ":", "@")

SELECTIVE_SUFFIX = "~sel"
# aten ops (overload packet names) whose outputs selective checkpointing keeps from forward to
# backward; every other op of the layer is re-run in the backward. SEMU's stash and re-run time
# for ``<layer>~sel`` and the runtime's checkpoint policy both read this one list.
SELECTIVE_SAVED_OPS = frozenset((
    "mm", "addmm", "bmm", "baddbmm", "_scaled_mm", "convolution", "_convolution",
    "_scaled_dot_product_flash_attention", "_scaled_dot_product_flash_attention_for_cpu",
    "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention",
    "_flash_attention_forward", "_efficient_attention_forward",
))


def selective(path: str) -> str:
    """The plan entry that recomputes layer ``path`` selectively (``<path>~sel``)."""
    return path + SELECTIVE_SUFFIX


def split_entry(entry: str) -> tuple[str, bool]:
    """(module path, selective?) of a plan entry: ``"lm.layers.3~sel"`` -> ``("lm.layers.3", True)``."""
    if entry.endswith(SELECTIVE_SUFFIX):
        return entry[:-len(SELECTIVE_SUFFIX)], True
    return entry, False
_EXAMPLE = "recompute=\"0:vision.blocks.0,vision.blocks.1;2@0,3:lm.layers.3\""


def _order(key: RecomputeKey) -> tuple[int, int]:
    return (key, -1) if isinstance(key, int) else key


def _is_index(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _normalise(plan: Mapping[RecomputeKey, Iterable[str]]) -> RecomputePlan:
    out: RecomputePlan = {}
    for key, layers in sorted(plan.items(), key=lambda kv: _order(kv[0])):
        names = tuple(dict.fromkeys(layers))
        ok = _is_index(key) or (isinstance(key, tuple) and len(key) == 2 and all(_is_index(x) for x in key))
        if not ok:
            raise ValueError(f"recompute plan key {key!r}. Fix: use a stage id (int >= 0) for every microbatch "
                             "or a (stage, microbatch) pair of ints >= 0.")
        for name in names:
            if not name or any(c in name for c in _SEPARATORS) or name != name.strip():
                raise ValueError(f"recompute plan layer {name!r} of {key!r} cannot be written "
                                 "(empty, padded, or contains ',', ';', ':' or '@'). Fix: use module paths.")
        paths = [split_entry(n)[0] for n in names]
        if len(set(paths)) != len(paths):
            twice = sorted({p for p in paths if paths.count(p) > 1})
            raise ValueError(f"recompute plan {key!r} names layer(s) {twice} both fully and selectively "
                             f"({SELECTIVE_SUFFIX}). Fix: keep one entry per layer.")
        if names:
            out[key] = names
    return out


def format_recompute(plan: Mapping[RecomputeKey, Iterable[str]]) -> str:
    """The attribute value of ``plan`` (``""`` for an empty plan), in canonical text."""
    parts: list[tuple[tuple[int, int], str]] = []                # (stage, first microbatch or -1), text
    groups: dict[tuple[int, tuple[str, ...]], list[int]] = {}   # (stage, layers) -> microbatches
    for key, layers in _normalise(plan).items():
        if isinstance(key, int):
            parts.append(((key, -1), f"{key}:{','.join(layers)}"))
        else:
            groups.setdefault((key[0], layers), []).append(key[1])
    for (stage, layers), mbs in groups.items():
        parts.append(((stage, mbs[0]), f"{stage}@{','.join(map(str, mbs))}:{','.join(layers)}"))
    parts.sort()
    return ";".join(text for _, text in parts)


def parse_recompute(value: str) -> RecomputePlan:
    """Inverse of :func:`format_recompute`; raises ``IRParseError`` naming the bad part."""
    plan: RecomputePlan = {}
    for part in value.split(";") if value else ():
        head, sep, layers = part.partition(":")
        stage, at, mbs = head.partition("@")
        mb_list = mbs.split(",") if at else []
        if not sep or not stage.isdigit() or not layers or (at and not all(m.isdigit() for m in mb_list)):
            raise IRParseError(f"recompute={value!r}: part {part!r} is not '<stage>:<layer>,...' or "
                               f"'<stage>@<mb>,...:<layer>,...'. Fix: e.g. {_EXAMPLE}.")
        names = tuple(layers.split(","))
        keys: list[RecomputeKey] = [(int(stage), int(m)) for m in mb_list] if at else [int(stage)]
        if any(k in plan for k in keys) or len(set(keys)) != len(keys) \
                or any(not n or n != n.strip() or "@" in n for n in names):
            raise IRParseError(f"recompute={value!r}: part {part!r} repeats a stage or microbatch, or names an "
                               "empty layer. Fix: one part per stage (or per stage and microbatch list), layers "
                               "and microbatches separated by single commas.")
        for k in keys:
            plan[k] = names
    return plan


def recompute_plan(program: Program) -> RecomputePlan:
    """The program's recompute choice (empty when it has none)."""
    for key, value in program.attrs:
        if key == RECOMPUTE_ATTR:
            return parse_recompute(value)
    return {}


def is_per_microbatch(plan: Mapping[RecomputeKey, Iterable[str]]) -> bool:
    """Whether some entry names microbatches (so the choice may differ between them)."""
    return any(not isinstance(k, int) for k in plan)


def layers_of(plan: Mapping[RecomputeKey, Iterable[str]], stage: int, mb: int) -> tuple[str, ...]:
    """The layers (``stage``, ``mb``) recomputes: its stage's whole-stage layers, then its own."""
    return tuple(dict.fromkeys((*plan.get(stage, ()), *plan.get((stage, mb), ()))))


def recomputes(plan: Mapping[RecomputeKey, Iterable[str]], stage: int, mb: int, layer: str) -> bool:
    """Whether microbatch ``mb`` of ``stage`` runs ``layer`` under checkpointing."""
    return layer in plan.get(stage, ()) or layer in plan.get((stage, mb), ())


def stage_union(plan: Mapping[RecomputeKey, Iterable[str]]) -> dict[int, tuple[str, ...]]:
    """Per stage, every layer some microbatch recomputes (whole-stage layers first)."""
    out: dict[int, dict[str, None]] = {}
    for key, layers in sorted(plan.items(), key=lambda kv: _order(kv[0])):
        stage = key if isinstance(key, int) else key[0]
        out.setdefault(stage, {}).update(dict.fromkeys(layers))
    return {s: tuple(names) for s, names in out.items() if names}


def expand_recompute(plan: Mapping[RecomputeKey, Iterable[str]], num_microbatches: int) -> UnitRecompute:
    """``plan`` per (stage, microbatch) for a program of ``num_microbatches``."""
    out: UnitRecompute = {}
    for key, layers in plan.items():
        if not layers:
            continue
        pairs = [(key, m) for m in range(num_microbatches)] if isinstance(key, int) else [key]
        for pair in pairs:
            out[pair] = out.get(pair, frozenset()) | frozenset(layers)
    return out


def _check_one_mode(plan: Mapping[RecomputeKey, Iterable[str]], stage: int, mb: int | None) -> None:
    """Raise if unit (``stage``, ``mb``) (``mb`` None: the whole-stage entry alone) names a layer
    both fully and selectively once its whole-stage and microbatch entries are unioned."""
    entries = layers_of(plan, stage, mb) if mb is not None else tuple(plan.get(stage, ()))
    paths = [split_entry(e)[0] for e in entries]
    twice = sorted({p for p in paths if paths.count(p) > 1})
    if twice:
        where = f"stage {stage}" + (f", microbatch {mb}" if mb is not None else "")
        raise ScheduleError(f"program: recompute runs layer(s) {twice} of {where} both fully and selectively "
                            f"(<layer> and <layer>{SELECTIVE_SUFFIX}, from its whole-stage and microbatch entries). "
                            "Fix: name each layer once per unit: drop it from the whole-stage entry or from "
                            "the microbatch's.")


def check_recompute(program: Program, plan: Mapping[RecomputeKey, Iterable[str]] | None = None) -> None:
    """Raise ``ScheduleError`` if ``plan`` (default: the program's own) names a stage or a
    microbatch the program does not have, or runs a layer of one unit both fully and selectively."""
    plan = recompute_plan(program) if plan is None else plan
    stage_ids = {s.id for s in program.stages}
    M = program.num_microbatches
    for key in plan:
        stage, mb = (key, None) if isinstance(key, int) else key
        if stage not in stage_ids:
            raise ScheduleError(f"program: recompute names stage {stage}, but the program has stages "
                                f"{sorted(stage_ids)}. Fix: plan the recomputation for this program's stages.")
        if mb is not None and not 0 <= mb < M:
            raise ScheduleError(f"program: recompute names microbatch {mb} of stage {stage}, outside 0..{M - 1}. "
                                "Fix: name microbatches of this program, or a bare stage for all of them.")
        _check_one_mode(plan, stage, mb)


def with_recompute(program: Program, plan: Mapping[RecomputeKey, Iterable[str]]) -> Program:
    """A copy of ``program`` recomputing ``plan``'s layers (replacing any earlier choice).
    Raises ``ScheduleError`` for a stage or microbatch the program lacks."""
    value = format_recompute(plan)
    check_recompute(program, _normalise(plan))
    attrs = tuple((k, v) for k, v in program.attrs if k != RECOMPUTE_ATTR)
    if value:
        attrs += ((RECOMPUTE_ATTR, value),)
    return dataclasses.replace(program, attrs=attrs)
