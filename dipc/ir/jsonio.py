"""JSON form of a program, for tools outside Python; ``program_from_json(program_to_json(p)) == p``.

Layout (version 1)::

    {"format": "dipc-ir", "version": 1, "schedule": "1f1b", "num_ranks": 2,
     "num_microbatches": 2, "attrs": {"seed": "0"}, "subs": [["vision", [3, 1]]],
     "stages": [{"id": 0, "rank": 0, "modality": "vision", "producers": [], "grad_producers": [],
                 "loads": ["pixel_values"], "has_loss": false}, ...],
     "streams": [[{"op": "LOAD", "stage": 0, "mb": 0}, ...], ...]}

An instruction object lists ``op`` and only the fields not at their default (as in the text form);
a spec is ``{"kind": "tensor", "dtype": "float32", "shape": [2, 16]}`` (dtype is torch's name).
Attribute keys are unique (as in the text form). ``subs`` (modality sub-microbatch counts per
microbatch) and ``microbatch_order`` (the caller's microbatch each slot runs) are written only
when the program has any. Anything else raises ``IRParseError``.
"""
from __future__ import annotations

import json
from typing import Any

from dipc.errors import IRParseError
from dipc.ir.instructions import Instruction, Op, TensorSpec
from dipc.ir.program import FORMAT_VERSION, Program, StageInfo

__all__ = ["program_to_json", "program_from_json", "dumps", "loads"]

_FORMAT = "dipc-ir"
_INT_FIELDS = ("stage", "mb", "sub", "peer", "other_stage")
_OPS_BY_NAME = {op.value: op for op in Op}


def _spec_to_json(spec: TensorSpec) -> dict[str, Any]:
    return {"kind": spec.kind, "dtype": spec.dtype, "shape": list(spec.shape)}


def _instr_to_json(instr: Instruction) -> dict[str, Any]:
    d: dict[str, Any] = {"op": instr.op.value}
    for name in _INT_FIELDS:
        value = getattr(instr, name)
        if value != -1:
            d[name] = value
    if instr.specs:
        d["specs"] = [_spec_to_json(s) for s in instr.specs]
    return d


def _stage_to_json(s: StageInfo) -> dict[str, Any]:
    return {"id": s.id, "rank": s.rank, "modality": s.modality, "producers": list(s.producers),
            "grad_producers": list(s.grad_producers), "loads": list(s.loads), "has_loss": s.has_loss}


def program_to_json(program: Program) -> dict[str, Any]:
    """A plain dict of lists, strings, ints and bools (``json.dumps``-ready)."""
    attrs = dict(program.attrs)
    if len(attrs) != len(program.attrs):
        raise ValueError(f"program attributes repeat a key: {[k for k, _ in program.attrs]}. "
                         f"Fix: give each attribute one value.")
    out = {
        "format": _FORMAT,
        "version": FORMAT_VERSION,
        "schedule": program.schedule,
        "num_ranks": program.num_ranks,
        "num_microbatches": program.num_microbatches,
        "attrs": attrs,
        "stages": [_stage_to_json(s) for s in program.stages],
        "streams": [[_instr_to_json(i) for i in stream] for stream in program.streams],
    }
    if program.subs:
        out["subs"] = [[name, list(counts)] for name, counts in program.subs]
    if program.microbatch_order:
        out["microbatch_order"] = list(program.microbatch_order)
    return out


# --------------------------------------------------------------------------- reading

def _fail(where: str, problem: str) -> IRParseError:
    return IRParseError(f"JSON {where}: {problem}. Fix: write the layout program_to_json produces.")


def _obj(value: Any, where: str, required: tuple[str, ...], optional: tuple[str, ...] = ()) -> dict:
    if not isinstance(value, dict):
        raise _fail(where, f"expected an object, got {type(value).__name__}")
    unknown = [k for k in value if k not in required and k not in optional]
    if unknown:
        raise _fail(where, f"unknown key {unknown[0]!r}")
    missing = [k for k in required if k not in value]
    if missing:
        raise _fail(where, f"missing key {missing[0]!r}")
    return value


def _int(value: Any, where: str) -> int:
    if type(value) is not int:  # bool is an int subclass; reject it
        raise _fail(where, f"expected an integer, got {value!r}")
    return value


