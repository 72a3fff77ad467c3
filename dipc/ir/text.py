"""The text form of the IR: one line per instruction, one stable dump per program.

Instruction: ``OP key=value ...`` with keys in the fixed order ``stage mb sub peer other_stage
specs``; a field at its default (``-1`` / ``()``) is omitted, so programs without sub-microbatches
print exactly as before subs existed::

    RECV_ACT stage=1 mb=0 peer=0 other_stage=0 specs=f32[2,16,64];i64[];int
    FWD stage=0 mb=3 sub=1

Program (``FORMAT_VERSION`` 1)::

    # dipc-ir v1
    program schedule=1f1b ranks=2 microbatches=2 seed=0
    subs modality=vision counts=3,1
    stage id=0 rank=0 modality=vision loads=pixel_values
    stage id=1 rank=1 modality=backbone producers=0 grad_producers=0 loads=input_ids,labels loss=1
    rank 0:
      LOAD stage=0 mb=0
      ...
    rank 1:
      ...

Lines starting with ``#`` (after optional indentation) and blank lines are ignored wherever they
appear, except the version header, which must come before the ``program`` line. ``subs`` lines
(one per split modality, ``counts`` per microbatch) come after the program line and before the
stages, and only when the program splits a modality. An ``order microbatches=2,0,1`` line
(``Program.microbatch_order``: slot ``m`` runs the caller's microbatch ``2``, ``0``…) follows them,
only when the program reorders its microbatches.
String values (schedule name, attribute values, modality) print bare when they are simple
(``[A-Za-z0-9_.:/+@%-]+``) and as a JSON string literal otherwise (``name="my run"``).

``format_grid`` renders a program as a step x rank table of short labels (``F3.1`` = forward of
stage 3, microbatch 1), with one cell marked, for error messages.
"""
from __future__ import annotations

import json
import re

from dipc.errors import IRParseError
from dipc.ir.instructions import RECV_OPS, SEND_OPS, Instruction, Op, TensorSpec
from dipc.ir.program import FORMAT_VERSION, Program, StageInfo

__all__ = ["DTYPE_SHORT", "format_instruction", "parse_instruction", "format_spec", "parse_spec",
           "dump_program", "parse_program", "format_grid", "instruction_label"]

# TensorSpec.dtype holds torch's name (``str(torch.float32).removeprefix("torch.")``); the text
# form uses the short name. Other dtype names (``float8_e4m3fn``, ``complex64``) print as is.
DTYPE_SHORT: dict[str, str] = {
    "float16": "f16", "bfloat16": "bf16", "float32": "f32", "float64": "f64",
    "int8": "i8", "int16": "i16", "int32": "i32", "int64": "i64", "uint8": "u8", "bool": "bool",
}
_DTYPE_LONG = {v: k for k, v in DTYPE_SHORT.items()}
_SHORT_ONLY = frozenset(_DTYPE_LONG) - frozenset(DTYPE_SHORT)  # "f32" is never a stored dtype

HEADER = f"# dipc-ir v{FORMAT_VERSION}"
_HEADER_RE = re.compile(r"#\s*dipc-ir\s+v(\S*)\s*$")

_INT_FIELDS = ("stage", "mb", "sub", "peer", "other_stage")
_FIELD_ORDER = _INT_FIELDS + ("specs",)
_INT_RE = re.compile(r"-?[0-9]+\Z")
_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_BARE_RE = re.compile(r"[A-Za-z0-9_.:/+@%-]+\Z")
_KEY_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]*")
_ATTR_KEY_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]*\Z")
_JSON_STR_RE = re.compile(r'"(?:[^"\\\x00-\x1f]|\\.)*"')
_SPEC_RE = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)(?:\[([0-9,]*)\])?\Z")
_RANK_RE = re.compile(r"rank\s+([0-9]+)\s*:\s*\Z")
_PROGRAM_RESERVED = ("schedule", "ranks", "microbatches")

_OPS_BY_NAME = {op.value: op for op in Op}


# --------------------------------------------------------------------------- tensor specs

