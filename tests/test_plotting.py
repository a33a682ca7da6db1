"""isofast.plotting: ellipse geometry, default radius, reproducibility, files and errors."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from matplotlib.patches import Ellipse  # noqa: E402

from isofast.plotting import plot_latent_ellipses, side_by_side  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def latent_cloud(N: int = 200, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(N, 2, generator=g, dtype=torch.float64)
    A = torch.randn(N, 2, 2, generator=g, dtype=torch.float64)
    H = A @ A.mT + 0.05 * torch.eye(2, dtype=torch.float64)
    labels = torch.randint(0, 3, (N,), generator=g)
    return z, H, labels


def ellipses(ax) -> list[Ellipse]:  # noqa: ANN001
    return [p for p in ax.patches if isinstance(p, Ellipse)]


@pytest.fixture(autouse=True)
def close_figures():  # noqa: ANN201
    yield
    plt.close("all")


@pytest.mark.parametrize(("n_ellipses", "expected"), [(64, 64), (10, 10), (0, 0), (500, 200)])
def test_number_of_ellipses(n_ellipses: int, expected: int) -> None:
    z, H, labels = latent_cloud()
    ax = plot_latent_ellipses(z, H, labels, n_ellipses=n_ellipses)
    assert isinstance(ax, matplotlib.axes.Axes)
    assert len(ellipses(ax)) == expected


def test_ellipses_are_the_level_set_of_the_metric() -> None:
    z, H, _ = latent_cloud(N=30)
    r = 0.3
    ax = plot_latent_ellipses(z, H, n_ellipses=30, radius=r)
    drawn = ellipses(ax)
    assert len(drawn) == 30
    t = np.linspace(0, 2 * np.pi, 17)
    circle = np.stack([np.cos(t), np.sin(t)], axis=1)
    index = {tuple(np.round(zb, 12)): i for i, zb in enumerate(z.numpy())}
    for e in drawn:
        i = index[tuple(np.round(e.center, 12))]
        dz = e.get_patch_transform().transform(circle) - z[i].numpy()
        quad = np.einsum("ni,ij,nj->n", dz, H[i].numpy(), dz)
        np.testing.assert_allclose(quad, r**2, rtol=1e-9)


def test_default_radius_median_semi_axis_is_four_percent_of_extent() -> None:
    z, H, _ = latent_cloud()
    ax = plot_latent_ellipses(z, H, n_ellipses=41)
    semi_major = [max(e.width, e.height) / 2 for e in ellipses(ax)]
    extent = float((z.max(0).values - z.min(0).values).max())
    assert np.median(semi_major) == pytest.approx(0.04 * extent, rel=1e-9)
    # One common radius: every ellipse's r = semi-axis * sqrt(eigenvalue) is the same.
    index = {tuple(np.round(zb, 12)): i for i, zb in enumerate(z.numpy())}
    radii = []
    for e in ellipses(ax):
        lam_min = np.linalg.eigvalsh(H[index[tuple(np.round(e.center, 12))]].numpy())[0]
        radii.append(max(e.width, e.height) / 2 * np.sqrt(lam_min))
    np.testing.assert_allclose(radii, radii[0], rtol=1e-9)


def test_isotropic_metric_draws_equal_circles() -> None:
    z, _, _ = latent_cloud(N=50)
    H = 4.0 * torch.eye(2, dtype=torch.float64).expand(50, 2, 2)
    ax = plot_latent_ellipses(z, H, n_ellipses=20, radius=1.0)
    for e in ellipses(ax):
        assert e.width == pytest.approx(1.0) and e.height == pytest.approx(1.0)


def test_degenerate_metric_is_capped_not_overflowing() -> None:
    z, H, _ = latent_cloud(N=20)
    H[0] = torch.diag(torch.tensor([1.0, 0.0], dtype=torch.float64))
    ax = plot_latent_ellipses(z, H, n_ellipses=20)
    sizes = np.array([[e.width, e.height] for e in ellipses(ax)])
    assert np.isfinite(sizes).all()
    extent = float((z.max(0).values - z.min(0).values).max())
    assert sizes.max() == pytest.approx(2 * 10 * extent)
    x0, x1 = ax.get_xlim()
    assert x1 - x0 < 2 * extent


def test_selection_is_reproducible_and_seeded() -> None:
    z, H, _ = latent_cloud()
    centres = [sorted(tuple(e.center) for e in ellipses(plot_latent_ellipses(z, H, n_ellipses=8, seed=s))) for s in (0, 0, 1)]
    assert centres[0] == centres[1]
    assert centres[0] != centres[2]


def test_labels_give_legend_and_float_labels_give_colourbar() -> None:
    z, H, labels = latent_cloud()
    ax = plot_latent_ellipses(z, H, labels, title="IRVAE")
    assert ax.get_legend() is not None
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["0", "1", "2"]
    assert ax.get_title() == "IRVAE"
    ax = plot_latent_ellipses(z, H, labels.double() / 3)
    assert ax.get_legend() is None and len(ax.figure.axes) == 2


def test_draws_into_given_axes_and_accepts_numpy() -> None:
    fig, ax = plt.subplots()
    z, H, labels = latent_cloud(N=40)
    out = plot_latent_ellipses(z.numpy(), H.numpy(), labels.numpy(), ax=ax, n_ellipses=5)
    assert out is ax and len(ellipses(ax)) == 5


@pytest.mark.parametrize(
    ("z_shape", "H_shape", "labels_shape", "match"),
    [
        ((10, 3), (10, 3, 3), None, "z must have shape"),
        ((10, 2), (10, 3, 3), None, "H must have shape"),
        ((10, 2), (10, 2), None, "H must have shape"),
        ((10, 2), (9, 2, 2), None, "same N"),
        ((10, 2), (10, 2, 2), (9,), "labels"),
    ],
)
def test_shape_errors(z_shape, H_shape, labels_shape, match: str) -> None:  # noqa: ANN001
    labels = None if labels_shape is None else np.zeros(labels_shape, dtype=int)
    with pytest.raises(ValueError, match=match):
        plot_latent_ellipses(np.zeros(z_shape), np.ones(H_shape), labels)


def test_argument_errors() -> None:
    z, H, _ = latent_cloud(N=10)
    with pytest.raises(ValueError, match="n_ellipses"):
        plot_latent_ellipses(z, H, n_ellipses=-1)
    with pytest.raises(ValueError, match="radius"):
        plot_latent_ellipses(z, H, radius=0.0)


def test_side_by_side_writes_png(tmp_path: Path) -> None:
    z, H, labels = latent_cloud()
    z2, H2, _ = latent_cloud(seed=1)
    out = tmp_path / "figs" / "compare.png"
    open_before = plt.get_fignums()
    side_by_side([("VAE", z, H, labels), ("IRVAE", z2, H2, None)], out)
    assert out.read_bytes()[:8] == PNG_MAGIC
    assert out.stat().st_size > 1000
    assert plt.get_fignums() == open_before


def test_side_by_side_validates(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="panels"):
        side_by_side([], tmp_path / "x.png")
    z, H, _ = latent_cloud(N=5)
    with pytest.raises(ValueError, match="H"):
        side_by_side([("bad", z, H[:, :1, :1], None)], tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


def _run(code: str, **env: str) -> str:
    clean = {k: v for k, v in os.environ.items() if k != "MPLBACKEND"} | env
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=clean, check=True, capture_output=True, text=True)
    return done.stdout.strip()


@pytest.mark.slow
def test_import_is_lazy_and_backend_not_forced() -> None:
    assert _run("import sys, isofast.plotting; print('matplotlib' in sys.modules)") == "False"
    draw = (
        "import torch, matplotlib; from isofast.plotting import plot_latent_ellipses;"
        "plot_latent_ellipses(torch.randn(5, 2), torch.eye(2).expand(5, 2, 2), n_ellipses=2);"
        "print(matplotlib.get_backend().lower())"
    )
    assert _run(draw) == "agg"
    assert _run(draw, MPLBACKEND="pdf") == "pdf"
