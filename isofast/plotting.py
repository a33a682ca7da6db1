"""Equidistant-ellipse plots of a 2-D latent space.

At a latent point ``z`` with pullback metric ``H(z)``, the ellipse ``{dz : dz^T H(z) dz = r^2}`` is
the set of latent displacements whose image under the decoder has (to first order) data-space
length ``r``. Drawn with ONE common ``r`` at many points, the ellipses show the decoder's distortion
at a glance: for a scaled isometry they are equal circles; elongated ellipses mean anisotropy and
ellipses of varying size mean an inhomogeneous metric.

matplotlib is imported inside the functions, so ``import isofast`` works without it.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

if TYPE_CHECKING:
    from matplotlib.axes import Axes

__all__ = ["plot_latent_ellipses", "side_by_side"]

#: Default common radius: the median drawn ellipse's largest semi-axis is this fraction of the
#: latent extent (the larger of the two coordinate ranges of ``z``).
_MEDIAN_SEMI_AXIS_FRACTION = 0.04
#: Semi-axes are capped at this multiple of the extent, so a degenerate metric (a direction the
#: decoder is flat along) draws a long band across the plot rather than an overflowing patch.
_MAX_SEMI_AXIS_EXTENTS = 10.0
#: Labels with at most this many distinct integer values get a legend, more get a colourbar.
_MAX_LEGEND_CLASSES = 20

ArrayLike = torch.Tensor | np.ndarray


def _as_numpy(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().to("cpu", torch.float64).numpy()
    return np.asarray(x, dtype=np.float64)


def _validate(z: Any, H: Any, labels: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    z_np, H_np = _as_numpy(z), _as_numpy(H)
    if z_np.ndim != 2 or z_np.shape[1] != 2:
        raise ValueError(f"z must have shape (N, 2) (a 2-D latent space), got {z_np.shape}")
    if H_np.ndim != 3 or H_np.shape[1:] != (2, 2):
        raise ValueError(f"H must have shape (N, 2, 2) (metrics of a 2-D latent space), got {H_np.shape}")
    if H_np.shape[0] != z_np.shape[0]:
        raise ValueError(f"z and H must have the same N, got z {z_np.shape} and H {H_np.shape}")
    if z_np.shape[0] == 0:
        raise ValueError("z and H must hold at least one point (N >= 1)")
    labels_np = None
    if labels is not None:
        labels_np = labels.detach().cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
        if labels_np.shape != (z_np.shape[0],):
            raise ValueError(f"labels must have shape (N,) = ({z_np.shape[0]},), got {labels_np.shape}")
    return z_np, H_np, labels_np


def _farthest_points(z: np.ndarray, n: int, seed: int) -> np.ndarray:
    # Farthest-point sampling spreads the ellipses evenly over the codes; the random start makes
    # the choice reproducible through ``seed`` without favouring the first rows.
    start = int(np.random.default_rng(seed).integers(z.shape[0]))
    chosen = [start]
    dist = np.linalg.norm(z - z[start], axis=1)
    for _ in range(n - 1):
        nxt = int(np.argmax(dist))
        chosen.append(nxt)
        dist = np.minimum(dist, np.linalg.norm(z - z[nxt], axis=1))
    return np.asarray(chosen)


def _pyplot():  # noqa: ANN202 - returns the pyplot module
    import matplotlib

    # Headless by default, but never override a backend the user (or MPLBACKEND) already chose.
    if matplotlib.get_backend(auto_select=False) is None:
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _draw(
    ax: Axes,
    z: np.ndarray,
    H: np.ndarray,
    labels: np.ndarray | None,
    n_ellipses: int,
    radius: float | None,
    seed: int,
    title: str | None,
) -> None:
    import matplotlib
    from matplotlib.patches import Ellipse

    if n_ellipses < 0:
        raise ValueError(f"n_ellipses must be >= 0, got {n_ellipses}")
    if radius is not None and not radius > 0:
        raise ValueError(f"radius must be positive, got {radius}")

    if labels is None:
        ax.scatter(z[:, 0], z[:, 1], s=10, c="tab:gray", alpha=0.6, linewidths=0)
    else:
        classes = np.unique(labels)
        if np.issubdtype(labels.dtype, np.integer) and len(classes) <= _MAX_LEGEND_CLASSES:
            cmap = matplotlib.colormaps["tab10" if len(classes) <= 10 else "tab20"]
            for i, c in enumerate(classes):
                mask = labels == c
                ax.scatter(z[mask, 0], z[mask, 1], s=10, color=cmap(i), alpha=0.7, linewidths=0, label=str(c))
            ax.legend(markerscale=3, fontsize="small", loc="best")
        else:
            points = ax.scatter(z[:, 0], z[:, 1], s=10, c=labels, cmap="viridis", alpha=0.7, linewidths=0)
            ax.figure.colorbar(points, ax=ax)

    lo, hi = z.min(0), z.max(0)
    extent = float((hi - lo).max()) or 1.0
    margin = 0.05 * extent

    idx = _farthest_points(z, min(n_ellipses, z.shape[0]), seed) if n_ellipses > 0 else np.empty(0, int)
    if idx.size:
        lam, vec = np.linalg.eigh(0.5 * (H[idx] + H[idx].transpose(0, 2, 1)))
        inv_sqrt = 1.0 / np.sqrt(np.maximum(lam, np.finfo(np.float64).tiny))
        r = radius if radius is not None else _MEDIAN_SEMI_AXIS_FRACTION * extent / float(np.median(inv_sqrt[:, 0]))
        semi = np.minimum(r * inv_sqrt, _MAX_SEMI_AXIS_EXTENTS * extent)
        # Ellipse's width runs along ``angle``: the first eigenvector, whose eigenvalue is smallest.
        angles = np.degrees(np.arctan2(vec[:, 1, 0], vec[:, 0, 0]))
        for (x, y), (a, b), angle in zip(z[idx], semi, angles):
            ax.add_patch(
                Ellipse((x, y), width=2 * a, height=2 * b, angle=angle, fill=False, edgecolor="black", linewidth=0.8)
            )

    # The view follows the codes, not the ellipses, so one huge ellipse cannot shrink the rest;
    # it is square with equal scales so that circles look like circles.
    centre, half = 0.5 * (lo + hi), 0.5 * extent + margin
    ax.set_xlim(centre[0] - half, centre[0] + half)
    ax.set_ylim(centre[1] - half, centre[1] + half)
    ax.set_aspect("equal", adjustable="box")
    if title is not None:
        ax.set_title(title)


def plot_latent_ellipses(
    z: ArrayLike,
    H: ArrayLike,
    labels: ArrayLike | None = None,
    *,
    ax: Axes | None = None,
    n_ellipses: int = 64,
    radius: float | None = None,
    seed: int = 0,
    title: str | None = None,
) -> Axes:
    """Scatter 2-D latent codes and draw equidistant ellipses of the pullback metric.

    At ``min(n_ellipses, N)`` points chosen by farthest-point sampling (random start drawn with
    ``seed``, so the choice is reproducible) draws ``{dz : dz^T H(z) dz = r^2}`` centred at ``z``:
    with ``H = V diag(lambda) V^T`` its semi-axes are ``r / sqrt(lambda_i)`` along the eigenvectors.
    ``r`` is one radius shared by all ellipses (that is what makes them equidistant). By default it
    is chosen so that the median drawn ellipse's largest semi-axis ``r / sqrt(lambda_min)`` is 4% of
    the latent extent (the larger coordinate range of ``z``). Semi-axes are capped at 10 extents
    (eigenvalues are floored at the float64 ``tiny``), and the view is a square fitted to the codes.

    Args:
        z: ``(N, 2)`` latent codes (tensor or array).
        H: ``(N, 2, 2)`` pullback metrics at ``z``.
        labels: ``(N,)`` class labels colouring the codes (legend for up to 20 integer classes,
            colourbar otherwise), or None.
        ax: axes to draw into; a new figure through pyplot if None (with the Agg backend when no
            backend has been chosen yet).
        n_ellipses: number of ellipses (``>= 0``).
        radius: the common data-space radius ``r`` (``> 0``), or None for the default above.
        seed: seed of the farthest-point start.
        title: axes title, or None.

    Returns:
        The matplotlib Axes drawn into.

    Raises:
        ValueError: on shape mismatches, a latent dimension other than 2, negative
            ``n_ellipses`` or non-positive ``radius``.
    """
    z_np, H_np, labels_np = _validate(z, H, labels)
    if ax is None:
        _, ax = _pyplot().subplots(figsize=(5, 5))
    _draw(ax, z_np, H_np, labels_np, n_ellipses, radius, seed, title)
    return ax


def side_by_side(
    panels: list[tuple[str, ArrayLike, ArrayLike, ArrayLike | None]],
    path: str | Path,
    *,
    n_ellipses: int = 64,
    seed: int = 0,
) -> None:
    """Draw several latent-ellipse panels in one row and save them as a PNG.

    Each panel is ``(title, z, H, labels)`` with shapes as in :func:`plot_latent_ellipses`; each gets
    its own default radius (so panels of differently scaled decoders stay readable). The figure is
    built without pyplot, so no backend is touched and no figure is left open.

    Args:
        panels: non-empty list of ``(title, z (N, 2), H (N, 2, 2), labels (N,) or None)``.
        path: output PNG file; parent directories are created.
        n_ellipses: ellipses per panel.
        seed: seed of the farthest-point start in every panel.
    """
    from matplotlib.figure import Figure

    if not panels:
        raise ValueError("panels must hold at least one (title, z, H, labels) tuple")
    checked = [(title, *_validate(z, H, labels)) for title, z, H, labels in panels]
    fig = Figure(figsize=(5 * len(checked), 5), layout="constrained")
    axes = fig.subplots(1, len(checked), squeeze=False)[0]
    for ax, (title, z_np, H_np, labels_np) in zip(axes, checked):
        _draw(ax, z_np, H_np, labels_np, n_ellipses, None, seed, title)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=120, bbox_inches="tight")
