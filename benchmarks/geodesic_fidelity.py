"""Ground truth for "latent distances track geodesics": AE, VAE, IRAE and IRVAE on the short swiss roll.

``python benchmarks/geodesic_fidelity.py --out results/geodesic`` trains the four models of the
reference loop (``isofast.training``, default settings of the ``shortroll`` dataset: 3000 points,
official 4 x 256 MLPs, 30 epochs, latent dimension 2) for seeds 0, 1, 2, one run after another on one
torch thread, and reports on the held-out test split:

- ``geodesic_fidelity``: the Spearman rank correlation between latent distances (encoder means) and
  true geodesic distances over every pair of test points (:func:`isofast.training.geodesic_fidelity`;
  the roll is flat, so the true geodesic distance is the Euclidean distance of the unrolled
  coordinates, see :func:`isofast.training.data.make_shortroll`);
- MSE, MCN and VoR as ``isofast train`` reports them, and the CPU seconds of each run (training plus
  the per-epoch validation; process CPU time, so it does not count the other jobs of a shared machine).

Writes ``OUT/results.json`` (every run, the mean and sample standard deviation over seeds per model,
the environment) and ``OUT/geodesic.png`` (for the first seed: the test codes of each model coloured by
the true arc-length coordinate, and latent against geodesic distance for random test pairs), and prints
the table as markdown.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
import torch

from benchmarks import report
from isofast.training.checkpoint import load_checkpoint
from isofast.training.data import geodesic_fidelity, load_dataset
from isofast.training.loop import CHECKPOINT_FILE, TrainConfig, make_model, train

DATASET = "shortroll"
MODELS = ("ae", "vae", "irae", "irvae")
METRICS = ("geodesic_fidelity", "mse", "mcn", "vor", "cpu_s")
RESULTS_FILE, FIGURE_FILE = "results.json", "geodesic.png"


def run_one(config: TrainConfig) -> tuple[dict[str, Any], torch.Tensor]:
    """Train ``config`` (its ``out`` is a scratch folder); return its record and the encoder means
    ``z (N, 2)`` of the test split."""
    cpu0 = time.process_time()
    metrics = train(config)
    cpu = time.process_time() - cpu0
    resolved = config.resolved()
    data = load_dataset(DATASET, n_samples=resolved.n_samples, seed=resolved.seed)
    model = make_model(resolved, data)
    model.load_state_dict(load_checkpoint(os.path.join(resolved.out, CHECKPOINT_FILE))["model"])
    model.eval()
    with torch.no_grad():
        z = model.encode(data.test.x)
    record = {"model": resolved.model, "seed": resolved.seed, "epochs": resolved.epochs,
              "iso_weight": resolved.iso_weight, "n_test": len(data.test),
              "geodesic_fidelity": float(metrics["geodesic_fidelity"]), "mse": float(metrics["mse"]),
              "mcn": float(metrics["mcn"]), "vor": float(metrics["vor"]), "cpu_s": cpu,
              "train_wall_s": float(metrics["train_time_s"]),
              "val_geodesic_fidelity_by_epoch": [r.get("val_geodesic_fidelity") for r in metrics["history"]]}
    return record, z


def summarise(runs: list[dict[str, Any]], models: list[str]) -> list[dict[str, Any]]:
    """Mean and sample standard deviation over seeds of :data:`METRICS`, one row per model."""
    rows = []
    for model in models:
        mine = [r for r in runs if r["model"] == model]
        row: dict[str, Any] = {"model": model, "n_seeds": len(mine)}
        for key in METRICS:
            v = np.array([r[key] for r in mine], dtype=float)
            with np.errstate(invalid="ignore"):  # an infinite MCN (collapsed direction) gives a nan std
                row[f"{key}_mean"] = float(v.mean())
                row[f"{key}_std"] = float(v.std(ddof=1)) if len(v) > 1 else math.nan
        rows.append(row)
    return rows


def markdown_table(rows: list[dict[str, Any]], data_fidelity: list[float]) -> str:
    """The README table: one line per model, plus the data space's own fidelity as a reference."""
    def pm(row: dict[str, Any], key: str, fmt: str) -> str:
        mean, std = row[f"{key}_mean"], row[f"{key}_std"]
        return format(mean, fmt) if math.isnan(std) else f"{format(mean, fmt)} ± {format(std, fmt)}"

    lines = ["| model | Spearman (latent vs geodesic) | MSE | MCN | VoR | CPU s per run |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['model'].upper()} | {pm(r, 'geodesic_fidelity', '.4f')} | {pm(r, 'mse', '.2g')} | "
                     f"{pm(r, 'mcn', '.3g')} | {pm(r, 'vor', '.2g')} | {pm(r, 'cpu_s', '.0f')} |")
    d = np.array(data_fidelity)
    spread = f" ± {d.std(ddof=1):.4f}" if len(d) > 1 else ""
    lines.append(f"| (data space: Euclidean distance in R^10) | {d.mean():.4f}{spread} | | | | |")
    return "\n".join(lines)


