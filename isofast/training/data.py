"""Datasets for the reference training loop, all held in memory as flat float tensors.

Every dataset is returned as a :class:`DataBundle` of three :class:`Split` s (train / validation /
test) cut *in order* with the official IRVAE proportions 5/7, 1/7, 1/7 (``split_in_order``).

- ``digits``: scikit-learn's bundled ``load_digits`` (1797 images of 8x8, 16 grey levels), pixels
  scaled to [0, 1]. The default dataset because it ships with scikit-learn: nothing to download.
- ``mnist`` / ``fmnist``: the standard IDX files in ``data_dir`` (``train-images-idx3-ubyte`` or
  ``train-images.idx3-ubyte``, each optionally ``.gz``; see :func:`idx_names`). As in the official code the
  official train and test sets are concatenated, filtered by digit, then split in order. Nothing is
  ever downloaded; a missing file raises a :class:`FileNotFoundError` naming what to put where.
- ``swissroll`` (flat) / ``spherecap`` (curved): synthetic 2-manifolds in R^3 with known intrinsic
  coordinates, so that :func:`geodesic_fidelity` can score how well latent distances track true
  geodesic distances.
- ``shortroll`` (flat): three quarters of a turn of swiss roll, nearly square when unrolled, placed
  in R^10 by a fixed isometric linear map (:func:`make_shortroll`): the geodesic-fidelity benchmark
  on which a 2-D autoencoder can find the isometric chart in a CPU budget
  (``benchmarks/geodesic_fidelity.py``).
"""

from __future__ import annotations

import gzip
import math
import os
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

#: Official IRVAE split: train / validation / test fractions, taken in order.
SPLIT_FRACTIONS = (5 / 7, 1 / 7, 1 / 7)

IMAGE_DATASETS = ("digits", "mnist", "fmnist")
SYNTHETIC_DATASETS = ("swissroll", "spherecap", "shortroll")
DATASETS = IMAGE_DATASETS + SYNTHETIC_DATASETS

#: The four IDX files of MNIST and Fashion-MNIST (same names for both).
IDX_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}


def idx_names(name: str) -> tuple[str, ...]:
    """The file names accepted for the IDX file ``name``, in search order: the standard name, the
    other common spelling with a dot before the IDX type (``train-images.idx3-ubyte``), each with
    and without ``.gz``."""
    dotted = name.replace("-idx", ".idx")
    return (name, name + ".gz", dotted, dotted + ".gz")
# Sub-folders that torchvision uses, searched after data_dir itself so an existing download works.
_TORCHVISION_DIRS = {"mnist": "MNIST/raw", "fmnist": "FashionMNIST/raw"}

_IDX_DTYPES = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


@dataclass
class Split:
    """One split of a dataset.

    Attributes:
        x: ``(N, D)`` float32 data, images flattened row-major (``D = C*H*W``).
        y: ``(N,)`` int64 labels (the digit, or a coarse bin of an intrinsic coordinate for the
            synthetic manifolds; used only to colour plots).
        coords: ``(N, k)`` float64 intrinsic coordinates for synthetic manifolds, else ``None``.
    """

    x: Tensor
    y: Tensor
    coords: Tensor | None = None

    def __len__(self) -> int:
        return int(self.x.shape[0])


@dataclass
class DataBundle:
    """A dataset cut into train / val / test, with what the models and metrics need to know."""

    name: str
    train: Split
    val: Split
    test: Split
    #: ``(C, H, W)`` for image data (decoders end in a sigmoid), ``None`` for vector data.
    image_shape: tuple[int, int, int] | None
    #: ``coords (N, k) -> (N, N)`` true geodesic distances, for synthetic manifolds only.
    geodesic: Callable[[Tensor], Tensor] | None = None

    @property
    def data_dim(self) -> int:
        return int(self.train.x.shape[1])


# ----------------------------------------------------------------------------- splitting / filtering


def split_sizes(n: int, fractions: Sequence[float] = SPLIT_FRACTIONS) -> tuple[int, int, int]:
    """Sizes of the in-order train / val / test split of ``n`` items (official rounding: floor the
    first two, the test split takes the remainder)."""
    n_train = int(n * fractions[0])
    n_val = int(n * fractions[1])
    return n_train, n_val, n - n_train - n_val