def format_spec(spec: TensorSpec) -> str:
    """``f32[2,16,64]`` for a tensor, ``i64[]`` for a 0-d tensor, ``int`` for a Python scalar."""
    if spec.kind == "tensor":
        if spec.dtype in _SHORT_ONLY or not _NAME_RE.match(spec.dtype or ""):
            raise ValueError(
                f"TensorSpec dtype {spec.dtype!r} cannot be printed. Fix: store torch's dtype name "
                f"(one of {sorted(DTYPE_SHORT)} or another identifier), not the short text name.")
        if any(d < 0 for d in spec.shape):
            raise ValueError(f"TensorSpec shape {spec.shape} has a negative dimension. Fix: the plan "
                             f"must give concrete shapes.")
        dtype = DTYPE_SHORT.get(spec.dtype, spec.dtype)
        return f"{dtype}[{','.join(str(d) for d in spec.shape)}]"
    if not _NAME_RE.match(spec.kind) or spec.dtype or spec.shape:
        raise ValueError(
            f"TensorSpec {spec!r} cannot be printed. Fix: a scalar spec has an identifier kind "
            f"('int', 'float', 'bool') and no dtype or shape.")
    return spec.kind


def parse_spec(token: str) -> TensorSpec:
    """Inverse of :func:`format_spec`; raises ``IRParseError`` naming the token."""
    m = _SPEC_RE.match(token)
    if m is None:
        raise IRParseError(f"malformed tensor spec {token!r}. Fix: write dtype[d0,d1,...] "
                           f"(e.g. f32[2,16]) or a scalar kind (int, float, bool).")
    name, dims = m.group(1), m.group(2)
    if dims is None:
        if name == "tensor":
            raise IRParseError(f"malformed tensor spec {token!r}: a tensor needs dtype[shape]. "
                               f"Fix: write e.g. f32[2,16].")
        return TensorSpec(kind=name)
    if name in DTYPE_SHORT and name not in _DTYPE_LONG:
        raise IRParseError(f"tensor spec {token!r} uses the long dtype name {name!r}. "
                           f"Fix: write {DTYPE_SHORT[name]!r}.")
    parts = dims.split(",") if dims else []
    if any(not p for p in parts):
        raise IRParseError(f"malformed shape in tensor spec {token!r}. Fix: write dims as 2,16,64.")
    return TensorSpec(kind="tensor", dtype=_DTYPE_LONG.get(name, name),
                      shape=tuple(int(p) for p in parts))


# --------------------------------------------------------------------------- instructions

def format_instruction(instr: Instruction) -> str:
    """One line, ``OP key=value ...``; fields at their default are omitted."""
    parts = [instr.op.value]
    for name in _INT_FIELDS:
        value = getattr(instr, name)
        if value != -1:
            parts.append(f"{name}={value}")
    if instr.specs:
        parts.append("specs=" + ";".join(format_spec(s) for s in instr.specs))
    return " ".join(parts)


def _split_kv(rest: str, where: str) -> list[tuple[str, str, bool]]:
    """Split ``k=v k2="quoted v"`` into (key, raw value, was_quoted). Raises on malformed tokens."""
    out: list[tuple[str, str, bool]] = []
    i, n = 0, len(rest)
    while True:
        while i < n and rest[i].isspace():
            i += 1
        if i >= n:
            return out
        m = _KEY_RE.match(rest, i)
        if m is None or m.end() >= n or rest[m.end()] != "=":
            tok = rest[i:].split(None, 1)[0]
            raise IRParseError(f"{where}: malformed token {tok!r}. Fix: write key=value.")
        key, j = m.group(0), m.end() + 1
        if j < n and rest[j] == '"':
            q = _JSON_STR_RE.match(rest, j)
            if q is None:
                raise IRParseError(f"{where}: unterminated string in {rest[i:]!r}. "
                                   f"Fix: close the quote and escape it as in JSON.")
            try:
                value = json.loads(q.group(0))
            except ValueError as e:
                raise IRParseError(f"{where}: bad string {q.group(0)!r} ({e}). "
                                   f"Fix: escape it as a JSON string.") from None
            out.append((key, value, True))
            i = q.end()
            if i < n and not rest[i].isspace():
                raise IRParseError(f"{where}: malformed token {rest[m.start():].split(None, 1)[0]!r}"
                                   f" (text right after a closing quote). Fix: add a space.")
        else:
            k = j
            while k < n and not rest[k].isspace():
                k += 1
            out.append((key, rest[j:k], False))
            i = k


