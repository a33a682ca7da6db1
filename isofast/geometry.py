"""Geometry beyond the identity: a data-space metric ``G`` and a latent metric ``M`` (docs/maths.md section 8).

The measures compare the pullback metric ``H = J^T G J`` with a latent metric ``M(z)``: the
isometry they ask for is ``H = M`` (``H = c M`` for the scaled one), i.e. the eigenvalues of
``M^{-1} H`` all 1 (all equal). Every estimator works on the *whitened Jacobian*

    ``J~ = R J S``, with ``G = R^T R`` and ``S S^T = M^{-1}``,

whose ``J~^T J~ = S^T H S`` is congruent to ``M^{-1} H``: it has the same eigenvalues and traces.
``R`` acts on tangent images (data side) and ``S`` on tangent vectors (latent side):

- :class:`DataMetric`: ``"diagonal"`` (per-output weights ``w > 0``, ``R = diag(sqrt w)``),
  ``"matrix"`` (a fixed SPD ``(D, D)`` matrix, ``R = L^T`` for its Cholesky factor ``G = L L^T``)
  or ``"product"`` (a callable ``(x, w) -> G(x) w``; no ``R``: the Grams are ``a^T G(x) b``);
- :class:`LatentMetric`: ``"conformal"`` (``M = lambda(z) I``, ``S = lambda^{-1/2}``; the built-in
  ``"sphere_stereographic"`` has ``lambda = 4 / (1 + |z|^2)^2``) or ``"matrix"`` (``M (B, m, m)``,
  ``S = L^{-T}`` for ``M = L L^T``).

``S`` depends on ``z``: tangent vectors ``S u`` carry that dependence into reverse mode, so the
gradient with respect to the codes includes the latent metric's own.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from isofast._checks import can_read_values

#: Built-in latent metrics: name -> (conformal factor of the codes ``z (B, m)``, description).
BUILTIN_LATENT_METRICS: dict[str, tuple[Callable[[Tensor], Tensor], str]] = {
    "sphere_stereographic": (
        lambda z: 4.0 / (1.0 + z.square().sum(-1)).square(),
        "the unit sphere in stereographic coordinates, M = 4 / (1 + |z|^2)^2 I",
    ),
}

#: Relative asymmetry above which a metric is refused as not symmetric (by dtype's precision).
_SYMMETRY_TOL = {torch.float64: 1e-10, torch.float32: 1e-4}


def _sym_tol(dtype: torch.dtype) -> float:
    return _SYMMETRY_TOL.get(dtype, 1e-2)


def _check_symmetric(a: Tensor, what: str) -> None:
    if not can_read_values():
        return
    scale = a.detach().abs().amax().clamp_min(torch.finfo(a.dtype).tiny)
    asym = float(((a - a.transpose(-1, -2)).detach().abs().amax() / scale))
    if asym > _sym_tol(a.dtype):
        raise ValueError(f"{what} must be symmetric, got a relative asymmetry of {asym:.3g}")


def check_product_gram(g: Tensor) -> None:
    """Refuse a product-form data metric from the Grams ``g (B, K, K)`` it produced: they must be
    symmetric with a non-negative diagonal (``w^T G(x) w >= 0``). Eager mode only."""
    if not can_read_values():
        return
    diag = torch.diagonal(g.detach(), dim1=1, dim2=2)
    if bool((diag < -1e-6 * g.detach().abs().amax()).any()):
        raise ValueError("data_metric(x, w) is not positive semi-definite: w^T G(x) w < 0 for a tangent image")
    _check_symmetric(g, "data_metric(x, w)")


def cholesky(a: Tensor, what: str) -> Tensor:
    """Lower Cholesky factor of SPD ``a (..., n, n)``; ``ValueError`` naming ``what`` if it is not SPD."""
    _check_symmetric(a, what)
    work = a if a.dtype in (torch.float32, torch.float64) else a.float()
    factor, info = torch.linalg.cholesky_ex(work)
    if can_read_values() and bool((info != 0).any()):
        raise ValueError(f"{what} must be symmetric positive definite; its Cholesky factorisation failed "
                         f"(leading minor {int(info[info != 0].flatten()[0])} is not positive)")
    return factor.to(a.dtype)


@dataclass(frozen=True)
class DataMetric:
    """The data-space metric ``G`` of ``H = J^T G J``; see :func:`data_metric`."""

    kind: str  # "diagonal", "matrix" or "product"
    weight: Tensor | None = None  # (D,) for "diagonal"
    factor: Tensor | None = None  # (D, D) lower Cholesky factor L of G = L L^T, for "matrix"
    product: Callable[[Tensor, Tensor], Tensor] | None = None

    def describe(self) -> str:
        if self.kind == "diagonal":
            return f"diagonal G: {self.weight.numel()} per-output weights"  # type: ignore[union-attr]
        if self.kind == "matrix":
            n = self.factor.shape[0]  # type: ignore[union-attr]
            return f"fixed SPD G ({n}, {n}), applied through its Cholesky factor"
        return "metric-vector product G(x) w (a callable; no D x D matrix is formed)"

    def check_size(self, d: int) -> None:
        """Refuse a tensor metric whose size is not the decoder's ``D`` outputs per sample."""
        n = self.weight.numel() if self.kind == "diagonal" else (  # type: ignore[union-attr]
            self.factor.shape[0] if self.kind == "matrix" else d)  # type: ignore[union-attr]
        if n != d:
            hint = " (an SPD (D, D) matrix goes through isofast.geometry.spd_matrix(G))" if n == d * d else ""
            raise ValueError(f"data_metric must match the decoder's D = {d} outputs per sample, got one of size {n}{hint}")

    def apply(self, x: Tensor, a: Tensor) -> tuple[Tensor, Tensor | None]:
        """For tangent images ``a (B, K, D)`` at outputs ``x (B, D)``: ``(R a, None)`` for the tensor
        forms (so that ``(R a)(R a)^T = a^T G a``), or ``(a, G(x) a)`` for the product form."""
        if self.kind == "diagonal":
            return a * self.weight.to(a.dtype).sqrt(), None  # type: ignore[union-attr]
        if self.kind == "matrix":
            return a @ self.factor.to(a.dtype), None  # type: ignore[union-attr]
        bsz, k, d = a.shape
        rows = x.unsqueeze(1).expand(bsz, k, d).reshape(bsz * k, d)
        ga = self.product(rows.to(a.dtype), a.reshape(bsz * k, d))  # type: ignore[misc]
        if not isinstance(ga, Tensor) or tuple(ga.shape) != (bsz * k, d):
            got = tuple(ga.shape) if isinstance(ga, Tensor) else type(ga).__name__
            raise ValueError(f"data_metric(x, w) must return G(x) w of w's shape ({bsz * k}, {d}), got {got}")
        return a, ga.to(a.dtype).reshape(bsz, k, d)

    def cotangent(self, noise: Tensor) -> Tensor:
        """``R^T w`` for data-space vectors ``w (B, D)``: ``J~^T w = S^T J^T R^T w``."""
        if self.kind == "diagonal":
            return noise * self.weight.to(noise.dtype).sqrt()  # type: ignore[union-attr]
        if self.kind == "matrix":
            return noise @ self.factor.to(noise.dtype).T  # type: ignore[union-attr]
        raise ValueError("the path_length measure needs G^(1/2): give data_metric as per-output weights or an "
                         "SPD matrix, not a metric-vector product")


