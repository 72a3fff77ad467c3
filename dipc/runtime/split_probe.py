"""Which stages' BWD_W runs the whole backward instead of only the weight-gradient nodes.

:func:`dipc.runtime.split_backward.backward_input` falls back to one whole walk in BWD_W when a
parameter hangs below the activation path at several depths (a DiT's conditioning MLP feeding
every block, tied weights). That doubles what zero-bubble schedules cost on such a stage, so
SEMU must know it before a program runs. The decision depends on the stage's graph structure, not
on the batch, so one probe forward per stage on the captured example values answers it; nothing
is backpropagated and no gradient is touched.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from dipc.passes.capture import CapturedModel
from dipc.passes.partition import StageSpec
from dipc.runtime.interpreter import _attached, _grad_leaves
from dipc.runtime.split_backward import walks_whole

__all__ = ["whole_wgrad_stages"]


def _stage_inputs(captured: CapturedModel, stage: StageSpec) -> tuple[list, list[torch.Tensor]]:
    """The stage's arguments on the example batch (as the interpreter's FWD passes them) and the
    input leaves that take a gradient."""
    values = captured.example_values
    by_key = {n.target: values.get(n.name) for n in captured.graph_module.graph.nodes if n.op == "placeholder"}
    args = [by_key[k] for k in stage.input_keys]
    leaves: list[torch.Tensor] = []
    for name, _ in stage.input_values:
        value = values[name]
        if name in stage.grad_values:
            value = _attached(value)
            leaves.extend(_grad_leaves(value))
        args.append(value)
    return args, leaves


def whole_wgrad_stages(captured: CapturedModel, stages: Sequence[StageSpec]) -> frozenset[int]:
    """Ids of the stages (with input gradients) whose split backward walks whole in BWD_W."""
    whole = set()
    for st in stages:
        params = [p for p in st.params if p.requires_grad]
        if not st.grad_producers or not params:
            continue   # no input gradients: SEMU already costs BWD_W as the whole backward
        args, leaves = _stage_inputs(captured, st)
        with torch.enable_grad():
            outs = st.module(*args)
        roots = [l for name, v in zip(st.output_values, outs) if name in st.grad_values
                 for l in _grad_leaves(v) if l.requires_grad]
        if st.has_loss and isinstance(outs[-1], torch.Tensor) and outs[-1].requires_grad:
            roots.append(outs[-1])
        if walks_whole(roots, leaves, params):
            whole.add(st.id)
        del outs, roots, args, leaves
    return frozenset(whole)