def _parse_int(key: str, value: str, quoted: bool, where: str, *, minimum: int | None = None) -> int:
    if quoted or not _INT_RE.match(value):
        raise IRParseError(f"{where}: {key}={value!r} is not an integer. Fix: write {key}=<int>.")
    result = int(value)
    if minimum is not None and result < minimum:
        raise IRParseError(f"{where}: {key}={result} is below {minimum}.")
    return result


def parse_instruction(line: str) -> Instruction:
    """Exact inverse of :func:`format_instruction`. Keys may come in any order, each at most once."""
    where = f"instruction {line.strip()!r}"
    head, _, rest = line.strip().partition(" ")
    op = _OPS_BY_NAME.get(head)
    if op is None:
        raise IRParseError(f"{where}: unknown op {head!r}. Fix: use one of "
                           f"{', '.join(_OPS_BY_NAME)}.")
    kwargs: dict[str, object] = {}
    for key, value, quoted in _split_kv(rest, where):
        if key not in _FIELD_ORDER:
            raise IRParseError(f"{where}: unknown key {key!r}. Fix: use {', '.join(_FIELD_ORDER)}.")
        if key in kwargs:
            raise IRParseError(f"{where}: key {key!r} given twice.")
        if key == "specs":
            if quoted or not value:
                raise IRParseError(f"{where}: malformed token 'specs={value}'. "
                                   f"Fix: write specs=f32[2,16];int (omit the key when empty).")
            try:
                kwargs[key] = tuple(parse_spec(t) for t in value.split(";"))
            except IRParseError as e:
                raise IRParseError(f"{where}: {e}") from None
        else:
            kwargs[key] = _parse_int(key, value, quoted, where)
    return Instruction(op=op, **kwargs)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- programs

def _fmt_str(value: str) -> str:
    return value if _BARE_RE.match(value) else json.dumps(value, ensure_ascii=True)


def _fmt_names(values: tuple[str, ...], what: str) -> str:
    for v in values:
        if not _BARE_RE.match(v) or "," in v:
            raise ValueError(f"{what} entry {v!r} cannot be printed. Fix: use names made of "
                             f"[A-Za-z0-9_.:/+@%-] (batch keys are identifiers).")
    return ",".join(values)


def _format_stage(s: StageInfo) -> str:
    parts = [f"stage id={s.id} rank={s.rank} modality={_fmt_str(s.modality)}"]
    if s.producers:
        parts.append("producers=" + ",".join(str(p) for p in s.producers))
    if s.grad_producers:
        parts.append("grad_producers=" + ",".join(str(p) for p in s.grad_producers))
    if s.loads:
        parts.append("loads=" + _fmt_names(s.loads, f"stage {s.id} loads"))
    if s.has_loss:
        parts.append("loss=1")
    return " ".join(parts)


def dump_program(program: Program) -> str:
    """The stable text form (golden-tested); ``parse_program(dump_program(p)) == p``."""
    head = [f"program schedule={_fmt_str(program.schedule)} ranks={program.num_ranks} "
            f"microbatches={program.num_microbatches}"]
    seen: set[str] = set()
    for key, value in program.attrs:
        if not _ATTR_KEY_RE.match(key) or key in _PROGRAM_RESERVED or key in seen:
            raise ValueError(f"program attribute key {key!r} cannot be printed (reserved, repeated or "
                             f"not [A-Za-z_][A-Za-z0-9_.-]*). Fix: rename the attribute.")
        seen.add(key)
        head.append(f"{key}={_fmt_str(value)}")
    lines = [HEADER, " ".join(head)]
    for name, counts in program.subs:
        if not counts or any(c < 0 for c in counts):
            raise ValueError(f"subs of modality {name!r} has counts {counts}. Fix: give one count "
                             f">= 1 per microbatch.")
        lines.append(f"subs modality={_fmt_str(name)} counts={','.join(str(c) for c in counts)}")
    if program.microbatch_order:
        lines.append(f"order microbatches={','.join(str(i) for i in program.microbatch_order)}")
    lines.extend(_format_stage(s) for s in program.stages)
    for rank, stream in enumerate(program.streams):
        lines.append(f"rank {rank}:")
        lines.extend("  " + format_instruction(i) for i in stream)
    return "\n".join(lines) + "\n"