def plot(path: Path, seed: int, coords: torch.Tensor, x: torch.Tensor, geodesic: torch.Tensor,
         codes: dict[str, tuple[torch.Tensor, float]], n_pairs: int) -> None:
    """Top row: the true unrolled coordinates of the test points, then each model's test codes, all
    coloured by the true arc-length coordinate. Bottom row: for ``n_pairs`` random test pairs,
    data-space distance (first panel) and each model's latent distance, scaled by its
    least-squares factor, against the true geodesic distance (the identity dashed)."""
    from matplotlib.figure import Figure

    c = coords.numpy()
    fig = Figure(figsize=(3.1 * (len(codes) + 1), 6.4), layout="constrained")
    axes = fig.subplots(2, len(codes) + 1, squeeze=False)
    rng = np.random.default_rng(0)
    i, j = rng.integers(0, len(c), n_pairs), rng.integers(0, len(c), n_pairs)
    i, j = i[i != j], j[i != j]
    geo = geodesic.numpy()[i, j]
    panels = [("true unrolled coordinates", c, x.double().numpy(), "data-space distance (R^10)")]
    panels += [(f"{m.upper()}  (Spearman {fid:.3f})", z.numpy(), z.numpy(), "latent distance (scaled)")
               for m, (z, fid) in codes.items()]
    for k, (title, pts, space, ylabel) in enumerate(panels):
        ax = axes[0, k]
        sc = ax.scatter(pts[:, 0], pts[:, 1], c=c[:, 0], s=5, cmap="viridis", linewidths=0)
        ax.set_aspect("equal", adjustable="datalim")
        ax.set_title(title, fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
        dist = np.linalg.norm(space[i] - space[j], axis=1)
        scale = float(dist @ geo) / max(float(geo @ geo), 1e-300)
        ax2 = axes[1, k]
        ax2.scatter(geo, dist / max(scale, 1e-300), s=2, alpha=0.3, linewidths=0, color="C0")
        top = float(geo.max())
        ax2.plot([0, top], [0, top], "k--", lw=0.8)
        ax2.set_xlabel("true geodesic distance")
        ax2.set_ylabel(ylabel)
    fig.colorbar(sc, ax=axes[0, -1], label="arc length along the roll")
    fig.suptitle(f"Short swiss roll in R^10, held-out points, seed {seed}", fontsize=10)
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("results/geodesic"), help="output folder")
    ap.add_argument("--models", default=",".join(MODELS), help="comma-separated models (default: all four)")
    ap.add_argument("--seeds", default="0,1,2", help="comma-separated seeds")
    ap.add_argument("--epochs", type=int, default=None, help="default: the shortroll default (30)")
    ap.add_argument("--n-samples", type=int, default=3000, help="points of the manifold, all splits")
    ap.add_argument("--hidden", default="256,256,256,256", help="hidden widths of encoder and decoder")
    ap.add_argument("--pairs", type=int, default=4000, help="random test pairs in the scatter plots")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    # One-time imports the loop makes lazily (scipy.stats, tqdm, matplotlib, torch._dynamo through
    # Adam's constructor), done here so that the first run's CPU time is not inflated by seconds.
    import matplotlib.figure  # noqa: F401
    import scipy.stats  # noqa: F401
    import tqdm.auto  # noqa: F401

    import isofast.plotting  # noqa: F401

    torch.optim.Adam([torch.zeros(1, requires_grad=True)])
    models = [m for m in args.models.split(",") if m]
    seeds = [int(s) for s in args.seeds.split(",")]
    hidden = [int(h) for h in args.hidden.split(",")]
    runs: list[dict[str, Any]] = []
    codes: dict[str, tuple[torch.Tensor, float]] = {}
    data_fidelity = []
    for seed in seeds:
        bundle = load_dataset(DATASET, n_samples=args.n_samples, seed=seed)
        test, geodesic = bundle.test, bundle.geodesic(bundle.test.coords)  # type: ignore[misc,arg-type]
        # Reference: how well plain data-space distances track the geodesics.
        data_fidelity.append(geodesic_fidelity(test.x, geodesic))
        if seed == seeds[0]:
            first = (test.coords, test.x, geodesic)
        for model in models:
            with tempfile.TemporaryDirectory() as tmp:
                config = TrainConfig(out=tmp, dataset=DATASET, model=model, seed=seed, epochs=args.epochs,
                                     n_samples=args.n_samples, hidden=hidden, select_every=0, progress=False)
                record, z = run_one(config)
            print(json.dumps({k: v for k, v in record.items() if k != "val_geodesic_fidelity_by_epoch"}), flush=True)
            runs.append(record)
            if seed == seeds[0]:
                codes[model] = (z, record["geodesic_fidelity"])
    rows = summarise(runs, models)
    table = markdown_table(rows, data_fidelity)
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    defaults = dataclasses.asdict(TrainConfig(out="", dataset=DATASET, hidden=hidden, n_samples=args.n_samples,
                                              epochs=args.epochs).resolved())
    meta = {**report.environment(torch.device("cpu")), "torch_threads": 1, "load_average": report.load_average(),
            "dataset": f"{DATASET}: 3/4 turn swiss roll, 3.37 x 2.5 unrolled, isometrically embedded in R^10",
            "n_samples": args.n_samples, "epochs": defaults["epochs"], "hidden": hidden, "lr": defaults["lr"],
            "batch_size": defaults["batch_size"], "init_sigma": defaults["init_sigma"],
            "metric": "Spearman rank correlation of latent (encoder mean) and true geodesic distances, "
                      "all pairs of the held-out test split",
            "cpu_s": "process CPU time of one run (training + per-epoch validation), runs one after another",
            "data_space_fidelity": data_fidelity}
    (args.out / RESULTS_FILE).write_text(json.dumps({"meta": meta, "summary": rows, "runs": runs, "table": table},
                                                    indent=1, default=str) + "\n")
    plot(args.out / FIGURE_FILE, seeds[0], *first, codes, args.pairs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
