"""Triton fused kernels with autograd and torch fallbacks, and the FX rewrite that uses them.

Modules (one op each): ``rms_norm``, ``layer_norm``, ``activations`` (SwiGLU, GELU), ``rope``
(incl. multi-axis tables), ``fused_linear_ce`` (chunked linear + cross-entropy); ``modules`` holds
the thin ``nn.Module`` faces and ``rewrite`` the FX pass (``rewrite_fused``) and the layer hook
(``fuse_module``).

Each fused op is a torch custom op (``torch.ops.dipc.<op>`` and ``<op>_backward``) with a fake
implementation and a SEMU cost entry, so shape tracing (SEMU's fake/meta tensors) sees one node
per op and costs what the kernel keeps and moves, not the torch fallback.

Nothing here is imported by ``import dipc.kernels`` itself, so a machine without triton pays
nothing until a kernel is used. Set ``TRITON_INTERPRET=1`` *before* importing
the submodules to run the kernels on CPU (tests do).
"""
