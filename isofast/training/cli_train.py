"""``isofast train``: train one AE / VAE / IRAE / IRVAE and write config, metrics, checkpoint, plot, log.

Example::

    isofast train --dataset digits --model irvae --latent-dim 2 --epochs 30 --seed 0 --out runs/irvae
    isofast train --out runs/irvae --epochs 60 --resume          # continue the same run to 60 epochs
    torchrun --nproc_per_node 2 -m isofast train --out runs/ddp  # DistributedDataParallel

Options left unset take the per-dataset defaults of ``isofast.training.loop.DATASET_DEFAULTS``.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys

import isofast

from .data import DATASETS
from .models import DECODERS, MODELS, OFFICIAL_HIDDEN, WEIGHTINGS

# The train extra is imported lazily inside the loop; check it here, at command import time, so
# that isofast.cli turns a missing package into its "pip install isofast[train]" message.
for _extra in ("sklearn", "matplotlib", "tqdm"):
    if importlib.util.find_spec(_extra) is None:
        raise ModuleNotFoundError(f"No module named {_extra!r}", name=_extra)

MEASURES = tuple(isofast.MEASURES)


def _eta(text: str) -> float | None:
    return None if text.lower() in ("none", "off") else float(text)


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    """Data, architecture and optimisation options shared by ``train`` and ``compare``."""
    parser.add_argument("--dataset", default="digits", choices=DATASETS, help="default: digits (bundled with scikit-learn)")
    parser.add_argument("--digits", default=None, help="class subset, e.g. 0,1,5 (default: all)")
    parser.add_argument("--data-dir", default=None, help="folder with the MNIST / Fashion-MNIST IDX files")
    parser.add_argument("--latent-dim", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=None, help="total epochs (default: per dataset; digits 30)")
    parser.add_argument("--measure", default="scaled_isometry", choices=MEASURES, help="distortion measure of the regulariser")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=100, help="global batch size (split across DDP ranks)")
    parser.add_argument("--lr", type=float, default=None, help="Adam learning rate (default: per dataset; digits 1e-3, MNIST 1e-4)")
    parser.add_argument("--eta", type=_eta, default=0.2, help="mixup extrapolation of the regulariser's codes; 'none' disables mixup")
    parser.add_argument("--estimator", default="auto", help="isofast estimator: auto, exact, forward, hutchinson")
    parser.add_argument("--n-probes", type=int, default=1, help="Hutchinson probes per sample")
    parser.add_argument("--reg-every", type=int, default=1,
                        help="lazy regularisation: apply the regulariser every k-th step, scaled by k (default 1)")
    parser.add_argument("--reg-subsample", type=float, default=1.0,
                        help="regularise a random fraction of each batch, in (0, 1] (default 1)")
    parser.add_argument("--decoder", default="mlp", choices=DECODERS)
    parser.add_argument("--hidden", default=",".join(map(str, OFFICIAL_HIDDEN)), help="hidden widths of encoder and decoder MLPs")
    parser.add_argument("--n-samples", type=int, default=3000, help="points of a synthetic manifold")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    parser.add_argument("--init-sigma", type=float, default=None, help="initial decoder noise scale of the VAEs (default: per dataset; digits 0.1, MNIST 1)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op CPU threads (default 1, like torchrun; 0 = torch's default, one per core)")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar or per-epoch lines")
    parser.add_argument("--checkpoint-every", type=int, default=1,
                        help="write OUT/checkpoint.pt every N epochs (the last epoch always); --resume continues from it")
    parser.add_argument("--iso-weighting", default="constant", choices=WEIGHTINGS,
                        help="constant (official) or recon_scale: the weight times sigma0^2/sigma^2 (detached), "
                             "so the regulariser does not fade as the VAE's decoder noise sigma shrinks")
    parser.add_argument("--select-every", type=int, default=100,
                        help="official model selection: keep the model with the best validation MSE checked every "
                             "N steps, reported beside the final model (0: off)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_common_arguments(parser)
    parser.add_argument("--model", default="irvae", choices=MODELS)
    parser.add_argument("--iso-weight", type=float, default=None, help="regulariser weight (default: per dataset and model)")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt up to --epochs")
    parser.add_argument("--tensorboard", action="store_true", help="also log to OUT/tensorboard (needs tensorboard)")


def config_kwargs(args: argparse.Namespace) -> dict[str, object]:
    """The :class:`~isofast.training.loop.TrainConfig` fields shared by the commands."""
    return {
        "dataset": args.dataset, "digits": args.digits, "data_dir": args.data_dir,
        "latent_dim": args.latent_dim, "epochs": args.epochs, "measure": args.measure, "seed": args.seed,
        "batch_size": args.batch_size, "lr": args.lr, "init_sigma": args.init_sigma, "eta": args.eta, "estimator": args.estimator,
        "n_probes": args.n_probes, "reg_every": args.reg_every, "reg_subsample": args.reg_subsample,
        "decoder": args.decoder,
        "hidden": parse_hidden(args.hidden), "n_samples": args.n_samples,
        "device": args.device, "progress": args.progress, "checkpoint_every": args.checkpoint_every,
        "select_every": args.select_every, "iso_weighting": args.iso_weighting,
    }


def parse_hidden(text: str) -> list[int]:
    """``"256,256"`` -> ``[256, 256]``; the widths themselves are checked by the loop."""
    try:
        return [int(h) for h in str(text).replace(" ", "").split(",") if h]
    except ValueError:
        raise ValueError(f"--hidden must be comma-separated widths >= 1 (e.g. 256,256), got {text!r}") from None


def apply_threads(args: argparse.Namespace) -> None:
    """``--threads``: default 1. The official-size MLPs at batch 100 are too small for intra-op
    parallelism to pay much, and on a busy 2-core machine torch's default (one thread per core)
    measured 4-10x *slower* per step than one thread (OpenMP threads spinning against other
    processes). torchrun also defaults to one thread per process. ``0`` keeps torch's default."""
    if args.threads and args.threads > 0:
        import torch

        torch.set_num_threads(args.threads)


def run(args: argparse.Namespace) -> int:
    from . import distributed
    from .loop import TrainConfig, train

    apply_threads(args)
    try:
        config = TrainConfig(out=args.out, model=args.model, iso_weight=args.iso_weight, resume=args.resume,
                             tensorboard=args.tensorboard, **config_kwargs(args))  # type: ignore[arg-type]
        metrics = train(config)
    except (FileNotFoundError, ValueError) as exc:
        print(f"isofast train: {exc}", file=sys.stderr)
        return 2
    finally:
        distributed.shutdown()
    if metrics:
        print(f"{args.model}: mse {metrics['mse']:.4g}  mcn {metrics['mcn']:.4g}  vor {metrics['vor']:.4g}"
              + (f"  geodesic_fidelity {metrics['geodesic_fidelity']:.4f}" if "geodesic_fidelity" in metrics else "")
              + f"  ({metrics['train_time_s']:.1f} s) -> {args.out}")
        sel = metrics["selected"]
        if sel:
            print(f"{args.model} selected (best validation MSE, step {sel['step']}): mse {sel['mse']:.4g}  "
                  f"mcn {sel['mcn']:.4g}  vor {sel['vor']:.4g}")
    return 0