def spd_matrix(g: Tensor) -> DataMetric:
    """A fixed symmetric positive definite data metric ``G (D, D)`` (for small outputs: it costs
    ``D^2`` per tangent image), to pass as ``data_metric``. Factorised once here."""
    if not isinstance(g, Tensor) or g.dim() != 2 or g.shape[0] != g.shape[1] or not g.is_floating_point():
        got = f"{g.dtype} of shape {tuple(g.shape)}" if isinstance(g, Tensor) else type(g).__name__
        raise ValueError(f"spd_matrix(G) needs a floating square tensor G (D, D), got {got}")
    return DataMetric("matrix", factor=cholesky(g, "data_metric G"))


def data_metric(value: object, z: Tensor | None = None) -> DataMetric | None:
    """Validate the ``data_metric`` argument: ``None``; positive per-output weights (a tensor with
    ``D`` entries, any shape, e.g. the decoder's output shape: a diagonal ``G``); a fixed SPD
    matrix wrapped by :func:`spd_matrix`; or a callable ``(x (N, D), w (N, D)) -> G(x) w (N, D)``
    acting on rows (decoder outputs and tangent images, flattened per sample). Tensors must be on
    the device of the codes ``z`` (when given)."""
    if value is None:
        return None
    if isinstance(value, DataMetric):
        tensor = value.weight if value.weight is not None else value.factor
        if z is not None and tensor is not None and tensor.device != z.device:
            raise ValueError(f"data_metric must be on z's device {z.device}, got one on {tensor.device}")
        return value
    if isinstance(value, Tensor):
        if not value.is_floating_point() or value.numel() == 0:
            raise ValueError(f"data_metric weights must be a non-empty floating tensor, got {value.dtype} of shape "
                             f"{tuple(value.shape)}")
        if z is not None and value.device != z.device:
            raise ValueError(f"data_metric must be on z's device {z.device}, got weights on {value.device}")
        w = value.reshape(-1)
        if can_read_values() and not bool(((w > 0) & torch.isfinite(w)).all()):
            raise ValueError("data_metric weights must be finite and > 0 (a positive definite diagonal G), got "
                             f"minimum {float(w.detach().min()):.3g}")
        return DataMetric("diagonal", weight=w)
    if callable(value):
        return DataMetric("product", product=value)  # type: ignore[arg-type]
    raise TypeError(f"data_metric must be None, a tensor of per-output weights, isofast.geometry.spd_matrix(G), or a "
                    f"callable (x, w) -> G(x) w; got {type(value).__name__}")