def _parse_str(key: str, value: str, quoted: bool, where: str) -> str:
    if not quoted and not _BARE_RE.match(value):
        raise IRParseError(f"{where}: malformed token '{key}={value}'. Fix: quote values with "
                           f"characters outside [A-Za-z0-9_.:/+@%-] as a JSON string.")
    return value


def _parse_int_list(key: str, value: str, quoted: bool, where: str) -> tuple[int, ...]:
    if quoted or not value:
        raise IRParseError(f"{where}: malformed token '{key}={value}'. "
                           f"Fix: write {key}=1,2 (omit the key when empty).")
    return tuple(_parse_int(key, v, False, where, minimum=0) for v in value.split(","))


def _parse_stage(rest: str, where: str) -> StageInfo:
    fields: dict[str, object] = {}
    for key, value, quoted in _split_kv(rest, where):
        if key in fields or (key == "loss" and "has_loss" in fields):
            raise IRParseError(f"{where}: key {key!r} given twice.")
        if key in ("id", "rank"):
            fields[key] = _parse_int(key, value, quoted, where, minimum=0)
        elif key == "modality":
            fields[key] = _parse_str(key, value, quoted, where)
        elif key in ("producers", "grad_producers"):
            fields[key] = _parse_int_list(key, value, quoted, where)
        elif key == "loads":
            names = value.split(",")
            if quoted or not all(_BARE_RE.match(v) for v in names):
                raise IRParseError(f"{where}: malformed token 'loads={value}'. "
                                   f"Fix: write loads=input_ids,labels.")
            fields[key] = tuple(names)
        elif key == "loss":
            if quoted or value != "1":
                raise IRParseError(f"{where}: malformed token 'loss={value}'. Fix: write loss=1 "
                                   f"or omit it.")
            fields["has_loss"] = True
        else:
            raise IRParseError(f"{where}: unknown key {key!r}. Fix: use id, rank, modality, "
                               f"producers, grad_producers, loads, loss.")
    for required in ("id", "rank", "modality"):
        if required not in fields:
            raise IRParseError(f"{where}: missing {required}=. Fix: every stage line names id, rank "
                               f"and modality.")
    return StageInfo(**fields)  # type: ignore[arg-type]


