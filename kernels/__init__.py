"""Triton kernels of isofast's fused MLP path (installed as ``isofast.kernels``).

One file per op, named like the op: ``mlp_stream`` (the shared multi-stream linear layer:
forward, dgrad and wgrad kernels with the activation gating fused in), ``mlp_pullback`` (the
Gram-reducing last layer and its backward) and ``mlp_hutchinson`` (the VJP chain); ``launch``
computes every kernel's tiles, grid, warps and activation arguments. Importing this
package imports Triton but compiles nothing; kernels compile on first launch, or ahead of time
through ``isofast doctor --compile-check``. Use them through the ``"triton"`` backend
(:mod:`isofast.backends.triton_backend`), not directly.
"""

from . import launch, mlp_hutchinson, mlp_pullback, mlp_stream

__all__ = ["launch", "mlp_hutchinson", "mlp_pullback", "mlp_stream"]