def split_in_order(x: Tensor, y: Tensor, coords: Tensor | None = None) -> tuple[Split, Split, Split]:
    """Cut ``(x, y[, coords])`` in order into train / val / test with :data:`SPLIT_FRACTIONS`."""
    n_train, n_val, _ = split_sizes(len(x))
    cuts = [(0, n_train), (n_train, n_train + n_val), (n_train + n_val, len(x))]
    return tuple(  # type: ignore[return-value]
        Split(x[a:b], y[a:b], None if coords is None else coords[a:b]) for a, b in cuts
    )


def parse_digits(digits: str | Sequence[int] | None) -> list[int] | None:
    """``"0,1,5"`` -> ``[0, 1, 5]``; ``None`` / ``"all"`` / ``""`` -> ``None`` (keep every class)."""
    if digits is None:
        return None
    if isinstance(digits, str):
        if digits.strip().lower() in ("", "all"):
            return None
        out = [int(d) for d in digits.replace(" ", "").split(",") if d != ""]
    else:
        out = [int(d) for d in digits]
    if not out or any(d < 0 or d > 9 for d in out):
        raise ValueError(f"--digits must be digits 0-9 separated by commas, got {digits!r}")
    return sorted(set(out))


def filter_digits(x: Tensor, y: Tensor, digits: Sequence[int] | None) -> tuple[Tensor, Tensor]:
    """Keep the rows whose label is in ``digits`` (order preserved, as in the official loader)."""
    if digits is None:
        return x, y
    keep = torch.isin(y, torch.as_tensor(list(digits), dtype=y.dtype))
    if not bool(keep.any()):
        raise ValueError(f"no samples with digits {list(digits)}")
    return x[keep], y[keep]


# ----------------------------------------------------------------------------- IDX files


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """Read one IDX file (optionally gzip-compressed, detected by the ``.gz`` suffix).

    Format: two zero bytes, a dtype code, the number of dimensions ``k``, then ``k`` big-endian
    uint32 sizes, then the data in row-major order.
    """
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise ValueError(f"{path}: not an IDX file (bad magic number)")
    code, ndim = raw[2], raw[3]
    if code not in _IDX_DTYPES:
        raise ValueError(f"{path}: unknown IDX data type 0x{code:02x}")
    dims = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
    dtype = _IDX_DTYPES[code]
    count = math.prod(dims)
    offset = 4 + 4 * ndim
    if len(raw) - offset < count * dtype.itemsize:
        raise ValueError(f"{path}: truncated IDX file (expected {count} items of shape {dims})")
    return np.frombuffer(raw, dtype=dtype, count=count, offset=offset).reshape(dims).copy()


