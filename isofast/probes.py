"""Probe draws for the trace estimators (docs/maths.md section 3).

Two distributions, both with ``E[u u^T] = I`` so ``E ||J u||^2 = Tr H``:

- ``"gaussian"``: ``u ~ N(0, I)``, independent across probes (Hutchinson, and the first-order
  estimator when the caller passes probes or asks for more probes than latent dimensions);
- ``"orthonormal"``: per sample, ``K <= m`` probes ``u_k = sqrt(m) q_k`` with ``q_1..q_K`` the
  first ``K`` columns of a uniformly (Haar) distributed orthogonal matrix. The first-order
  estimator built on them is exact at ``K = m`` and wherever ``H`` is a multiple of the identity,
  which is where an isometry regulariser drives the decoder.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

PROBE_DISTRIBUTIONS = ("gaussian", "orthonormal")


def draw(distribution: str, z: Tensor, k: int, generator: torch.Generator | None = None) -> Tensor:
    """``(B, K, *latent_shape)`` probes for codes ``z (B, *latent_shape)``, on ``z``'s device and dtype."""
    if distribution == "gaussian":
        return torch.randn(z.shape[0], k, *z.shape[1:], generator=generator, device=z.device, dtype=z.dtype)
    if distribution == "orthonormal":
        return orthonormal_probes(z, k, generator)
    raise ValueError(f"distribution must be one of {PROBE_DISTRIBUTIONS}, got {distribution!r}")


def orthonormal_probes(z: Tensor, k: int, generator: torch.Generator | None = None) -> Tensor:
    """``(B, K, *latent_shape)``: per sample ``sqrt(m)`` times ``K`` Haar-distributed orthonormal vectors.

    The QR factorisation of a Gaussian ``(m, K)`` matrix gives such a frame once each column is
    multiplied by the sign of ``R``'s diagonal (without it the frame's distribution depends on
    the QR algorithm's sign convention). Factorised in fp32 or wider, then cast to ``z``'s dtype.
    """
    bsz, m = z.shape[0], z[0].numel()
    if not 1 <= k <= m:
        raise ValueError(f"an orthonormal frame has 1 to m = {m} vectors, got K = {k}")
    work = torch.float64 if z.dtype == torch.float64 else torch.float32
    g = torch.randn(bsz, m, k, generator=generator, device=z.device, dtype=work)
    q, r = torch.linalg.qr(g)
    sign = torch.where(torch.diagonal(r, dim1=1, dim2=2) < 0, -1.0, 1.0).to(work)
    frame = (q * sign.unsqueeze(1)).transpose(1, 2) * math.sqrt(m)
    return frame.reshape(bsz, k, *z.shape[1:]).to(z.dtype)
