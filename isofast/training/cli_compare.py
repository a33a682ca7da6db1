"""``isofast compare``: the paper's figure. Trains a VAE and an IRVAE on the same data and seed,
draws both latent spaces with equidistant ellipses side by side (``OUT/compare.png``) and writes
the MSE / MCN / VoR table (``OUT/compare.json``, also printed).

Example (bundled digits, well under 3 minutes on 2 CPU cores)::

    isofast compare --out runs/compare
    isofast compare --dataset mnist --data-dir data/ --digits 0,1 --epochs 300 --out runs/mnist01
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time


from .cli_train import add_common_arguments, apply_threads, config_kwargs

#: The table's columns and what they mean (printed under the table).
COLUMNS = ("mse", "mcn", "vor")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_common_arguments(parser)
    parser.add_argument("--iso-weight", type=float, default=None, help="IRVAE regulariser weight (default: per dataset)")
    parser.add_argument("--out", required=True, help="output folder (runs go to OUT/vae and OUT/irvae)")


def format_table(rows: dict[str, dict[str, float]], selected: dict[str, dict[str, float]] | None = None) -> str:
    """A fixed-width text table of ``rows[model][column]`` (final models), then the selected models
    (best validation MSE) as ``MODEL@best`` rows with the step they were taken at."""
    lines = [f"{'model':<12}" + "".join(f"{c.upper():>12}" for c in COLUMNS) + f"{'time (s)':>12}{'CPU (s)':>12}"]
    for name, r in rows.items():
        lines.append(f"{name.upper():<12}" + "".join(f"{r[c]:>12.4g}" for c in COLUMNS)
                     + f"{r['train_time_s']:>12.1f}{r['train_cpu_s']:>12.1f}")
    for name, r in (selected or {}).items():
        lines.append(f"{name.upper() + '@best':<12}" + "".join(f"{r[c]:>12.4g}" for c in COLUMNS)
                     + f"{'step ' + str(r['step']):>12}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from . import distributed
    from .checkpoint import load_checkpoint
    from .data import load_dataset
    from .loop import CHECKPOINT_FILE, TrainConfig, evaluate, make_model, train

    apply_threads(args)
    rows: dict[str, dict[str, float]] = {}
    selected: dict[str, dict[str, float]] = {}
    panels = []
    t0 = time.perf_counter()
    try:
        for kind in ("vae", "irvae"):
            config = TrainConfig(out=os.path.join(args.out, kind), model=kind, iso_weight=args.iso_weight,
                                 **config_kwargs(args))  # type: ignore[arg-type]
            metrics = train(config)
            if not metrics:  # a non-zero DDP rank: nothing to report
                continue
            rows[kind] = {k: metrics[k] for k in (*COLUMNS, "train_time_s", "train_cpu_s")}
            if metrics["selected"]:
                selected[kind] = metrics["selected"]
            # Re-evaluate the final model from the saved checkpoint for the figure's codes.
            ckpt = load_checkpoint(os.path.join(config.out, CHECKPOINT_FILE))
            resolved = config.resolved()
            data = load_dataset(resolved.dataset, digits=resolved.digits, data_dir=resolved.data_dir,
                                n_samples=resolved.n_samples, seed=resolved.seed)
            model = make_model(resolved, data)
            model.load_state_dict(ckpt["model"])
            model.eval()
            _, z, h = evaluate(model, data.test, max_points=resolved.eval_points)
            panels.append((f"{kind.upper()}  MCN {metrics['mcn']:.3g}  VoR {metrics['vor']:.3g}",
                           z, h, data.test.y[: len(z)]))
    except (FileNotFoundError, ValueError) as exc:
        print(f"isofast compare: {exc}", file=sys.stderr)
        return 2
    finally:
        distributed.shutdown()
    if not rows:
        return 0
    table = format_table(rows, selected)
    result = {"models": rows, "selected": selected, "wall_time_s": time.perf_counter() - t0,
              "ratios": {"mcn_vae_over_irvae": rows["vae"]["mcn"] / rows["irvae"]["mcn"],
                         "mse_irvae_over_vae": rows["irvae"]["mse"] / rows["vae"]["mse"]},
              "table": table.splitlines()}
    with open(os.path.join(args.out, "compare.json"), "w") as f:
        json.dump(result, f, indent=2)
    if args.latent_dim == 2:
        import isofast.plotting

        isofast.plotting.side_by_side(panels, os.path.join(args.out, "compare.png"))
    print(table)
    print("Rows: the final models; MODEL@best: the official model selection (best validation MSE, "
          "checked every --select-every steps). MSE: held-out reconstruction error per pixel; MCN: mean condition number of the pullback "
          "metric (1 = locally isotropic); VoR: variance of the Riemannian metric (0 = homogeneous).")
    print(f"wrote {os.path.join(args.out, 'compare.json')}"
          + (f" and {os.path.join(args.out, 'compare.png')}" if args.latent_dim == 2 else ""))
    return 0
