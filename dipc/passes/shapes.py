"""Plan-time shape inference: the exact specs of every message of one microbatch.

Stages run in order under ``FakeTensorMode`` on the microbatch's shapes, so the plan knows each
receive's shapes and dtypes before anything runs (no padding, no runtime shape handshake).
Results are cached by the microbatch's input shape signature.
"""
from __future__ import annotations

from typing import Any, Mapping

import torch
from torch.utils._pytree import tree_flatten, tree_map

from dipc.errors import BatchError
from dipc.ir import TensorSpec
from dipc.passes.partition import StageSpec
from dipc.runtime.values import is_grad_leaf, leaves_of, spec_of

EdgeSpecs = dict[tuple[int, int], tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]]


def batch_signature(batch: Mapping[str, Any]) -> tuple:
    return tuple((k, tuple(v.shape), str(v.dtype)) if isinstance(v, torch.Tensor) else (k, repr(v))
                 for k, v in sorted(batch.items()))


def grad_leaves(stage: StageSpec, names: list[str], values: Mapping[str, Any]) -> list[Any]:
    """The leaves of ``names`` that carry gradients, in message order."""
    out = []
    for n in names:
        if n in stage.grad_values:
            out.extend(l for l in tree_flatten(values[n])[0] if is_grad_leaf(l))
    return out


class ShapeInference:
    def __init__(self, stages: list[StageSpec]):
        self.stages = stages
        self._cache: dict[tuple, EdgeSpecs] = {}

    def edge_specs(self, batch: Mapping[str, Any]) -> EdgeSpecs:
        key = batch_signature(batch)
        if key not in self._cache:
            self._cache[key] = self._infer(batch)
        return self._cache[key]

    def _infer(self, batch: Mapping[str, Any]) -> EdgeSpecs:
        from torch._subclasses.fake_tensor import FakeTensorMode

        values: dict[str, Any] = {}
        specs: EdgeSpecs = {}
        with FakeTensorMode(allow_non_fake_inputs=True) as mode:
            fake_batch = {k: mode.from_tensor(v) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
            for st in self.stages:
                try:
                    args = [fake_batch[k] for k in st.input_keys] + [values[v] for v, _ in st.input_values]
                except KeyError as e:
                    raise BatchError(f"stage {st.id} reads batch key {e.args[0]!r}, which this batch lacks "
                                     f"(keys: {sorted(batch)}). Fix: give every microbatch the keys of the "
                                     "example batch.") from None
                with torch.no_grad():
                    outs = st.module(*args)
                for name, val in zip(st.output_values, outs):
                    values[name] = val
            for st in self.stages:
                for p in st.producers:
                    names = st.values_from(p)
                    act = tuple(spec_of(l) for l in leaves_of(values[n] for n in names))
                    grad = tuple(spec_of(l) for l in grad_leaves(st, names, values))
                    specs[(p, st.id)] = (act, grad)
        return specs
