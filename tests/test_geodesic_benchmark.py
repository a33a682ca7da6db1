"""The geodesic-fidelity ground truth: the short swiss roll's geodesics, checked by brute force, and a
smoke run of ``benchmarks/geodesic_fidelity.py`` with tiny settings."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("sklearn")  # the train extra (brings scipy)
pytest.importorskip("matplotlib")
from scipy.sparse import csr_matrix  # noqa: E402
from scipy.sparse.csgraph import dijkstra  # noqa: E402
from scipy.spatial import cKDTree  # noqa: E402

import isofast.training.data as D  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def test_shortroll_geodesics_match_graph_shortest_paths():
    """Brute force, from the dataset's output alone: shortest paths through a dense 30-nearest-
    neighbour graph of 20000 points in R^10 (edge length = chord length) against the analytic
    geodesic distances (Euclidean distance of the unrolled coordinates)."""
    n, k, sources = 20000, 30, 20
    x, _, coords = D.make_shortroll(n, seed=3)
    assert x.shape == (n, 10) and coords.shape == (n, 2)
    pts = x.double().numpy()
    dist, nbr = cKDTree(pts).query(pts, k + 1)
    graph = csr_matrix((dist[:, 1:].ravel(), (np.repeat(np.arange(n), k), nbr[:, 1:].ravel())), shape=(n, n))
    brute = dijkstra(graph, directed=False, indices=np.arange(sources))
    # The function under test, on the sources and 2000 random targets (not on all n^2 pairs).
    targets = np.random.default_rng(0).choice(np.arange(sources, n), 2000, replace=False)
    both = np.concatenate([np.arange(sources), targets])
    exact = D.swissroll_geodesic(coords[both])[:sources, sources:].numpy()
    brute = brute[:, targets]
    far = exact > 0.5
    rel = brute[far] / exact[far] - 1
    # A graph path is a chain of chords of the surface: never shorter than the geodesic (up to the
    # chords' curvature sag, < 1e-4 here) and, on this mesh, longer by its zig-zag only.
    assert rel.min() > -1e-3
    assert np.median(rel) < 0.01 and rel.max() < 0.05
    # The check has teeth: the data-space (chord) distance is far off across the roll.
    chord = np.linalg.norm(pts[:sources, None] - pts[None, targets], axis=-1)[far]
    assert (chord / exact[far] - 1).min() < -0.3


def test_shortroll_is_an_isometric_embedding_of_the_swissroll():
    x3, y3, c3 = D.make_swissroll(500, seed=4, height=D.SHORTROLL_HEIGHT, turns=D.SHORTROLL_TURNS)
    x, y, c = D.make_shortroll(500, seed=4)
    assert torch.equal(y, y3) and torch.equal(c, c3)
    # The embedding R^3 -> R^10 preserves every distance, and the frame is the same for every seed.
    assert torch.allclose(torch.cdist(x.double(), x.double()), torch.cdist(x3.double(), x3.double()), atol=1e-5)
    xa, _, _ = D.make_shortroll(50, seed=0)
    xb, _, _ = D.make_shortroll(50, seed=0)
    assert torch.equal(xa, xb)
    # Unrolled extent: 3/4 turn of the spiral from t = 1.5 pi (arc length 3.365), 2.5 wide.
    assert c[:, 0].max() - c[:, 0].min() == pytest.approx(3.365, abs=0.05)
    assert c[:, 1].max() == pytest.approx(2.5, abs=0.05) and c[:, 1].min() >= 0
    # The default swiss roll is unchanged by the new parameters.
    xs, ys, cs = D.make_swissroll(300, seed=1)
    t = 1.5 * np.pi * (1 + 2 * np.random.default_rng(1).random(300))
    assert np.allclose(cs[:, 0].numpy(), D._swissroll_arclength(t) / 10.0)
    assert int(ys.max()) == 4
    b = D.load_dataset("shortroll", n_samples=700, seed=0)
    assert b.data_dim == 10 and b.image_shape is None and b.geodesic is D.swissroll_geodesic
    with pytest.raises(ValueError):
        D.make_swissroll(10, turns=0)


def test_geodesic_fidelity_script_smoke(tmp_path: Path):
    from benchmarks import geodesic_fidelity as G

    out = tmp_path / "geo"
    assert G.main(["--out", str(out), "--seeds", "0,1", "--epochs", "1", "--n-samples", "140",
                   "--hidden", "8,8", "--pairs", "200"]) == 0
    res = json.loads((out / G.RESULTS_FILE).read_text())
    assert [r["model"] for r in res["summary"]] == list(G.MODELS)
    assert len(res["runs"]) == 2 * len(G.MODELS)
    for r in res["runs"]:
        assert -1 <= r["geodesic_fidelity"] <= 1 and r["cpu_s"] > 0 and r["epochs"] == 1
    assert all(row["n_seeds"] == 2 for row in res["summary"])
    assert len(res["meta"]["data_space_fidelity"]) == 2
    assert "| IRVAE |" in res["table"]
    assert (out / G.FIGURE_FILE).stat().st_size > 0
