"""Values that cross stages: pytrees whose leaves are tensors or Python scalars.

A message is the flat list of leaves of the values an edge carries. Its ``TensorSpec`` list is
known at plan time, so the receiver allocates without any shape handshake. Python scalars
(sizes computed in one stage and used in another) travel as 0-d tensors.
"""
from __future__ import annotations

from typing import Any, Iterable

import torch
from torch.utils._pytree import tree_flatten

from dipc.ir import TensorSpec

# TensorSpec stores torch's dtype name ("float32"); the text dump prints its short form ("f32").
DTYPE_NAMES: dict[torch.dtype, str] = {
    d: str(d).removeprefix("torch.") for d in (torch.float16, torch.bfloat16, torch.float32, torch.float64,
                                               torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8,
                                               torch.bool)
}
DTYPES = {v: k for k, v in DTYPE_NAMES.items()}
_SCALAR_DTYPES = {"int": torch.int64, "float": torch.float64, "bool": torch.bool}


def leaves_of(values: Iterable[Any]) -> list[Any]:
    out: list[Any] = []
    for v in values:
        out.extend(tree_flatten(v)[0])
    return out


def spec_of(leaf: Any) -> TensorSpec:
    if isinstance(leaf, torch.Tensor):
        if leaf.dtype not in DTYPE_NAMES:
            raise TypeError(f"dtype {leaf.dtype} cannot cross a stage boundary")
        return TensorSpec(kind="tensor", dtype=DTYPE_NAMES[leaf.dtype], shape=tuple(int(d) for d in leaf.shape))
    if isinstance(leaf, bool):
        return TensorSpec(kind="bool")
    if isinstance(leaf, int):
        return TensorSpec(kind="int")
    if isinstance(leaf, float):
        return TensorSpec(kind="float")
    raise TypeError(f"a value of type {type(leaf).__name__} cannot cross a stage boundary")


def is_grad_leaf(leaf: Any) -> bool:
    """Leaves that carry a gradient across a stage boundary (when their value needs grads)."""
    return isinstance(leaf, torch.Tensor) and leaf.is_floating_point()


def to_wire(leaf: Any) -> torch.Tensor:
    if isinstance(leaf, torch.Tensor):
        return leaf.detach().contiguous()
    if isinstance(leaf, bool):
        return torch.tensor(leaf, dtype=torch.bool)
    if isinstance(leaf, int):
        return torch.tensor(leaf, dtype=torch.int64)
    return torch.tensor(float(leaf), dtype=torch.float64)


def dtype_for(spec: TensorSpec) -> torch.dtype:
    """The dtype a leaf with this spec travels as (Python scalars as 0-d tensors)."""
    return DTYPES[spec.dtype] if spec.kind == "tensor" else _SCALAR_DTYPES[spec.kind]


def empty_for(spec: TensorSpec, device: torch.device | str = "cpu") -> torch.Tensor:
    if spec.kind == "tensor":
        return torch.empty(spec.shape, dtype=DTYPES[spec.dtype], device=device)
    return torch.empty((), dtype=_SCALAR_DTYPES[spec.kind], device=device)


def from_wire(t: torch.Tensor, spec: TensorSpec) -> Any:
    if spec.kind == "tensor":
        return t
    return {"int": int, "float": float, "bool": bool}[spec.kind](t.item())