def parse_program(text: str) -> Program:
    """Inverse of :func:`dump_program`. Comment (``#``) and blank lines are ignored anywhere."""
    header_seen = False
    head: dict[str, object] | None = None
    stages: list[StageInfo] = []
    subs: list[tuple[str, tuple[int, ...]]] = []
    order: tuple[int, ...] | None = None
    streams: list[list[Instruction]] = []
    for lineno, raw in enumerate(text.split("\n"), start=1):
        line = raw.strip()
        where = f"line {lineno}"
        if not line:
            continue
        if line.startswith("#"):
            m = _HEADER_RE.match(line)
            if m is not None:
                if m.group(1) != str(FORMAT_VERSION):
                    raise IRParseError(f"{where}: format version {m.group(1)!r} in {line!r}; this "
                                       f"dipc reads v{FORMAT_VERSION}. Fix: re-dump the program with "
                                       f"this dipc version.")
                header_seen = True
            continue
        word, _, rest = line.partition(" ")
        if head is None:
            if word != "program":
                raise IRParseError(f"{where}: expected the 'program ...' line, got {line!r}. Fix: a "
                                   f"dump starts with '{HEADER}' then 'program schedule=... ranks=... "
                                   f"microbatches=...'.")
            if not header_seen:
                raise IRParseError(f"{where}: no '{HEADER}' header before the program line. Fix: add "
                                   f"it as the first line.")
            head = _parse_head(rest, f"{where}: {line!r}")
        elif word == "subs":
            if stages or streams:
                raise IRParseError(f"{where}: subs line {line!r} after a stage or rank line. "
                                   f"Fix: list subs lines right after the program line.")
            subs.append(_parse_subs(rest, f"{where}: {line!r}"))
        elif word == "order":
            if stages or streams or order is not None:
                raise IRParseError(f"{where}: order line {line!r} repeated or after a stage or rank line. "
                                   f"Fix: one order line, right after the program and subs lines.")
            key, value, quoted = _single_kv(rest, f"{where}: {line!r}")
            if key != "microbatches":
                raise IRParseError(f"{where}: unknown key {key!r}. Fix: write 'order microbatches=2,0,1'.")
            order = _parse_int_list(key, value, quoted, where)
        elif word == "stage":
            if streams:
                raise IRParseError(f"{where}: stage line {line!r} after the first rank section. "
                                   f"Fix: list all stages before 'rank 0:'.")
            stages.append(_parse_stage(rest, f"{where}: {line!r}"))
        elif word == "rank":
            m = _RANK_RE.match(line)
            if m is None:
                raise IRParseError(f"{where}: malformed rank header {line!r}. Fix: write 'rank <r>:'.")
            if int(m.group(1)) != len(streams):
                raise IRParseError(f"{where}: rank section {m.group(1)} out of order; expected rank "
                                   f"{len(streams)}. Fix: list ranks 0, 1, 2, ... once each.")
            streams.append([])
        elif word == "program":
            raise IRParseError(f"{where}: a second program line {line!r}. Fix: one program per text.")
        else:
            if not streams:
                raise IRParseError(f"{where}: instruction {line!r} before any 'rank <r>:' line. "
                                   f"Fix: put instructions under their rank.")
            try:
                streams[-1].append(parse_instruction(line))
            except IRParseError as e:
                raise IRParseError(f"{where}: {e}") from None
    if head is None:
        raise IRParseError(f"no 'program ...' line found. Fix: the text must start with '{HEADER}' "
                           f"and a program line.")
    return Program(stages=tuple(stages), streams=tuple(tuple(s) for s in streams), subs=tuple(subs),
                   microbatch_order=order or (), **head)  # type: ignore[arg-type]


def _single_kv(rest: str, where: str) -> tuple[str, str, bool]:
    pairs = list(_split_kv(rest, where))
    if len(pairs) != 1:
        raise IRParseError(f"{where}: expected one key=value. Fix: write 'order microbatches=2,0,1'.")
    return pairs[0]


def _parse_subs(rest: str, where: str) -> tuple[str, tuple[int, ...]]:
    fields: dict[str, object] = {}
    for key, value, quoted in _split_kv(rest, where):
        if key in fields:
            raise IRParseError(f"{where}: key {key!r} given twice.")
        if key == "modality":
            fields[key] = _parse_str(key, value, quoted, where)
        elif key == "counts":
            fields[key] = _parse_int_list(key, value, quoted, where)
        else:
            raise IRParseError(f"{where}: unknown key {key!r}. Fix: write 'subs modality=<name> "
                               f"counts=<n0>,<n1>,...'.")
    if "modality" not in fields or "counts" not in fields:
        raise IRParseError(f"{where}: a subs line needs modality= and counts=. Fix: write "
                           f"'subs modality=vision counts=3,1'.")
    return fields["modality"], fields["counts"]  # type: ignore[return-value]