def write_idx(path: str | os.PathLike[str], array: np.ndarray) -> None:
    """Write ``array`` as an IDX file (gzip if ``path`` ends in ``.gz``). Used by the tests."""
    arr = np.asarray(array)
    codes = {np.dtype(v).newbyteorder("=").str: k for k, v in _IDX_DTYPES.items()}
    native = arr.dtype.newbyteorder("=")
    if native.str not in codes:
        raise ValueError(f"IDX cannot store dtype {arr.dtype}")
    code = codes[native.str]
    be = arr.astype(_IDX_DTYPES[code])  # IDX is big-endian
    header = bytes([0, 0, code, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "wb") as f:
        f.write(header + be.tobytes())


def _find_idx(data_dir: str, name: str, dataset: str) -> str | None:
    for d in (data_dir, os.path.join(data_dir, _TORCHVISION_DIRS[dataset])):
        for candidate in idx_names(name):
            p = os.path.join(d, candidate)
            if os.path.isfile(p):
                return p
    return None


def load_idx_dataset(data_dir: str | None, dataset: str = "mnist") -> tuple[Tensor, Tensor]:
    """Official train + test sets of MNIST / Fashion-MNIST concatenated, in that order.

    Returns:
        ``x`` of shape ``(70000, 784)`` float32 in [0, 1] and ``y`` of shape ``(70000,)`` int64.

    Raises:
        FileNotFoundError: naming every missing file and the folder to put it in.
    """
    pretty = {"mnist": "MNIST", "fmnist": "Fashion-MNIST"}[dataset]
    if data_dir is None:
        raise FileNotFoundError(
            f"--dataset {dataset} needs --data-dir: a folder holding the four {pretty} IDX files "
            f"({', '.join(IDX_FILES.values())}; optionally .gz). Nothing is downloaded."
        )
    found = {key: _find_idx(data_dir, name, dataset) for key, name in IDX_FILES.items()}
    missing = [IDX_FILES[k] for k, p in found.items() if p is None]
    if missing:
        looked = "; ".join(" or ".join(idx_names(m)) for m in missing)
        raise FileNotFoundError(
            f"{pretty} files missing: {', '.join(missing)} (optionally .gz). Looked for {looked} in "
            f"{os.path.abspath(data_dir)} and its {_TORCHVISION_DIRS[dataset]}/ sub-folder. Put the "
            f"four {pretty} IDX files there. isofast never downloads data."
        )
    xs, ys = [], []
    for part in ("train", "test"):
        images = read_idx(found[f"{part}_images"])  # type: ignore[arg-type]
        labels = read_idx(found[f"{part}_labels"])  # type: ignore[arg-type]
        if images.shape[0] != labels.shape[0]:
            raise ValueError(f"{pretty} {part}: {images.shape[0]} images but {labels.shape[0]} labels")
        xs.append(torch.from_numpy(images.reshape(len(images), -1).astype(np.float32) / 255.0))
        ys.append(torch.from_numpy(labels.astype(np.int64)))
    return torch.cat(xs), torch.cat(ys)


# ----------------------------------------------------------------------------- synthetic manifolds


def _swissroll_arclength(t: np.ndarray) -> np.ndarray:
    # Arc length of the spiral r = t (x = t cos t, z = t sin t) from 0 to t: int sqrt(1 + t^2) dt.
    return 0.5 * (t * np.sqrt(1 + t * t) + np.arcsinh(t))


def make_swissroll(n: int, seed: int = 0, height: float = 10.0, turns: float = 1.5) -> tuple[Tensor, Tensor, Tensor]:
    """A swiss roll (flat 2-manifold) in R^3, scaled by 1/10 to unit-ish size.

    The spiral ``(t cos t, t sin t)`` runs over ``t`` in ``[1.5 pi, 1.5 pi + 2 pi turns]`` (the
    default, 1.5 turns, is ``[1.5 pi, 4.5 pi]``) and the roll is ``height`` wide (before scaling).

    Returns:
        ``x (n, 3)`` float32, ``y (n,)`` int64 (5 bins along the roll, for colouring), and
        ``coords (n, 2)`` float64 = (arc length along the roll, height), both in the same scaled
        units as ``x``, so geodesic distance is Euclidean distance in ``coords``.
    """
    if not (turns > 0 and height > 0):
        raise ValueError(f"swiss roll needs turns > 0 and height > 0, got turns={turns}, height={height}")
    rng = np.random.default_rng(seed)
    # 1.5 pi (1 + 2 u) for the default 1.5 turns, written so that the default is bit-identical.
    t = 1.5 * np.pi * (1 + (2 * turns / 1.5) * rng.random(n))
    h = height * rng.random(n)
    x = np.stack([t * np.cos(t), h, t * np.sin(t)], axis=1) / 10.0
    coords = np.stack([_swissroll_arclength(t), h], axis=1) / 10.0
    y = np.minimum((5 * (t - 1.5 * np.pi) / (2 * np.pi * turns)).astype(np.int64), 4)
    return torch.from_numpy(x.astype(np.float32)), torch.from_numpy(y), torch.from_numpy(coords)


#: Shape of :func:`make_shortroll`: turns of the spiral, width of the roll (before the 1/10
#: scaling), dimension of the data space, and the seed of the fixed embedding.
SHORTROLL_TURNS, SHORTROLL_HEIGHT, SHORTROLL_DIM, SHORTROLL_FRAME_SEED = 0.75, 25.0, 10, 20221


def make_shortroll(n: int, seed: int = 0, dim: int = SHORTROLL_DIM) -> tuple[Tensor, Tensor, Tensor]:
    """A short swiss roll isometrically embedded in R^dim: the flat ground-truth manifold of the
    geodesic-fidelity benchmark.

    The manifold is :func:`make_swissroll` with ``turns=0.75`` and ``height=25``: the spiral
    ``(t cos t, t sin t) / 10`` for ``t`` in ``[1.5 pi, 3 pi]`` (arc length 3.36) swept 2.5 along
    the roll's axis, i.e. a 3.36 x 2.5 rectangle rolled up by three quarters of a turn. It is then
    mapped into R^dim by ``x -> Q x`` with ``Q`` a fixed ``(dim, 3)`` matrix of orthonormal columns
    (drawn once from ``SHORTROLL_FRAME_SEED``; the same for every ``seed``), so no coordinate axis
    of the data is special. No noise is added: the points lie exactly on the manifold.

    Why the geodesics are known exactly: the roll is a developable surface (a cylinder over a plane
    curve), and unrolling it, ``(t, h) -> (s(t), h)`` with ``s`` the spiral's arc length, is an
    isometry onto a rectangle. A rectangle is convex, so the shortest path between two points is
    the straight segment inside it, and the geodesic distance is the Euclidean distance of the
    unrolled coordinates (``coords``, :func:`swissroll_geodesic`). ``Q`` has orthonormal columns,
    so it preserves lengths of curves and changes no geodesic distance.

    Why these proportions (measured with the default 4 x 256 MLPs, 3000 points, 30 epochs): on
    the ``swissroll`` dataset (1.5 turns, 8.9 x 1 unrolled) no model unrolls the roll (fidelity
    0.33-0.43 in the sweep); with one turn (4.98 x 2.5) the IRVAE unrolled it for 1 seed of 3 and
    stayed folded at fidelity 0.43-0.53 for the others; with three quarters of a turn the IRVAE
    and IRAE unroll it for every seed tried, within 12 epochs, while the AE and VAE do not.

    Returns:
        ``x (n, dim)`` float32, ``y (n,)`` int64 (5 bins along the roll) and ``coords (n, 2)``
        float64 = (arc length, height), in the units of ``x``.
    """
    if dim < 3:
        raise ValueError(f"shortroll needs dim >= 3 (the roll lives in R^3), got {dim}")
    x3, y, coords = make_swissroll(n, seed, height=SHORTROLL_HEIGHT, turns=SHORTROLL_TURNS)
    q, _ = np.linalg.qr(np.random.default_rng(SHORTROLL_FRAME_SEED).standard_normal((dim, 3)))
    x = x3.to(torch.float64).numpy() @ q.T
    return torch.from_numpy(x.astype(np.float32)), y, coords


def make_spherecap(n: int, seed: int = 0, max_polar: float = math.pi / 3) -> tuple[Tensor, Tensor, Tensor]:
    """Points uniform (by area) on the unit-sphere cap of polar angle ``<= max_polar`` (curved).

    Returns:
        ``x (n, 3)`` float32 points on the sphere, ``y (n,)`` int64 (5 polar-angle bins), and
        ``coords (n, 2)`` float64 = (polar angle, azimuth).
    """
    rng = np.random.default_rng(seed)
    # Uniform by area: cos(polar) uniform on [cos(max_polar), 1].
    cos_p = 1 - rng.random(n) * (1 - math.cos(max_polar))
    polar = np.arccos(cos_p)
    azim = 2 * np.pi * rng.random(n)
    x = np.stack([np.sin(polar) * np.cos(azim), np.sin(polar) * np.sin(azim), cos_p], axis=1)
    y = np.minimum((5 * polar / max_polar).astype(np.int64), 4)
    coords = np.stack([polar, azim], axis=1)
    return torch.from_numpy(x.astype(np.float32)), torch.from_numpy(y), torch.from_numpy(coords)


def swissroll_geodesic(coords: Tensor) -> Tensor:
    """``(N, 2)`` unrolled coordinates -> ``(N, N)`` geodesic distances (Euclidean when unrolled)."""
    c = coords.to(torch.float64)
    return torch.cdist(c, c)


def spherecap_geodesic(coords: Tensor) -> Tensor:
    """``(N, 2)`` (polar, azimuth) -> ``(N, N)`` great-circle distances on the unit sphere."""
    c = coords.to(torch.float64)
    p, a = c[:, 0], c[:, 1]
    u = torch.stack([p.sin() * a.cos(), p.sin() * a.sin(), p.cos()], dim=1)
    return torch.arccos((u @ u.T).clamp(-1.0, 1.0))


def geodesic_fidelity(z: Tensor, geodesic: Tensor, *, max_points: int | None = 1000, seed: int = 0) -> float:
    """Spearman rank correlation between pairwise latent distances and true geodesic distances.

    1 means latent distances order every pair of points exactly as the manifold's geodesic distances
    do (an isometry up to a monotone rescaling); it is insensitive to a global scale.

    Args:
        z: ``(N, m)`` latent codes (e.g. encoder means of held-out points).
        geodesic: ``(N, N)`` true geodesic distances between the same points.
        max_points: subsample to this many points (pairs grow as N^2); ``None`` keeps all.
        seed: seed of the subsample.
    """
    from scipy.stats import spearmanr  # scipy comes with scikit-learn (the train extra)

    z = z.detach().to("cpu", torch.float64)
    geodesic = geodesic.detach().to("cpu", torch.float64)
    n = z.shape[0]
    if geodesic.shape != (n, n):
        raise ValueError(f"geodesic must be ({n}, {n}), got {tuple(geodesic.shape)}")
    if max_points is not None and n > max_points:
        idx = torch.from_numpy(np.random.default_rng(seed).choice(n, max_points, replace=False))
        z, geodesic, n = z[idx], geodesic[idx][:, idx], max_points
    iu = torch.triu_indices(n, n, offset=1)
    latent = torch.cdist(z, z)[iu[0], iu[1]].numpy()
    true = geodesic[iu[0], iu[1]].numpy()
    return float(spearmanr(latent, true).statistic)


# ----------------------------------------------------------------------------- entry point


def load_dataset(
    name: str,
    *,
    digits: str | Sequence[int] | None = None,
    data_dir: str | None = None,
    n_samples: int = 3000,
    seed: int = 0,
) -> DataBundle:
    """Load ``name`` (one of :data:`DATASETS`) and cut it into train / val / test in order.

    Args:
        digits: class subset for image datasets (``"0,1,5"`` or a list); ``None`` keeps all.
        data_dir: folder of the IDX files (``mnist`` / ``fmnist`` only).
        n_samples: number of points of a synthetic manifold (all splits together).
        seed: seed of the synthetic sample (image datasets are deterministic).
    """
    if name == "digits":
        from sklearn.datasets import load_digits

        d = load_digits()
        # 16 grey levels 0..16 -> [0, 1], like MNIST's /255.
        x = torch.from_numpy(d.data.astype(np.float32) / 16.0)
        y = torch.from_numpy(d.target.astype(np.int64))
        x, y = filter_digits(x, y, parse_digits(digits))
        return DataBundle(name, *split_in_order(x, y), image_shape=(1, 8, 8))
    if name in ("mnist", "fmnist"):
        x, y = load_idx_dataset(data_dir, name)
        x, y = filter_digits(x, y, parse_digits(digits))
        return DataBundle(name, *split_in_order(x, y), image_shape=(1, 28, 28))
    if name == "swissroll":
        return DataBundle(name, *split_in_order(*make_swissroll(n_samples, seed)), None, swissroll_geodesic)
    if name == "spherecap":
        return DataBundle(name, *split_in_order(*make_spherecap(n_samples, seed)), None, spherecap_geodesic)
    if name == "shortroll":
        return DataBundle(name, *split_in_order(*make_shortroll(n_samples, seed)), None, swissroll_geodesic)
    raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
