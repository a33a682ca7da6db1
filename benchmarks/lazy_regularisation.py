"""Lazy regularisation on the bundled digits: what ``--reg-every k`` does to MCN, VoR, MSE and time.

``python benchmarks/lazy_regularisation.py --seeds 0,1,2 --out results/lazy_digits/results.json`` trains the
default digits IRVAE (all ten classes, latent 2, 30 epochs, seed 0 unless told) once per ``k``,
one after the other with one torch thread, and writes the test-split metrics, the training time
and the regulariser's share of the step time per run.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from benchmarks import report
from isofast.training.loop import TrainConfig, train


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True, help="results JSON")
    ap.add_argument("--every", default="1,4,16", help="comma-separated k values")
    ap.add_argument("--seeds", default="0", help="comma-separated seeds")
    ap.add_argument("--epochs", type=int, default=None, help="default: the digits default (30)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    runs = []
    for seed in map(int, args.seeds.split(",")):
        for k in map(int, args.every.split(",")):
            with tempfile.TemporaryDirectory() as tmp:
                m = train(TrainConfig(out=tmp, dataset="digits", model="irvae", seed=seed, epochs=args.epochs,
                                      reg_every=k, progress=False))
            hist = m["history"]
            share = sum(r["reg_share"] * r["epoch_time_s"] for r in hist) / sum(r["epoch_time_s"] for r in hist)
            run = {"every": k, "seed": seed, "epochs": len(hist), "mse": m["mse"], "mcn": m["mcn"], "vor": m["vor"],
                   "train_time_s": m["train_time_s"], "reg_share_of_step": share}
            print(json.dumps(run), flush=True)
            runs.append(run)
    env = report.environment(torch.device("cpu"))
    meta = {"torch_threads": 1, "load_average": report.load_average(), "dataset": "digits (all classes)",
            "model": "irvae, latent 2, official 4x256 MLPs, iso weight 100, exact estimator (auto, m = 2)",
            "note": "runs one after another in one process on a shared machine: times are indicative"}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"meta": {**env, **meta}, "runs": runs}, indent=1, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