@dataclass(frozen=True)
class LatentMetric:
    """The latent metric ``M(z)`` the distortion is measured against; see :func:`latent_metric`."""

    kind: str  # "conformal" or "matrix"
    fn: Callable[[Tensor], Tensor]  # codes (B, m) -> (B,) conformal factors or (B, m, m) metrics
    name: str

    def describe(self) -> str:
        return f"{self.kind} latent metric: {self.name}"

    def whitening(self, z: Tensor) -> Tensor:
        """``S`` at codes ``z (B, *latent_shape)``: ``(B,)`` factors ``lambda^{-1/2}`` (conformal) or
        the ``(B, m, m)`` Cholesky factor ``L`` of ``M = L L^T`` (matrix; ``S = L^{-T}``)."""
        bsz, m = z.shape[0], z[0].numel()
        value = _evaluate(self.fn, z.reshape(bsz, m))
        if self.kind == "conformal":
            lam = value.reshape(bsz)
            if can_read_values() and not bool(((lam > 0) & torch.isfinite(lam)).all()):
                raise ValueError(f"latent_metric ({self.name}) must be positive definite: conformal factors must be "
                                 f"finite and > 0, got minimum {float(lam.detach().min()):.3g}")
            return lam.to(z.dtype).rsqrt()
        return cholesky(value.to(z.dtype), f"latent_metric ({self.name})")


def _evaluate(fn: Callable[[Tensor], Tensor], codes: Tensor) -> Tensor:
    """``fn(codes)`` checked to be ``(B,)``/``(B, 1)`` or ``(B, m, m)``."""
    bsz, m = codes.shape
    value = fn(codes)
    if not isinstance(value, Tensor) or tuple(value.shape) not in ((bsz,), (bsz, 1), (bsz, m, m)):
        got = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
        raise ValueError(f"latent_metric must return (B,) conformal factors or (B, m, m) metrics = ({bsz},) or "
                         f"({bsz}, {m}, {m}), got {got}")
    if not value.is_floating_point():
        raise TypeError(f"latent_metric must return a floating tensor, got {value.dtype}")
    return value