def _parse_head(rest: str, where: str) -> dict[str, object]:
    head: dict[str, object] = {}
    attrs: list[tuple[str, str]] = []
    seen: set[str] = set()
    for key, value, quoted in _split_kv(rest, where):
        if key in seen:
            raise IRParseError(f"{where}: key {key!r} given twice.")
        seen.add(key)
        if key == "schedule":
            head["schedule"] = _parse_str(key, value, quoted, where)
        elif key == "ranks":
            head["num_ranks"] = _parse_int(key, value, quoted, where, minimum=0)
        elif key == "microbatches":
            head["num_microbatches"] = _parse_int(key, value, quoted, where, minimum=0)
        else:
            attrs.append((key, _parse_str(key, value, quoted, where)))
    missing = [k for k in _PROGRAM_RESERVED if k not in seen]
    if missing:
        raise IRParseError(f"{where}: missing {', '.join(k + '=' for k in missing)}. "
                           f"Fix: write 'program schedule=<name> ranks=<n> microbatches=<m>'.")
    head["attrs"] = tuple(attrs)
    return head


# --------------------------------------------------------------------------- grid

_LABEL = {Op.LOAD: "L", Op.FWD: "F", Op.BWD: "B", Op.BWD_I: "I", Op.BWD_W: "W",
          Op.SEND_ACT: "sA", Op.RECV_ACT: "rA", Op.SEND_GRAD: "sG", Op.RECV_GRAD: "rG",
          Op.REDUCE: "R", Op.OPTIM: "O"}


def instruction_label(instr: Instruction) -> str:
    """Short grid label: ``F3.1`` (FWD stage 3 mb 1), ``F0.1:2`` (its sub 2), ``sA3.1>4`` (send act to stage 4),
    ``rG3.1<4`` (receive grad from stage 4), ``L0.2``, ``O``."""
    label = _LABEL[instr.op]
    if instr.stage >= 0:
        label += str(instr.stage)
    if instr.mb >= 0:
        label += f".{instr.mb}"
    if instr.sub >= 0:
        label += f":{instr.sub}"
    if instr.other_stage >= 0:
        if instr.op in SEND_OPS:
            label += f">{instr.other_stage}"
        elif instr.op in RECV_OPS:
            label += f"<{instr.other_stage}"
        else:
            label += f"?{instr.other_stage}"
    return label


def format_grid(program: Program, mark: tuple[int, int] | None = None, *,
                max_rows: int | None = None) -> str:
    """A step x rank table of short labels (one row per step, one column per rank).

    ``mark=(rank, step)`` brackets that cell and ends its row with ``<-- here``; a step equal to
    the stream's length marks the end of that rank's stream (``[end]``). With ``max_rows``, a longer
    table shows only the rows around the mark (or the first rows) and says how many it left out.
    """
    streams = program.streams
    num_steps = max((len(s) for s in streams), default=0)
    if mark is not None and 0 <= mark[0] < len(streams) and mark[1] >= num_steps:
        num_steps = mark[1] + 1
    cols = []
    for rank, stream in enumerate(streams):
        cells = [instruction_label(i) for i in stream] + [""] * (num_steps - len(stream))
        if mark is not None and mark[0] == rank and 0 <= mark[1] < num_steps:
            cells[mark[1]] = f"[{cells[mark[1]] or 'end'}]"
        cols.append(cells)
    step_w = max(len("step"), len(str(max(num_steps - 1, 0))))
    widths = [max([len(f"rank {r}")] + [len(c) for c in col]) for r, col in enumerate(cols)]

    def row(first: str, cells: list[str]) -> str:
        body = "  ".join(c.ljust(w) for c, w in zip(cells, widths))
        return f"{first.rjust(step_w)}  {body}".rstrip()

    lo, hi = 0, num_steps
    if max_rows is not None and num_steps > max_rows:
        center = mark[1] if mark is not None else 0
        lo = max(0, min(center - max_rows // 2, num_steps - max_rows))
        hi = lo + max_rows
    lines = [row("step", [f"rank {r}" for r in range(len(cols))])]
    if lo > 0:
        lines.append(f"{'...'.rjust(step_w)}  ({lo} steps above)")
    for step in range(lo, hi):
        line = row(str(step), [col[step] for col in cols])
        if mark is not None and mark[1] == step:
            line += "   <-- here"
        lines.append(line)
    if hi < num_steps:
        lines.append(f"{'...'.rjust(step_w)}  ({num_steps - hi} steps below)")
    return "\n".join(lines) + "\n"
