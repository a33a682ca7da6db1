"""``isofast sweep``: the hierarchy experiment. Trains every (measure, weight, seed) cell plus the
unregularised baseline of each seed, scores each on held-out reconstruction (MSE), isotropy (MCN),
homogeneity (VoR) and geodesic fidelity on a flat synthetic manifold, and writes ``OUT/results.json``,
``OUT/summary.csv`` and ``OUT/pareto.png``. Interrupt it at any time: rerunning the same command
continues where it stopped and never retrains a finished cell.

Example (the full digits grid, 4 measures x 4 weights x 3 seeds + 3 baselines, each also trained
on the swiss roll)::

    isofast sweep --dataset digits --model irvae --measures isometry,scaled_isometry,conformal,volume \\
        --weights 0.1,1,10,100 --seeds 3 --out runs/sweep_digits

Defaults are sized so that this grid fits in 30 minutes on 2 CPU cores (see :data:`SWEEP_DEFAULTS`).
"""

from __future__ import annotations

import argparse
import os
import sys

from .cli_train import MEASURES, add_common_arguments, config_kwargs

#: Defaults of the sweep that differ from ``isofast train`` (cost: 99 training runs for the full grid).
SWEEP_DEFAULTS: dict[str, object] = {
    "epochs": 30,           # digits: the loop's default (13 steps per epoch)
    "fidelity_epochs": 30,  # swiss roll: the loop's default is 100
    "n_samples": 1500,      # swiss-roll points, all splits (1071 train, 214 test)
    "eval_points": 300,     # held-out points for MCN / VoR / fidelity (digits has 258 test images)
    "hidden": "256,256,256,256",
    "jobs": 2,
    "threads": 1,
    "checkpoint_every": 10,  # a checkpoint per epoch would write ~15 GB over the full grid
}


def _floats(text: str) -> list[float]:
    return [float(t) for t in text.split(",") if t.strip()]


def _measures(text: str) -> list[str]:
    out = [t.strip() for t in text.split(",") if t.strip()]
    bad = [m for m in out if m not in MEASURES]
    if bad or not out:
        raise argparse.ArgumentTypeError(f"unknown measure(s) {', '.join(bad) or '(none)'}; choose from {', '.join(MEASURES)}")
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_common_arguments(parser)
    parser.set_defaults(epochs=SWEEP_DEFAULTS["epochs"], n_samples=SWEEP_DEFAULTS["n_samples"],
                        hidden=SWEEP_DEFAULTS["hidden"], threads=SWEEP_DEFAULTS["threads"], measure=None,
                        checkpoint_every=SWEEP_DEFAULTS["checkpoint_every"])
    parser.add_argument("--model", default="irvae", choices=("irvae", "irae"),
                        help="regularised model (baseline: vae for irvae, ae for irae)")
    parser.add_argument("--measures", type=_measures, default=["isometry", "scaled_isometry", "conformal", "volume"],
                        help="comma-separated distortion measures (default: the four of the hierarchy)")
    parser.add_argument("--weights", type=_floats, default=[0.1, 1.0, 10.0, 100.0],
                        help="comma-separated positive regulariser weights (default: 0.1,1,10,100)")
    parser.add_argument("--seeds", type=int, default=3, help="number of seeds, starting at --seed (default: 3)")
    parser.add_argument("--fidelity-dataset", default="swissroll",
                        help="synthetic manifold with known coordinates for the geodesic-fidelity score: "
                             "swissroll (flat, default), shortroll (flat, short enough to unroll in 30 epochs), "
                             "spherecap (curved) or none")
    parser.add_argument("--fidelity-epochs", type=int, default=SWEEP_DEFAULTS["fidelity_epochs"],
                        help=f"epochs of the fidelity runs (default: {SWEEP_DEFAULTS['fidelity_epochs']})")
    parser.add_argument("--eval-points", type=int, default=SWEEP_DEFAULTS["eval_points"],
                        help=f"held-out points for MCN / VoR / fidelity (default: {SWEEP_DEFAULTS['eval_points']})")
    parser.add_argument("--jobs", type=int, default=SWEEP_DEFAULTS["jobs"],
                        help=f"cells trained at once, one process each (default: {SWEEP_DEFAULTS['jobs']})")
    parser.add_argument("--out", required=True, help="output folder (resumable: rerun the same command to continue)")
    parser.epilog = (f"Sweep defaults (differ from `isofast train`): epochs {SWEEP_DEFAULTS['epochs']}, "
                     f"n-samples {SWEEP_DEFAULTS['n_samples']}, threads {SWEEP_DEFAULTS['threads']} per job. "
                     "Seconds in results.json are the loop's training time (main + fidelity run).")


def spec_from_args(args: argparse.Namespace):  # noqa: ANN201 - SweepSpec (imported lazily)
    """The :class:`~isofast.training.sweep.SweepSpec` the command line describes."""
    from .sweep import SweepSpec

    if args.measure is not None:
        raise ValueError("--measure trains one measure; the sweep takes --measures (comma-separated)")
    if args.seeds < 1:
        raise ValueError(f"--seeds must be >= 1, got {args.seeds}")
    fidelity = None if str(args.fidelity_dataset).lower() in ("none", "off", "") else args.fidelity_dataset
    base = config_kwargs(args)
    for k in ("dataset", "epochs", "measure", "seed"):
        base.pop(k)
    base.update(progress=False, eval_points=args.eval_points)
    return SweepSpec(out=args.out, dataset=args.dataset, model=args.model, measures=args.measures,
                     weights=args.weights, seeds=list(range(args.seed, args.seed + args.seeds)),
                     epochs=args.epochs, fidelity_dataset=fidelity, fidelity_epochs=args.fidelity_epochs,
                     base=base)


def run(args: argparse.Namespace) -> int:
    from .sweep import format_summary, run_sweep, summarize

    try:
        spec = spec_from_args(args)
        records = run_sweep(spec, jobs=args.jobs, threads=args.threads, progress=args.progress)
    except (FileNotFoundError, ValueError) as exc:
        print(f"isofast sweep: {exc}", file=sys.stderr)
        return 2
    print(format_summary(summarize(records)))
    print("MSE: held-out reconstruction error per pixel; MCN: mean condition number (1 = isotropic); "
          "VoR: variance of the Riemannian metric (0 = homogeneous); geo. fidelity: rank correlation of "
          f"latent and true geodesic distances on {spec.fidelity_dataset or '(skipped)'} (1 = perfect).")
    print(f"wrote {', '.join(os.path.join(args.out, f) for f in ('results.json', 'summary.csv', 'pareto.png'))}")
    return 0
