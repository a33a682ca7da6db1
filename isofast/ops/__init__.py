"""Autograd functions of the fused MLP path: a first-order graph over backend kernels."""

from isofast.ops.mlp_hutchinson import mlp_hutchinson
from isofast.ops.mlp_pullback import mlp_pullback

__all__ = ["mlp_hutchinson", "mlp_pullback"]
