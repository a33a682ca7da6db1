"""Data-space and latent metrics (``data_metric``, ``latent_metric``) and the path-length measure,
against float64 brute force: ``H = J^T G J`` from per-sample Jacobians, and the measures from the
eigenvalues (traces, log-determinant) of ``M^{-1} H`` computed by linear solves, independently of
the Cholesky whitening the library uses."""

from __future__ import annotations

import math

import pytest
import torch

import isofast
from isofast.geometry import spd_matrix
from conftest import GRAD_RTOL, RTOL, ConvDecoder, jacobian_brute_force, make_mlp, positive_weight, rel_err

M_LATENT, D_CONV = 3, 64


def _spd(n: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(n, n, generator=gen, dtype=torch.float64)
    return a @ a.T / n + 0.5 * torch.eye(n, dtype=torch.float64)


class Product:
    """An output-dependent metric ``G(x) = diag(1 + x^2) + c c^T`` as a metric-vector product."""

    def __init__(self, d: int) -> None:
        self.c = torch.linspace(-1, 1, d, dtype=torch.float64)

    def __call__(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return (1 + x.square()) * w + (w @ self.c.to(w.dtype))[:, None] * self.c.to(w.dtype)

    def matrix(self, x: torch.Tensor) -> torch.Tensor:
        """``G(x) (B, D, D)`` for outputs ``x (B, D)``."""
        return torch.diag_embed(1 + x.square()) + torch.outer(self.c, self.c)


def latent_matrix(z: torch.Tensor) -> torch.Tensor:
    """A code-dependent SPD latent metric ``M(z) (B, m, m)``."""
    m = z.shape[1]
    base = _spd(m, 11).to(z.dtype)
    return base + torch.diag_embed(z.square()) + 0.3 * torch.tanh(z)[:, :, None] * torch.tanh(z)[:, None, :]


def sphere_factor(z: torch.Tensor) -> torch.Tensor:
    return 4.0 / (1.0 + z.square().sum(-1)).square()


DATA_FORMS = ["identity", "diagonal", "matrix", "product"]
LATENT_FORMS = ["identity", "sphere", "matrix"]


def _data_metric(form: str, d: int):
    """``(argument to pass, brute-force G(x) (B, D, D) callable or None)``."""
    if form == "identity":
        return None, None
    if form == "diagonal":
        w = positive_weight(d, seed=3)
        return w, lambda x: torch.diag_embed(w.expand(x.shape[0], d))
    if form == "matrix":
        g = _spd(d, 5)
        return spd_matrix(g), lambda x: g.expand(x.shape[0], d, d)
    prod = Product(d)
    return prod, prod.matrix


def _latent_metric(form: str):
    """``(argument to pass, brute-force M(z) (B, m, m) callable or None)``."""
    if form == "identity":
        return None, None
    if form == "sphere":
        return "sphere_stereographic", lambda z: sphere_factor(z)[:, None, None] * torch.eye(z.shape[1], dtype=z.dtype)
    return latent_matrix, latent_matrix


def relative_brute_force(decoder, z, g_of_x=None, m_of_z=None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A = M^{-1} J^T G J (B, m, m), x (B, D))``, differentiable, by linear solves."""
    j = jacobian_brute_force(decoder, z)
    x = decoder(z).reshape(z.shape[0], -1)
    h = j.transpose(1, 2) @ (j if g_of_x is None else g_of_x(x) @ j)
    return (h if m_of_z is None else torch.linalg.solve(m_of_z(z), h)), x


def measure_brute_force(measure: str, a: torch.Tensor, m_of_z=None, z=None) -> torch.Tensor:
    """The measure from ``A = M^{-1} H``: traces of ``A`` and ``A^2``, ``logdet A``."""
    tr = torch.diagonal(a, dim1=1, dim2=2).sum(-1)
    tr2 = torch.diagonal(a @ a, dim1=1, dim2=2).sum(-1)
    m = a.shape[-1]
    if measure == "scaled_isometry":
        return tr2.mean() / tr.mean() ** 2
    if measure == "isometry":
        return (tr2 - 2 * tr + m).mean()
    if measure == "conformal":
        return (tr2 / tr**2).mean()
    if measure == "jacobian_frobenius":
        return tr.mean()
    if measure == "volume":
        logdet = torch.linalg.slogdet(a)[1]
        return (logdet - logdet.mean()).square().mean()
    raise AssertionError(measure)


def _grads_close(value, ref, params, tol) -> None:
    for g, w in zip(*(torch.autograd.grad(v, params, allow_unused=True, materialize_grads=True, retain_graph=True)
                             for v in (value, ref))):
        assert rel_err(g, w) < tol


def _decoder(kind: str):
    if kind == "conv":
        return ConvDecoder(m=M_LATENT, seed=2), D_CONV
    return make_mlp([M_LATENT, 12, 10, 9], act="softplus", out_act="sigmoid", seed=4), 9


@pytest.mark.parametrize("latent", LATENT_FORMS)
@pytest.mark.parametrize("data", DATA_FORMS)
@pytest.mark.parametrize("measure", list(isofast.MEASURES))
def test_exact_measures_every_metric_form(measure: str, data: str, latent: str) -> None:
    """Generic path, exact estimator: values and gradients (codes and parameters) against brute force."""
    dec, d = _decoder("conv")
    dm, g_of_x = _data_metric(data, d)
    lm, m_of_z = _latent_metric(latent)
    z = torch.randn(4, M_LATENT, dtype=torch.float64, requires_grad=True)
    value = isofast.distortion(dec, z, measure, eta=None, estimator="exact", data_metric=dm, latent_metric=lm)
    ref = measure_brute_force(measure, relative_brute_force(dec, z, g_of_x, m_of_z)[0])
    assert rel_err(value, ref) < RTOL[torch.float64] * 10
    _grads_close(value, ref, [z, *dec.parameters()], GRAD_RTOL[torch.float64] * 10)


@pytest.mark.parametrize("measure", list(isofast.MEASURES))
def test_fused_mlp_every_measure_with_diagonal_data_and_matrix_latent(measure: str) -> None:
    """The fused path's exact op with the diagonal metric in its epilogue, whitened afterwards."""
    dec, d = _decoder("mlp")
    assert isofast.plan(dec, torch.zeros(1, M_LATENT, dtype=torch.float64), measure, estimator="exact",
                        data_metric=positive_weight(d), latent_metric=latent_matrix).path == "fused_mlp"
    dm, g_of_x = _data_metric("diagonal", d)
    z = torch.randn(5, M_LATENT, dtype=torch.float64, requires_grad=True)
    value = isofast.distortion(dec, z, measure, eta=None, estimator="exact", data_metric=dm, latent_metric=latent_matrix)
    ref = measure_brute_force(measure, relative_brute_force(dec, z, g_of_x, latent_matrix)[0])
    assert rel_err(value, ref) < RTOL[torch.float64] * 10
    _grads_close(value, ref, [z, *dec.parameters()], GRAD_RTOL[torch.float64] * 10)


@pytest.mark.parametrize("latent", LATENT_FORMS)
@pytest.mark.parametrize("data", DATA_FORMS)
def test_forward_estimator_on_a_full_frame_is_exact(data: str, latent: str) -> None:
    """The first-order estimator with K = m orthonormal directions gives the exact traces of the
    whitened metric, so its values and gradients must equal brute force."""
    dec, d = _decoder("conv")
    dm, g_of_x = _data_metric(data, d)
    lm, m_of_z = _latent_metric(latent)
    z = torch.randn(4, M_LATENT, dtype=torch.float64, requires_grad=True)
    value = isofast.distortion(dec, z, "isometry", eta=None, estimator="forward", n_probes=M_LATENT,
                               data_metric=dm, latent_metric=lm, generator=torch.Generator().manual_seed(0))
    ref = measure_brute_force("isometry", relative_brute_force(dec, z, g_of_x, m_of_z)[0])
    assert rel_err(value, ref) < RTOL[torch.float64] * 100
    _grads_close(value, ref, [z, *dec.parameters()], GRAD_RTOL[torch.float64] * 100)


def _whitened_jacobian(dec, z, g_of_x, m_of_z):
    """``J~ = R J S`` by brute force (``G = R^T R`` with ``R`` the transposed Cholesky factor of ``G``,
    ``S = L^{-T}`` for ``M = L L^T``), the frame the Hutchinson estimator's per-probe values use."""
    j = jacobian_brute_force(dec, z)
    x = dec(z).reshape(z.shape[0], -1)
    if g_of_x is not None:
        j = torch.linalg.cholesky(g_of_x(x)).transpose(1, 2) @ j
    if m_of_z is not None:
        lm = torch.linalg.cholesky(m_of_z(z))
        j = torch.linalg.solve_triangular(lm, j.transpose(1, 2), upper=False).transpose(1, 2)  # J L^{-T}
    return j


@pytest.mark.parametrize("decoder", ["conv", "mlp"])
@pytest.mark.parametrize(("data", "latent"), [("diagonal", "sphere"), ("matrix", "matrix"), ("product", "sphere"),
                                               ("identity", "matrix")])
def test_hutchinson_with_given_probes(decoder: str, data: str, latent: str) -> None:
    """Hutchinson's per-probe statistics ``||J~ u||^2`` and ``||J~^T J~ u||^2`` on the given probes."""
    dec, d = _decoder(decoder)
    dm, g_of_x = _data_metric(data, d)
    lm, m_of_z = _latent_metric(latent)
    z = torch.randn(5, M_LATENT, dtype=torch.float64, requires_grad=True)
    u = torch.randn(5, 2, M_LATENT, dtype=torch.float64)
    value = isofast.distortion(dec, z, "isometry", eta=None, estimator="hutchinson", probes=u,
                               data_metric=dm, latent_metric=lm)
    jt = _whitened_jacobian(dec, z, g_of_x, m_of_z)
    ju = torch.einsum("bdm,bkm->bkd", jt, u)
    tr = ju.square().sum(-1).mean(-1)
    tr2 = torch.einsum("bdm,bkd->bkm", jt, ju).square().sum(-1).mean(-1)
    ref = (tr2 - 2 * tr + M_LATENT).mean()
    assert rel_err(value, ref) < RTOL[torch.float64] * 100
    _grads_close(value, ref, [z, *dec.parameters()], GRAD_RTOL[torch.float64] * 100)


def test_fused_mlp_hutchinson_with_a_conformal_latent_metric() -> None:
    """The fused Hutchinson op's traces divided by ``lambda``, ``lambda^2`` (values and gradients)."""
    dec, d = _decoder("mlp")
    z = torch.randn(6, M_LATENT, dtype=torch.float64, requires_grad=True)
    u = torch.randn(6, 1, M_LATENT, dtype=torch.float64)
    p = isofast.plan(dec, z, "scaled_isometry", probes=u, latent_metric="sphere_stereographic")
    assert p.path == "fused_mlp" and p.estimator == "hutchinson" and "lambda" in p.reasons["geometry"]
    value = isofast.distortion(dec, z, "scaled_isometry", eta=None, probes=u, latent_metric="sphere_stereographic")
    jt = _whitened_jacobian(dec, z, None, _latent_metric("sphere")[1])
    ju = torch.einsum("bdm,bkm->bkd", jt, u)
    tr = ju.square().sum(-1).mean(-1)
    tr2 = torch.einsum("bdm,bkd->bkm", jt, ju).square().sum(-1).mean(-1)
    ref = tr2.mean() / tr.mean() ** 2
    assert rel_err(value, ref) < RTOL[torch.float64] * 100
    _grads_close(value, ref, [z, *dec.parameters()], GRAD_RTOL[torch.float64] * 100)


@pytest.mark.parametrize(("data", "latent"), [("diagonal", "matrix"), ("product", "sphere")])
def test_pullback_metric_in_the_latent_metrics_frame(data: str, latent: str) -> None:
    """``pullback_metric`` returns ``L^{-1} J^T G J L^{-T}``: the eigenvalues of ``M^{-1} H``."""
    dec, d = _decoder("conv")
    dm, g_of_x = _data_metric(data, d)
    lm, m_of_z = _latent_metric(latent)
    z = torch.randn(4, M_LATENT, dtype=torch.float64)
    got = isofast.pullback_metric(dec, z, data_metric=dm, latent_metric=lm)
    a, _ = relative_brute_force(dec, z, g_of_x, m_of_z)
    want = torch.sort(torch.linalg.eigvals(a).real, dim=-1).values
    assert rel_err(torch.linalg.eigvalsh(got), want) < 1e-9
    assert rel_err(got, got.transpose(1, 2)) < 1e-12


def test_inverse_stereographic_projection_is_an_isometry_onto_the_sphere_metric() -> None:
    """The unit sphere parametrised by inverse stereographic projection has ``H = lambda(z) I``: measured
    against the built-in sphere metric it is an exact isometry (measures at their minima), measured
    against the identity it is not."""

    def inverse_stereographic(z: torch.Tensor) -> torch.Tensor:
        n2 = z.square().sum(-1, keepdim=True)
        return torch.cat([2 * z, n2 - 1], dim=-1) / (1 + n2)

    z = 2 * torch.randn(16, 2, dtype=torch.float64)
    sphere = {"latent_metric": "sphere_stereographic", "eta": 0.2}
    assert float(isofast.distortion(inverse_stereographic, z, "isometry", estimator="exact", **sphere)) < 1e-12
    assert float(isofast.distortion(inverse_stereographic, z, "scaled_isometry", **sphere)) == pytest.approx(0.5)
    assert float(isofast.distortion(inverse_stereographic, z, "scaled_isometry")) > 0.6
    h = isofast.pullback_metric(inverse_stereographic, z)
    lam = sphere_factor(z)
    assert float(isofast.metrics.variance_of_riemannian_metric(h, latent_metric=lam)) < 1e-12
    assert float(isofast.metrics.variance_of_riemannian_metric(h)) > 1.0


def test_metrics_against_a_latent_metric() -> None:
    """MCN and VoR of ``M^{-1/2} H M^{-1/2}``: condition numbers are those of ``M^{-1} H``."""
    gen = torch.Generator().manual_seed(1)
    z = torch.randn(7, 3, generator=gen, dtype=torch.float64)
    j = torch.randn(7, 5, 3, generator=gen, dtype=torch.float64)
    h = j.transpose(1, 2) @ j
    mz = latent_matrix(z)
    ev = torch.linalg.eigvals(torch.linalg.solve(mz, h)).real
    want = ev.max(-1).values / ev.min(-1).values
    assert rel_err(isofast.metrics.condition_numbers(h, latent_metric=mz), want) < 1e-9
    assert rel_err(isofast.metrics.mean_condition_number(h, latent_metric=mz), want.mean()) < 1e-9
    rel = isofast.metrics.relative_metric(h, mz)
    assert rel_err(isofast.metrics.variance_of_riemannian_metric(h, latent_metric=mz),
                   isofast.metrics.variance_of_riemannian_metric(rel)) < 1e-12
    lam = torch.rand(7, generator=gen, dtype=torch.float64) + 0.5
    assert rel_err(isofast.metrics.condition_numbers(h, latent_metric=lam), isofast.metrics.condition_numbers(h)) < 1e-9
    with pytest.raises(ValueError, match="positive definite"):
        isofast.metrics.mean_condition_number(h, latent_metric=-mz)


# --- path length ---------------------------------------------------------------------------------

def _path_lengths_brute_force(dec, z, gen_seed: int, eta, g_of_x=None, m_of_z=None) -> torch.Tensor:
    """``||S^T J^T R^T w||`` with the same draws: mixup, then ``w ~ N(0, I) / sqrt(D)``."""
    gen = torch.Generator().manual_seed(gen_seed)
    z_aug = isofast.mixup(z, eta, generator=gen) if eta is not None else z
    jt = _whitened_jacobian(dec, z_aug, g_of_x, m_of_z)
    d = jt.shape[1]
    w = torch.randn(z.shape[0], d, generator=gen, dtype=torch.float64) / math.sqrt(d)
    return torch.einsum("bdm,bd->bm", jt, w).norm(dim=-1)


@pytest.mark.parametrize("estimator", ["exact", "hutchinson"])
@pytest.mark.parametrize("decoder", ["conv", "mlp"])
@pytest.mark.parametrize(("data", "latent"), [("identity", "identity"), ("diagonal", "sphere"), ("matrix", "matrix")])
def test_path_lengths_against_brute_force(estimator: str, decoder: str, data: str, latent: str) -> None:
    dec, d = _decoder(decoder)
    dm, g_of_x = _data_metric(data, d)
    lm, m_of_z = _latent_metric(latent)
    z = torch.randn(5, M_LATENT, dtype=torch.float64, requires_grad=True)
    got = isofast.path_lengths(dec, z, eta=0.2, estimator=estimator, generator=torch.Generator().manual_seed(4),
                               data_metric=dm, latent_metric=lm)
    ref = _path_lengths_brute_force(dec, z, 4, 0.2, g_of_x, m_of_z)
    assert rel_err(got, ref) < RTOL[torch.float64] * 10
    _grads_close(got.square().sum(), ref.square().sum(), [z, *dec.parameters()], GRAD_RTOL[torch.float64] * 10)
    value = isofast.distortion(dec, z, "path_length", eta=0.2, estimator=estimator, data_metric=dm, latent_metric=lm,
                               generator=torch.Generator().manual_seed(4))
    want = (ref - ref.mean().detach()).square().mean()
    assert rel_err(value, want) < RTOL[torch.float64] * 10
    _grads_close(value, want, [z, *dec.parameters()], GRAD_RTOL[torch.float64] * 10)


def test_path_length_plan_is_first_order_by_default() -> None:
    dec, _ = _decoder("mlp")
    z = torch.randn(3, M_LATENT, dtype=torch.float64)
    p = isofast.plan(dec, z, "path_length")
    assert p.estimator == "exact" and p.path == "fused_sequential"  # the fused MLP kernels compute no J^T w
    assert "no J^T w" in p.reasons["path"] and "first order" in p.reasons["estimator"]
    assert isofast.plan(ConvDecoder(m=M_LATENT), z, "path_length", estimator="hutchinson").path == "generic"
    with pytest.raises(ValueError, match="estimator='forward'"):
        isofast.plan(dec, z, "path_length", estimator="forward")
    with pytest.raises(ValueError, match="n_probes"):
        isofast.plan(dec, z, "path_length", n_probes=2)
    with pytest.raises(ValueError, match="G\\^\\(1/2\\)"):
        isofast.path_lengths(ConvDecoder(m=M_LATENT), z, data_metric=Product(D_CONV))


def test_path_length_regularizer_keeps_a_running_mean() -> None:
    """``IsometricRegularizer(measure="path_length")``: ``pl_mean`` moves by ``pl_decay`` towards each
    training batch's mean length before the penalty ``mean (L - a)^2`` is formed; eval mode reads it."""
    dec, _ = _decoder("conv")
    reg = isofast.IsometricRegularizer("path_length", weight=2.0, eta=None, pl_decay=0.25)
    assert float(reg.pl_mean) == 0.0 and "pl_mean" in reg.state_dict()
    z = torch.randn(6, M_LATENT, dtype=torch.float64, requires_grad=True)
    lengths = isofast.path_lengths(dec, z, generator=torch.Generator().manual_seed(1))
    loss = reg(dec, z, generator=torch.Generator().manual_seed(1))
    a = 0.25 * lengths.mean().detach()
    assert float(reg.pl_mean) == pytest.approx(float(a), rel=1e-6)  # a float32 buffer
    target = reg.pl_mean.double()
    assert float(loss) == pytest.approx(2.0 * float((lengths - target).square().mean()), rel=1e-9)
    _grads_close(loss, 2.0 * (lengths - target).square().mean(), [z, *dec.parameters()], GRAD_RTOL[torch.float64])
    reg(dec, z, generator=torch.Generator().manual_seed(1))
    second = float(reg.pl_mean)
    assert second == pytest.approx(float(a + 0.25 * (lengths.mean() - a)), rel=1e-6)
    reg.eval()
    reg(dec, z, generator=torch.Generator().manual_seed(1))
    assert float(reg.pl_mean) == second


# --- planning and refusals -------------------------------------------------------------------------

def test_plan_routes_each_geometry() -> None:
    dec, d = _decoder("mlp")
    z = torch.randn(3, M_LATENT, dtype=torch.float64)
    p = isofast.plan(dec, z, data_metric=Product(d))
    assert p.path == "fused_sequential" and "diagonal data metric only" in p.reasons["path"]
    assert "metric-vector product" in p.reasons["geometry"]
    p = isofast.plan(dec, z, estimator="hutchinson", latent_metric=latent_matrix)
    assert p.path == "fused_sequential" and "probes that depend on z" in p.reasons["path"]
    p = isofast.plan(dec, z, estimator="exact", latent_metric=latent_matrix)
    assert p.path == "fused_mlp" and "whitened after the fused op" in p.reasons["geometry"]
    w = positive_weight(d).requires_grad_()
    assert "require grad" in isofast.plan(dec, z, data_metric=w).reasons["path"]
    assert "geometry" not in isofast.plan(dec, z).reasons


def test_diagonal_data_metric_runs_fused_and_matches_generic() -> None:
    dec, d = _decoder("mlp")
    w = positive_weight(d)
    z = torch.randn(5, M_LATENT, dtype=torch.float64, requires_grad=True)
    p = isofast.plan(dec, z, data_metric=w)
    assert p.path == "fused_mlp" and "epilogue" in p.reasons["geometry"]
    fused = isofast.distortion(dec, z, "isometry", eta=None, estimator="exact", data_metric=w)
    generic = isofast.distortion(lambda c: dec(c), z, "isometry", eta=None, estimator="exact", data_metric=w)
    assert rel_err(fused, generic) < 1e-10


def test_data_metric_weights_that_require_grad_get_their_gradient() -> None:
    dec, d = _decoder("conv")
    w = positive_weight(d).requires_grad_()
    z = torch.randn(3, M_LATENT, dtype=torch.float64)
    value = isofast.distortion(dec, z, "isometry", eta=None, estimator="exact", data_metric=w)
    ref = measure_brute_force("isometry", relative_brute_force(dec, z, lambda x: torch.diag_embed(w.expand(3, d)))[0])
    (g,), (g_ref,) = torch.autograd.grad(value, [w]), torch.autograd.grad(ref, [w])
    assert rel_err(g, g_ref) < GRAD_RTOL[torch.float64]


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"data_metric": torch.zeros(D_CONV, dtype=torch.float64)}, "data_metric weights must be finite and > 0"),
    ({"data_metric": torch.ones(D_CONV + 1, dtype=torch.float64)}, "D = 64 outputs per sample, got one of size 65"),
    ({"data_metric": torch.ones(D_CONV, D_CONV, dtype=torch.float64)}, "spd_matrix"),
    ({"data_metric": "euclid"}, "data_metric must be None"),
    ({"data_metric": torch.ones(D_CONV, dtype=torch.float64, device="meta")}, "data_metric must be on z's device cpu"),
    ({"latent_metric": torch.eye(M_LATENT, dtype=torch.float64, device="meta")}, "latent_metric must be on z's device"),
    ({"data_metric": lambda x, w: w[:, :3]}, "must return G\\(x\\) w of w's shape"),
    ({"data_metric": lambda x, w: -w}, "not positive semi-definite"),
    ({"data_metric": lambda x, w: w + torch.roll(w, 1, dims=-1)}, "data_metric\\(x, w\\) must be symmetric"),
    ({"latent_metric": "hyperbolic"}, "latent_metric must be one of 'sphere_stereographic'"),
    ({"latent_metric": -torch.eye(M_LATENT, dtype=torch.float64)}, "latent_metric must be symmetric positive definite"),
    ({"latent_metric": torch.eye(2, dtype=torch.float64)}, "\\(m, m\\) = \\(3, 3\\)"),
    ({"latent_metric": lambda z: -z.square().sum(-1) - 1}, "conformal factors must be finite and > 0"),
    ({"latent_metric": lambda z: z}, "must return \\(B,\\) conformal factors or \\(B, m, m\\)"),
    ({"latent_metric": lambda z: -latent_matrix(z)}, "positive definite"),
])
def test_refusals_name_the_argument(kwargs: dict, match: str) -> None:
    dec = ConvDecoder(m=M_LATENT)
    z = torch.randn(3, M_LATENT, dtype=torch.float64)
    with pytest.raises((ValueError, TypeError), match=match):
        isofast.distortion(dec, z, "isometry", estimator="exact", **kwargs)


