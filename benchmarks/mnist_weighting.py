"""The regulariser weighting on MNIST 0/1: official constant weight against ``recon_scale``.

Trains the official IRVAE setting (latent dim 2, 4 x 256 ReLU MLPs, Adam lr 1e-4, batch 100,
weight 100, eta 0.2, initial sigma 1) once per weighting, one after the other, on one CPU thread,
and writes validation MSE / MCN / VoR and the decoder noise sigma per epoch, plus the final and
the selected (best validation MSE) models' test metrics, to one JSON file::

    python benchmarks/mnist_weighting.py --data-dir ../shared/data/mnist --epochs 40 \\
        --runs runs/weighting --out results/mnist01_weighting_40ep_seed0.json

and draws validation MSE, MCN, VoR and sigma against epochs next to it (``.png``); ``--plot-only``
redraws the figure from an existing JSON. ``--pareto A.json B.json ... --out P.png`` draws test MSE
against test MCN of the final models of several such files, one line per weighting across weights.
``--merge A.json B.json ... --out C.json`` gathers the runs of several files (one per seed, say)
into one, keyed ``"<weighting> w<weight> seed <seed>"``, with a per-weighting summary (mean and
range of the test metrics over seeds), and draws them together.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import torch

from isofast.training.loop import TrainConfig, train

WEIGHTINGS = ("constant", "recon_scale")
HISTORY_KEYS = ("epoch", "val_mse", "val_mcn", "val_vor", "sigma", "reg", "epoch_time_s")


def plot(result: dict[str, object], path: str) -> None:
    """Validation MSE, MCN, VoR and the decoder noise sigma against epochs, one line per weighting."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(13, 3.2))
    panels = (("val_mse", "validation MSE"), ("val_mcn", "validation MCN"), ("val_vor", "validation VoR"),
              ("sigma", "decoder noise sigma"))
    for i, (key, title) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), i + 1)
        for weighting, run in result["runs"].items():  # type: ignore[attr-defined]
            h = run["history"]
            ax.plot([r["epoch"] for r in h], [r[key] for r in h], label=weighting)
        ax.set_title(title)
        ax.set_xlabel("epoch")
        if key == "val_mse":
            ax.set_yscale("log")
    fig.axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def pareto(files: list[str], path: str) -> None:
    """Test MSE against test MCN (final models), one line per weighting through its weights."""
    from matplotlib.figure import Figure

    points: dict[str, list[tuple[float, float, float]]] = {}
    for name in files:
        with open(name) as f:
            result = json.load(f)
        for weighting, run in result["runs"].items():
            t = run["test_final"]
            points.setdefault(weighting, []).append((result["setting"]["iso_weight"], t["mse"], t["mcn"]))
    fig = Figure(figsize=(5, 4))
    ax = fig.add_subplot(1, 1, 1)
    for weighting, pts in points.items():
        pts.sort()
        ax.plot([p[2] for p in pts], [p[1] for p in pts], "o-", label=weighting)
        for w, mse, mcn in pts:
            ax.annotate(f"{w:g}", (mcn, mse), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel("test MCN")
    ax.set_ylabel("test MSE")
    ax.set_title("final models, labelled by weight")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def merge(files: list[str]) -> dict[str, object]:
    """The runs of several result files in one, with the test metrics summarised per weighting and weight."""
    merged: dict[str, object] = {"setting": None, "machine": None, "runs": {}, "summary": {}}
    for name in files:
        with open(name) as f:
            result = json.load(f)
        setting = dict(result["setting"])
        merged["setting"] = merged["setting"] or {k: v for k, v in setting.items() if k not in ("seed", "iso_weight")}
        merged["machine"] = merged["machine"] or result["machine"]
        for weighting, run in result["runs"].items():
            key = f"{weighting} w{setting['iso_weight']:g} seed {setting['seed']}"
            merged["runs"][key] = run  # type: ignore[index]
            group = merged["summary"].setdefault(f"{weighting} w{setting['iso_weight']:g}", {"seeds": []})  # type: ignore[union-attr]
            group["seeds"].append(setting["seed"])
            for which in ("test_final", "test_selected"):
                for metric in ("mse", "mcn", "vor"):
                    group.setdefault(which, {}).setdefault(metric, []).append(run[which][metric])
    for group in merged["summary"].values():  # type: ignore[union-attr]
        for which in ("test_final", "test_selected"):
            group[which] = {k: {"mean": sum(v) / len(v), "min": min(v), "max": max(v)} for k, v in group[which].items()}
    return merged


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir")
    ap.add_argument("--digits", default="0,1")
    ap.add_argument("--epochs", type=int, default=40)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--weight", type=float, default=100.0)
    ap.add_argument("--weightings", default=",".join(WEIGHTINGS), help="comma-separated, run in this order")
    ap.add_argument("--runs", help="folder for the training runs (not committed)")
    ap.add_argument("--out", required=True, help="results JSON (the figure is written next to it)")
    ap.add_argument("--pareto", nargs="+", metavar="JSON", help="draw the MSE / MCN figure of these results to OUT")
    ap.add_argument("--plot-only", action="store_true", help="redraw OUT's figure, train nothing")
    ap.add_argument("--merge", nargs="+", metavar="JSON", help="gather these results' runs into OUT and draw them")
    args = ap.parse_args()
    if args.pareto:
        pareto(args.pareto, args.out)
        return
    if args.merge:
        result = merge(args.merge)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
        plot(result, os.path.splitext(args.out)[0] + ".png")
        return
    if not (args.data_dir and args.runs):
        ap.error("--data-dir and --runs are needed to train")
    figure = os.path.splitext(args.out)[0] + ".png"
    if args.plot_only:
        with open(args.out) as f:
            plot(json.load(f), figure)
        return
    torch.set_num_threads(1)
    result: dict[str, object] = {
        "setting": {"dataset": "mnist", "digits": args.digits, "model": "irvae", "epochs": args.epochs,
                    "seed": args.seed, "iso_weight": args.weight, "official defaults": "lr 1e-4, batch 100, "
                    "eta 0.2, latent 2, 4x256 ReLU, init sigma 1, scaled_isometry"},
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "threads": 1,
                    "torch": torch.__version__},
        "runs": {},
    }
    for weighting in args.weightings.split(","):
        t0 = time.process_time()
        m = train(TrainConfig(out=os.path.join(args.runs, weighting), dataset="mnist", data_dir=args.data_dir,
                              digits=args.digits, model="irvae", epochs=args.epochs, seed=args.seed,
                              iso_weight=args.weight, iso_weighting=weighting, progress=False))
        result["runs"][weighting] = {  # type: ignore[index]
            "test_final": {k: m[k] for k in ("mse", "mcn", "vor")},
            "test_selected": m["selected"],
            "cpu_time_s": time.process_time() - t0,
            "history": [{k: r[k] for k in HISTORY_KEYS} for r in m["history"]],
        }
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
        print(weighting, result["runs"][weighting]["test_final"], flush=True)  # type: ignore[index]
    plot(result, figure)


if __name__ == "__main__":
    main()
