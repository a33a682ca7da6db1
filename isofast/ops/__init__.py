"""Autograd functions: the fused MLP path (a first-order graph over backend kernels) and the
generic path's tangent-image reductions."""

from isofast.ops.mlp_hutchinson import mlp_hutchinson
from isofast.ops.mlp_pullback import mlp_pullback
from isofast.ops.tangent_gram import tangent_gram, tangent_sqnorm

__all__ = ["mlp_hutchinson", "mlp_pullback", "tangent_gram", "tangent_sqnorm"]