def _str(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise _fail(where, f"expected a string, got {value!r}")
    return value


def _list(value: Any, where: str) -> list:
    if not isinstance(value, list):
        raise _fail(where, f"expected a list, got {type(value).__name__}")
    return value


def _spec_from_json(value: Any, where: str) -> TensorSpec:
    d = _obj(value, where, ("kind", "dtype", "shape"))
    shape = tuple(_int(x, f"{where}.shape[{i}]") for i, x in enumerate(_list(d["shape"], f"{where}.shape")))
    return TensorSpec(kind=_str(d["kind"], f"{where}.kind"), dtype=_str(d["dtype"], f"{where}.dtype"),
                      shape=shape)


def _instr_from_json(value: Any, where: str) -> Instruction:
    d = _obj(value, where, ("op",), _INT_FIELDS + ("specs",))
    op = _OPS_BY_NAME.get(d["op"]) if isinstance(d["op"], str) else None
    if op is None:
        raise _fail(f"{where}.op", f"unknown op {d['op']!r}")
    kwargs: dict[str, Any] = {name: _int(d[name], f"{where}.{name}") for name in _INT_FIELDS if name in d}
    if "specs" in d:
        specs = _list(d["specs"], f"{where}.specs")
        kwargs["specs"] = tuple(_spec_from_json(s, f"{where}.specs[{i}]") for i, s in enumerate(specs))
    return Instruction(op=op, **kwargs)


def _stage_from_json(value: Any, where: str) -> StageInfo:
    d = _obj(value, where, ("id", "rank"), ("modality", "producers", "grad_producers", "loads", "has_loss"))
    kwargs: dict[str, Any] = {"id": _int(d["id"], f"{where}.id"), "rank": _int(d["rank"], f"{where}.rank")}
    if "modality" in d:
        kwargs["modality"] = _str(d["modality"], f"{where}.modality")
    for key in ("producers", "grad_producers"):
        if key in d:
            kwargs[key] = tuple(_int(x, f"{where}.{key}[{i}]")
                                for i, x in enumerate(_list(d[key], f"{where}.{key}")))
    if "loads" in d:
        kwargs["loads"] = tuple(_str(x, f"{where}.loads[{i}]")
                                for i, x in enumerate(_list(d["loads"], f"{where}.loads")))
    if "has_loss" in d:
        if not isinstance(d["has_loss"], bool):
            raise _fail(f"{where}.has_loss", f"expected true or false, got {d['has_loss']!r}")
        kwargs["has_loss"] = d["has_loss"]
    return StageInfo(**kwargs)


def program_from_json(data: Any) -> Program:
    """Inverse of :func:`program_to_json`; raises ``IRParseError`` naming the bad path."""
    d = _obj(data, "program", ("format", "version", "schedule", "num_ranks", "num_microbatches",
                               "stages", "streams"), ("attrs", "subs", "microbatch_order"))
    if d["format"] != _FORMAT:
        raise _fail("program.format", f"expected {_FORMAT!r}, got {d['format']!r}")
    if d["version"] != FORMAT_VERSION or type(d["version"]) is not int:
        raise IRParseError(f"JSON program.version is {d['version']!r}; this dipc reads version "
                           f"{FORMAT_VERSION}. Fix: re-dump the program with this dipc version.")
    attrs = d.get("attrs", {})
    if not isinstance(attrs, dict):
        raise _fail("program.attrs", f"expected an object, got {type(attrs).__name__}")
    streams = _list(d["streams"], "program.streams")
    subs = []
    for i, entry in enumerate(_list(d.get("subs", []), "program.subs")):
        where = f"program.subs[{i}]"
        pair = _list(entry, where)
        if len(pair) != 2:
            raise _fail(where, f"expected [modality, [counts...]], got {entry!r}")
        subs.append((_str(pair[0], f"{where}[0]"),
                     tuple(_int(c, f"{where}[1][{j}]") for j, c in enumerate(_list(pair[1], f"{where}[1]")))))
    order = tuple(_int(c, f"program.microbatch_order[{j}]")
                  for j, c in enumerate(_list(d.get("microbatch_order", []), "program.microbatch_order")))
    return Program(
        subs=tuple(subs),
        microbatch_order=order,
        schedule=_str(d["schedule"], "program.schedule"),
        num_ranks=_int(d["num_ranks"], "program.num_ranks"),
        num_microbatches=_int(d["num_microbatches"], "program.num_microbatches"),
        attrs=tuple((k, _str(v, f"program.attrs[{k!r}]")) for k, v in attrs.items()),
        stages=tuple(_stage_from_json(s, f"program.stages[{i}]")
                     for i, s in enumerate(_list(d["stages"], "program.stages"))),
        streams=tuple(
            tuple(_instr_from_json(x, f"program.streams[{r}][{j}]")
                  for j, x in enumerate(_list(stream, f"program.streams[{r}]")))
            for r, stream in enumerate(streams)),
    )


def dumps(program: Program, *, indent: int | None = None) -> str:
    """``program_to_json`` as a JSON string (compact unless ``indent``)."""
    return json.dumps(program_to_json(program), indent=indent,
                      separators=None if indent is not None else (",", ":"))


def loads(text: str) -> Program:
    """Parse a JSON string from :func:`dumps`; malformed JSON raises ``IRParseError``."""
    try:
        data = json.loads(text)
    except ValueError as e:
        raise IRParseError(f"JSON program: not valid JSON ({e}). Fix: pass the text dumps() wrote.") from None
    return program_from_json(data)