def latent_metric(value: object, z: Tensor) -> LatentMetric | None:
    """Validate the ``latent_metric`` argument for codes ``z (B, *latent_shape)``: ``None``, a
    built-in name (:data:`BUILTIN_LATENT_METRICS`), a fixed SPD ``(m, m)`` tensor, or a callable
    mapping codes ``(B, m)`` (flattened per sample) to ``(B,)`` conformal factors or ``(B, m, m)``
    metrics. A callable is evaluated once on the first code here to learn which of the two it is."""
    if value is None:
        return None
    m = z[0].numel()
    if isinstance(value, str):
        if value not in BUILTIN_LATENT_METRICS:
            raise ValueError(f"latent_metric must be one of {', '.join(map(repr, BUILTIN_LATENT_METRICS))}, a "
                             f"callable or an (m, m) tensor; got {value!r}")
        fn, desc = BUILTIN_LATENT_METRICS[value]
        return LatentMetric("conformal", fn, f"{value!r}, {desc}")
    if isinstance(value, Tensor):
        if value.device != z.device:
            raise ValueError(f"latent_metric must be on z's device {z.device}, got a tensor on {value.device}")
        if tuple(value.shape) != (m, m) or not value.is_floating_point():
            raise ValueError(f"latent_metric as a tensor must be a floating (m, m) = ({m}, {m}) SPD matrix, got "
                             f"{value.dtype} of shape {tuple(value.shape)}")
        cholesky(value, "latent_metric")  # refuse a matrix that is not SPD up front
        return LatentMetric("matrix", lambda c: value.to(c.dtype).expand(c.shape[0], m, m), f"fixed ({m}, {m}) matrix")
    if callable(value):
        with torch.no_grad():
            probe = _evaluate(value, z[:1].detach().reshape(1, m))  # type: ignore[arg-type]
        kind = "matrix" if probe.dim() == 3 and m > 1 else "conformal"
        if kind == "conformal" and probe.dim() == 3:  # m = 1: a (B, 1, 1) metric is a conformal factor
            return LatentMetric(kind, lambda c: value(c).reshape(c.shape[0]), getattr(value, "__name__", "callable"))
        return LatentMetric(kind, value, getattr(value, "__name__", type(value).__name__))  # type: ignore[arg-type]
    raise TypeError(f"latent_metric must be None, a built-in name, an (m, m) tensor or a callable z -> (B,) or "
                    f"(B, m, m); got {type(value).__name__}")


def whiten_vectors(s: Tensor, u: Tensor) -> Tensor:
    """``S u`` for vectors ``u (B, K, *latent_shape)``: ``u * lambda^{-1/2}`` or ``L^{-T} u``."""
    bsz, k = u.shape[:2]
    if s.dim() == 1:
        return u * s.reshape(bsz, *([1] * (u.dim() - 1)))
    flat = u.reshape(bsz, k, -1).transpose(1, 2)  # (B, m, K)
    v = torch.linalg.solve_triangular(s.transpose(1, 2), flat, upper=True)
    return v.transpose(1, 2).reshape(u.shape)


def whiten_covectors(s: Tensor, g: Tensor) -> Tensor:
    """``S^T g`` for latent covectors ``g (B, K, m)`` (e.g. ``J^T a``): ``g * lambda^{-1/2}`` or ``L^{-1} g``."""
    if s.dim() == 1:
        return g * s.reshape(-1, 1, 1).to(g.dtype)
    out = torch.linalg.solve_triangular(s.to(g.dtype), g.transpose(1, 2), upper=False)
    return out.transpose(1, 2)


def whiten_metric(s: Tensor, h: Tensor) -> Tensor:
    """``S^T H S`` for metrics ``h (B, m, m)``: ``H / lambda`` or ``L^{-1} H L^{-T}``."""
    if s.dim() == 1:
        return h * s.square().reshape(-1, 1, 1).to(h.dtype)
    half = torch.linalg.solve_triangular(s.to(h.dtype), h, upper=False)  # L^{-1} H
    return torch.linalg.solve_triangular(s.to(h.dtype), half.transpose(1, 2), upper=False).transpose(1, 2)


@dataclass(frozen=True)
class Geometry:
    """The metrics of one call: ``data`` (``G``) and ``latent`` (``M``), either ``None`` for the identity."""

    data: DataMetric | None = None
    latent: LatentMetric | None = None

    def __bool__(self) -> bool:
        return self.data is not None or self.latent is not None

    def whitening(self, z: Tensor) -> Tensor | None:
        """The latent side ``S`` at codes ``z`` (see :meth:`LatentMetric.whitening`), ``None`` for ``M = I``."""
        return None if self.latent is None else self.latent.whitening(z)


IDENTITY = Geometry()