def test_spd_matrix_refuses_an_indefinite_matrix() -> None:
    g = torch.diag(torch.tensor([1.0, -1.0, 2.0], dtype=torch.float64))
    with pytest.raises(ValueError, match="data_metric G must be symmetric positive definite"):
        spd_matrix(g)
    with pytest.raises(ValueError, match="data_metric G must be symmetric"):
        spd_matrix(torch.tensor([[1.0, 0.5], [0.0, 1.0]], dtype=torch.float64))


def test_gradcheck_generic_path_with_both_metrics() -> None:
    dec, d = _decoder("conv")
    w = positive_weight(d)
    z = torch.randn(3, M_LATENT, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda c: isofast.distortion(dec, c, "scaled_isometry", eta=None, estimator="exact", data_metric=w,
                                     latent_metric="sphere_stereographic"), (z,))


@pytest.mark.slow
@pytest.mark.parametrize("measure", ["scaled_isometry", "path_length"])
def test_compiled_step_with_both_metrics_matches_eager(measure: str) -> None:
    """The first-order graph with a data and a latent metric compiles with ``fullgraph=True``."""
    dec = ConvDecoder(m=M_LATENT, dtype=torch.float32, seed=1)
    w = positive_weight(D_CONV, dtype=torch.float32)
    z = torch.randn(6, M_LATENT)
    kwargs = {"estimator": "forward", "n_probes": 2} if measure != "path_length" else {}

    def loss_fn(c: torch.Tensor) -> torch.Tensor:
        return isofast.distortion(dec, c, measure, eta=None, data_metric=w, latent_metric="sphere_stereographic",
                                  generator=None, **kwargs)

    def step(fn):
        torch.manual_seed(0)
        loss = fn(z)
        return loss, torch.autograd.grad(loss, list(dec.parameters()))

    loss, grads = step(loss_fn)
    closs, cgrads = step(torch.compile(loss_fn, backend="aot_eager", fullgraph=True))  # eager RNG: same draws
    torch.testing.assert_close(closs, loss, rtol=1e-4, atol=0)
    for c, e in zip(cgrads, grads):
        torch.testing.assert_close(c, e, rtol=1e-3, atol=1e-6)
