"""The contract every backend implements: forward and hand-written backward of the fused ops.

Shapes (``B`` batch, ``m`` latent width, ``K`` probes, ``L`` layers, ``d_l`` layer widths):

- ``weights``: ``L`` tensors ``(d_l, d_{l-1})``; ``biases``: ``L`` tensors ``(d_l,)`` or ``None``;
  ``acts``: ``L`` :class:`~isofast.activations.Activation` records.
- ``mlp_pullback``: ``z (B, m)`` -> ``H (B, m, m)``, the exact pullback metric ``J^T W J``.
- ``mlp_hutchinson``: ``z (B, m)``, ``probes (B, K, m)`` -> ``stats (B, K, 2)`` with
  ``stats[..., 0] = sum_d w_d (J v_k)_d^2`` and ``stats[..., 1] = ||J^T W J v_k||^2``.
- ``data_weight``: the diagonal data-space metric ``W = diag(w)``, ``w`` a ``(D,)`` tensor
  (``D`` the MLP's output width) of ``z``'s dtype and device, positive and finite (the caller
  validates), a constant (no gradient is returned for it); ``None`` is ``W = I`` and costs nothing.
  Every method takes it; only backends with :attr:`Backend.diagonal_data_metric` accept a tensor,
  and the backward receives the forward's ``data_weight`` again.

A forward returns ``(output, saved)``: ``saved`` is a tuple of tensors the autograd function keeps
for the backward (``ctx.save_for_backward``), whatever the backend needs. A backward returns
``(grad_z, grad_weights, grad_biases)`` (``grad_biases[l]`` is ``None`` where ``biases[l]`` was).
Outputs (``H``, ``stats``) are in the accumulation dtype, :func:`acc_dtype` of the inputs'
(float32 for half, bfloat16 and float32 inputs, float64 for float64): traces and Grams are never
rounded to half precision. Gradients are in the dtypes of the tensors they belong to.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor

from isofast.activations import Activation

def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype traces, Grams and losses accumulate in: float32 or wider (docs/maths.md section 7)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


#: torch < 2.4 has per-device autocast queries only (no device argument).
_LEGACY_AUTOCAST = not hasattr(torch, "get_autocast_dtype")


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The dtype torch.autocast casts GEMMs to on ``device``'s type, or ``None`` outside autocast."""
    kind = device.type
    if kind not in ("cpu", "cuda"):
        return None
    if _LEGACY_AUTOCAST:
        if kind == "cpu":
            return torch.get_autocast_cpu_dtype() if torch.is_autocast_cpu_enabled() else None
        return torch.get_autocast_gpu_dtype() if torch.is_autocast_enabled() else None
    return torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else None


Grads = tuple[Tensor | None, list[Tensor], list[Tensor | None]]


class CompileResult(NamedTuple):
    """One kernel of :meth:`Backend.compile_check`. ``stats``: its resource-usage records
    (:mod:`isofast.compile_stats`: registers, spills, stack, shared memory), empty when the
    compiler reported none."""

    kernel: str
    ok: bool
    message: str
    stats: list[dict[str, Any]]


class Backend:
    """Base class of a backend. A backend implements, as its own methods, exactly the ops that
    :data:`isofast.dispatch.TABLE` marks :class:`~isofast.dispatch.Native` for it (the stubs below
    state the fused ops' signatures); for the others the table names a fallback backend.
    ``tangent_gram``, ``tangent_sqnorm`` and the spectral ops (:mod:`isofast.spectral`) are methods
    of one tensor argument, e.g. ``x (B, K, D) -> (B, K, K)`` and ``H (B, m, m) -> (B,)``."""

    name: str = "base"
    #: Whether the op methods accept a ``data_weight`` tensor (the metric ``J^T diag(w) J``);
    #: backends without it take ``data_weight=None`` only.
    diagonal_data_metric: bool = False

    def availability(self) -> tuple[bool, str]:
        """``(True, "")`` if the backend can run in this process, else ``(False, why)``."""
        return True, ""

    def supports(self, device: torch.device, dtype: torch.dtype = torch.float32) -> tuple[bool, str]:
        """Whether tensors of ``dtype`` on ``device`` can run here, and why not."""
        return True, ""

    def compile_check(self) -> list[CompileResult]:
        """Compile this backend's kernels without running them (no GPU needed): one
        :class:`CompileResult` per kernel. ``isofast doctor --compile-check`` runs it."""
        return []

    def build(self) -> tuple[bool, str]:
        """Build whatever the backend needs ahead of time (``isofast doctor --build``)."""
        return True, "nothing to build"

    def mlp_pullback_forward(
        self,
        z: Tensor,
        weights: Sequence[Tensor],
        biases: Sequence[Tensor | None],
        acts: Sequence[Activation],
        data_weight: Tensor | None = None,
    ) -> tuple[Tensor, tuple[Tensor, ...]]:
        raise NotImplementedError

    def mlp_pullback_backward(
        self,
        grad_h: Tensor,
        weights: Sequence[Tensor],
        has_bias: Sequence[bool],
        acts: Sequence[Activation],
        saved: Sequence[Tensor],
        data_weight: Tensor | None = None,
    ) -> Grads:
        raise NotImplementedError

    def mlp_hutchinson_forward(
        self,
        z: Tensor,
        probes: Tensor,
        weights: Sequence[Tensor],
        biases: Sequence[Tensor | None],
        acts: Sequence[Activation],
        data_weight: Tensor | None = None,
    ) -> tuple[Tensor, tuple[Tensor, ...]]:
        raise NotImplementedError

    def mlp_hutchinson_backward(
        self,
        grad_stats: Tensor,
        weights: Sequence[Tensor],
        has_bias: Sequence[bool],
        acts: Sequence[Activation],
        saved: Sequence[Tensor],
        data_weight: Tensor | None = None,
    ) -> Grads:
        raise NotImplementedError

    def refuse_data_weight(self, data_weight: Tensor | None) -> None:
        """Raise if handed a ``data_weight`` this backend does not implement (a ``None`` passes)."""
        if data_weight is not None and not self.diagonal_data_metric:
            raise NotImplementedError(
                f"the {self.name!r} backend has no diagonal data-space metric (data_weight): run the op on a "
                "backend whose diagonal_data_metric is True (torch, cpu)"
            )

    def __repr__(self) -> str:
        return f"<isofast backend {self.name!r}>"
