"""The reference training loop: configure, train, evaluate, checkpoint, write the outputs.

``train(TrainConfig(...))`` writes into ``out``:

- ``config.json``: the resolved configuration (every default filled in) and, under ``resumes``,
  each resume's starting epoch and the options it changed (:data:`RESUME_HONOURED`);
- ``log.csv`` and ``metrics.json["history"]``: one row per epoch (training means, validation
  metrics, epoch time, the regulariser's share of the step time, the learning rate, the VAEs'
  decoder noise sigma);
- ``metrics.json``: final ``mse`` / ``mcn`` / ``vor`` (plus ``geodesic_fidelity`` on synthetic
  manifolds) on the held-out *test* split, computed on encoder means with the exact pullback
  metric ``isofast.pullback_metric``; under ``selected`` the same for the official model selection
  (the best validation MSE checked every ``select_every`` steps) with its step and epoch;
- ``checkpoint.pt``: model, optimizer, history, the selected model and every RNG state (torch,
  numpy, python and the data-order generator, per rank), with a content checksum, written new ->
  verified -> replaced (:mod:`.checkpoint`); ``resume=True`` verifies it, continues up to the new
  ``epochs`` total and reproduces an uninterrupted run exactly;
- ``latent.png``: test codes coloured by label with equidistant ellipses (latent dim 2 only).

Defaults (``DATASET_DEFAULTS``) follow the official IRVAE code (Adam, batch 100, eta 0.2, lr 1e-4
and iso weight 100 on MNIST, 4 x 256 ReLU MLPs) except where a dataset needs otherwise:

- ``digits``: lr 1e-3 (official 1e-4), 30 epochs and initial decoder noise sigma 0.1 (official 1).
  load_digits has 1283 training images, i.e. 13 steps per epoch and 390 steps in 30 epochs (the
  official MNIST 0/1 run takes ~31k steps), hence the larger lr. Starting from sigma = 1, Adam
  moves log-sigma by only ~0.4 in 390 steps and the VAE stayed collapsed onto its prior (measured
  KL 0.0007 nats after 30 epochs); from sigma 0.1 it uses its latent space. The IRVAE weight is the
  official 100: measured MCN ~1.45 with a lower MSE than the VAE (seeds 0, 1, 2).
- ``swissroll`` / ``spherecap``: lr 1e-3, sigma 0.1, 3000 points, vector data (linear decoder
  output), 100 epochs, IRVAE weight 10 (starting points for sweeps, not tuned results).
- ``shortroll``: the same but 30 epochs, enough for the IRVAE and IRAE to unroll it
  (``benchmarks/geodesic_fidelity.py``); weights left at the synthetic defaults, untuned.
- ``irae`` (not in the official code): the AE loss is a per-pixel mean (the VAE's is a sum over
  pixels divided by sigma^2), so its weight is on another scale: 0.1 (on digits: MCN 1.36 against
  the AE's 6.2, for 1.2x the AE's MSE).

Under ``torchrun`` the model is wrapped in DistributedDataParallel, data is sharded with a
DistributedSampler, ``batch_size`` is the *global* batch (split evenly across ranks, so the loss is the global-batch
loss whatever the number of processes; the sampling noise differs per rank), the distortion all-reduces its batch means
(``sync=True``) and only rank 0 evaluates and writes files.
"""

from __future__ import annotations

import copy
import csv
import dataclasses
import json
import math
import os
import random
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

import isofast
import isofast.metrics

from . import distributed as D
from .data import DataBundle, Split, load_dataset
from .checkpoint import load_checkpoint, save_checkpoint
from .models import DECODERS, MODELS, OFFICIAL_HIDDEN, WEIGHTINGS, IsoAutoencoder, build_model

#: Per-dataset defaults for the options left as ``None`` in :class:`TrainConfig`.
DATASET_DEFAULTS: dict[str, dict[str, Any]] = {
    "digits": {"lr": 1e-3, "epochs": 30, "init_sigma": 0.1, "iso_weight": {"irvae": 100.0, "irae": 0.1}},
    "mnist": {"lr": 1e-4, "epochs": 300, "init_sigma": 1.0, "iso_weight": {"irvae": 100.0, "irae": 0.1}},
    "fmnist": {"lr": 1e-4, "epochs": 300, "init_sigma": 1.0, "iso_weight": {"irvae": 100.0, "irae": 0.1}},
    "swissroll": {"lr": 1e-3, "epochs": 100, "init_sigma": 0.1, "iso_weight": {"irvae": 10.0, "irae": 0.1}},
    "spherecap": {"lr": 1e-3, "epochs": 100, "init_sigma": 0.1, "iso_weight": {"irvae": 10.0, "irae": 0.1}},
    "shortroll": {"lr": 1e-3, "epochs": 30, "init_sigma": 0.1, "iso_weight": {"irvae": 10.0, "irae": 0.1}},
}
#: Files written in ``out``.
CONFIG_FILE, METRICS_FILE, CHECKPOINT_FILE, LOG_FILE, LATENT_FILE = (
    "config.json", "metrics.json", "checkpoint.pt", "log.csv", "latent.png",
)
#: Options a ``--resume`` honours when they differ from the checkpoint's: ``epochs`` (the new
#: total), ``lr`` (applied to the optimizer from the resumed epoch on; Adam's moments are kept) and
#: the ones that do not change the result. Every other option changes what the checkpoint's
#: weights, data or RNG streams mean, so a different value is refused. Options left unset
#: (``None``) on a resume take the checkpoint's values.
RESUME_HONOURED = ("out", "epochs", "lr", "data_dir", "device", "resume", "tensorboard", "checkpoint_every", "progress")
# Options whose ``None`` means "the default" (not e.g. ``eta=None``, which disables mixup).
_DEFAULTED = ("epochs", "lr", "iso_weight", "init_sigma", "data_dir", "digits")


@dataclass
class TrainConfig:
    """Everything a run depends on; ``None`` means the per-dataset default (``DATASET_DEFAULTS``)."""

    out: str
    dataset: str = "digits"
    model: str = "irvae"
    latent_dim: int = 2
    epochs: int | None = None
    iso_weight: float | None = None
    measure: str = "scaled_isometry"
    seed: int = 0
    digits: str | None = None
    data_dir: str | None = None
    batch_size: int = 100
    lr: float | None = None
    init_sigma: float | None = None
    eta: float | None = 0.2
    estimator: str = "auto"
    n_probes: int = 1
    reg_every: int = 1
    reg_subsample: float = 1.0
    decoder: str = "mlp"
    hidden: list[int] = field(default_factory=lambda: list(OFFICIAL_HIDDEN))
    n_samples: int = 3000
    device: str = "auto"
    resume: bool = False
    tensorboard: bool = False
    checkpoint_every: int = 1
    progress: bool = True
    eval_points: int = 2000
    #: Official model selection: every ``select_every`` optimiser steps the validation MSE is
    #: checked and the best model kept beside the final one (0: off).
    select_every: int = 100
    #: ``constant`` (official) or ``recon_scale``: see :data:`~.models.WEIGHTINGS`.
    iso_weighting: str = "constant"

    def resolved(self) -> TrainConfig:
        """A copy with every ``None`` default filled in from :data:`DATASET_DEFAULTS`, validated.

        Raises:
            ValueError: one line naming the option, what it must be and what was given.
        """
        if self.dataset not in DATASET_DEFAULTS:
            raise ValueError(f"unknown dataset {self.dataset!r}; choose one of {', '.join(DATASET_DEFAULTS)}")
        d = DATASET_DEFAULTS[self.dataset]
        c = dataclasses.replace(self, hidden=list(self.hidden))
        c.lr = d["lr"] if c.lr is None else c.lr
        c.epochs = d["epochs"] if c.epochs is None else c.epochs
        c.init_sigma = d["init_sigma"] if c.init_sigma is None else c.init_sigma
        if c.iso_weight is None:
            c.iso_weight = d["iso_weight"].get(c.model, 0.0)
        if c.model in ("ae", "vae"):
            c.iso_weight = 0.0
        _validate(c)
        return c


def _check(ok: bool, option: str, expected: str, given: object) -> None:
    if not ok:
        raise ValueError(f"{option} must be {expected}, got {given!r}")


def _validate(c: TrainConfig) -> None:
    """Refuse, before anything is trained or written, every option the loop cannot honour."""
    _check(c.model in MODELS, "--model", f"one of {', '.join(MODELS)}", c.model)
    _check(c.decoder in DECODERS, "--decoder", f"one of {', '.join(DECODERS)}", c.decoder)
    _check(c.iso_weighting in WEIGHTINGS, "--iso-weighting", f"one of {', '.join(WEIGHTINGS)}", c.iso_weighting)
    _check(not (c.iso_weighting == "recon_scale" and c.model in ("ae", "irae")), "--iso-weighting recon_scale",
           "used with a VAE model (vae, irvae; the AE loss has no learned scale)", c.model)
    for option, value, least in (("--epochs", c.epochs, 1), ("--latent-dim", c.latent_dim, 1),
                                 ("--batch-size", c.batch_size, 1), ("--n-probes", c.n_probes, 1),
                                 ("--checkpoint-every", c.checkpoint_every, 1), ("eval_points", c.eval_points, 1),
                                 ("--select-every", c.select_every, 0),
                                 # 7 points: the smallest sample whose in-order split leaves a
                                 # non-empty validation and test split.
                                 ("--n-samples", c.n_samples, 7)):
        _check(isinstance(value, int) and not isinstance(value, bool) and value >= least, option,
               f"an integer >= {least}", value)
    _check(isinstance(c.reg_every, int) and not isinstance(c.reg_every, bool) and c.reg_every >= 1, "--reg-every",
           "an integer >= 1", c.reg_every)
    _check(isinstance(c.reg_subsample, (int, float)) and 0 < c.reg_subsample <= 1, "--reg-subsample",
           "a fraction in (0, 1]", c.reg_subsample)
    _check(all(isinstance(h, int) and h >= 1 for h in c.hidden), "--hidden",
           "comma-separated widths >= 1 (e.g. 256,256)", ",".join(map(str, c.hidden)))
    for option, value, low in (("--lr", c.lr, "> 0"), ("--init-sigma", c.init_sigma, "> 0"),
                               ("--iso-weight", c.iso_weight, ">= 0")):
        ok = isinstance(value, (int, float)) and math.isfinite(value) and (value >= 0 if low == ">= 0" else value > 0)
        _check(ok, option, f"a finite number {low}", value)


# ----------------------------------------------------------------------------- RNG state


def rng_state(generator: torch.Generator) -> dict[str, Any]:
    """Every RNG this loop draws from, as tensors and plain Python values (safe for weights_only)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached": float(cached)},
        "python": random.getstate(),
        "generator": generator.get_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any], generator: torch.Generator) -> None:
    """Inverse of :func:`rng_state`."""
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    generator.set_state(state["generator"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


# ----------------------------------------------------------------------------- timing the regulariser


class _Stopwatch(torch.autograd.Function):
    """Identity whose backward calls ``clock()``: marks when autograd reaches this point."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, clock: Callable[[], None]) -> Tensor:  # noqa: ANN401
        ctx.clock = clock
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:  # noqa: ANN401
        ctx.clock()
        return grad, None


class RegTimer:
    """Measures the regulariser's forward + backward time inside a training step.

    Identity stopwatches wrap the codes entering ``isofast.distortion`` and the value leaving it.
    The model computes the distortion last, so its autograd nodes carry the highest sequence numbers
    and the engine runs its whole backward first: from the output stopwatch's backward to the input
    stopwatch's backward. On CUDA the marks are events (no synchronisation inside the step).
    """

    def __init__(self, model: IsoAutoencoder, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.marks: dict[str, Any] = {}
        if model.regularised:
            model.reg_input_hook = lambda z: self._wrap(z, "f0", "b1")
            model.reg_output_hook = lambda r: self._wrap(r, "f1", "b0")

    def _now(self) -> Any:  # noqa: ANN401
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            return ev
        return time.perf_counter()

    def mark(self, name: str) -> None:
        self.marks[name] = self._now()

    def _wrap(self, x: Tensor, fwd: str, bwd: str) -> Tensor:
        self.mark(fwd)
        return _Stopwatch.apply(x, lambda: self.mark(bwd))

    def _dt(self, a: str, b: str) -> float:
        if self.cuda:
            return self.marks[a].elapsed_time(self.marks[b]) / 1000.0
        return self.marks[b] - self.marks[a]

    def read(self) -> tuple[float, float]:
        """``(step seconds, regulariser seconds)`` of the last step (call after it finished)."""
        if self.cuda:
            torch.cuda.synchronize()
        step = self._dt("start", "end")
        reg = self._dt("f0", "f1") + self._dt("b0", "b1") if "b1" in self.marks else 0.0
        self.marks.clear()
        return step, reg


# ----------------------------------------------------------------------------- step / evaluation


def train_step(model: nn.Module, x: Tensor, optimizer: torch.optim.Optimizer, timer: RegTimer | None = None) -> dict[str, Tensor]:
    """One optimiser step on the batch ``x (B, D)``; returns the (detached) loss parts."""
    if timer is not None:
        timer.mark("start")
    optimizer.zero_grad(set_to_none=True)
    parts = model(x)
    parts["loss"].backward()
    optimizer.step()
    if timer is not None:
        timer.mark("end")
    return {k: v.detach() for k, v in parts.items()}


#: Codes per exact-metric call in :func:`evaluate`.
EVAL_CHUNK = 128


def evaluate(
    model: IsoAutoencoder,
    split: Split,
    *,
    geodesic: Callable[[Tensor], Tensor] | None = None,
    max_points: int = 2000,
) -> tuple[dict[str, float], Tensor, Tensor]:
    """Held-out metrics on encoder means.

    Returns:
        ``({"mse", "mcn", "vor"[, "geodesic_fidelity"]}, z (N, m), H (N, m, m))`` where ``mse`` is
        the per-pixel reconstruction error of ``decoder(encoder mean)`` over the whole split and
        MCN / VoR use the exact pullback metric on the first ``max_points`` codes (in float64, so
        badly conditioned VAE metrics are not rounding noise).
    """
    with torch.no_grad():
        z = model.encode(split.x)
        mse = float(((model.decoder(z) - split.x) ** 2).mean())
    z = z[:max_points]
    dec64 = copy.deepcopy(model.decoder).to(torch.float64)
    # In chunks: the exact metric carries m tangent streams per code, so one call over 2000 codes of
    # a conv decoder would hold gigabytes of float64 activations.
    h = torch.cat([isofast.pullback_metric(dec64, c).detach() for c in z.to(torch.float64).split(EVAL_CHUNK)])
    out = {
        "mse": mse,
        "mcn": float(isofast.metrics.mean_condition_number(h)),
        "vor": float(isofast.metrics.variance_of_riemannian_metric(h)),
    }
    if geodesic is not None and split.coords is not None:
        from .data import geodesic_fidelity

        coords = split.coords[:max_points]
        out["geodesic_fidelity"] = geodesic_fidelity(z, geodesic(coords))
    return out, z.detach().cpu(), h.cpu()


# ----------------------------------------------------------------------------- files


def _write_json(path: str, obj: Any) -> None:  # noqa: ANN401
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)


def _write_csv(path: str, history: list[dict[str, float]]) -> None:
    if not history:
        return
    keys = list(history[0])
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys, extrasaction="ignore")
        w.writeheader()
        w.writerows(history)


def save_latent_plot(path: str, z: Tensor, h: Tensor, labels: Tensor, title: str) -> None:
    """Latent codes coloured by label with equidistant ellipses (no pyplot: backend-agnostic)."""
    from matplotlib.figure import Figure

    import isofast.plotting

    fig = Figure(figsize=(6, 6))
    isofast.plotting.plot_latent_ellipses(z, h, labels, ax=fig.add_subplot(1, 1, 1), title=title)
    fig.savefig(path, dpi=100)


class _TensorBoard:
    """Optional TensorBoard scalars; a no-op with a clear message when tensorboard is missing."""

    def __init__(self, enabled: bool, logdir: str) -> None:
        self.writer = None
        if not enabled:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            print("--tensorboard: the tensorboard package is not installed (pip install tensorboard); "
                  "logging to log.csv only", file=sys.stderr)
            return
        self.writer = SummaryWriter(logdir)

    def log(self, row: dict[str, float]) -> None:
        if self.writer is not None:
            for k, v in row.items():
                if k != "epoch":
                    self.writer.add_scalar(k, v, int(row["epoch"]))
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


# ----------------------------------------------------------------------------- the loop


def make_model(config: TrainConfig, data: DataBundle) -> IsoAutoencoder:
    """The model ``config`` describes, for ``data`` (call after seeding: initialisation is random)."""
    return build_model(
        config.model, data.data_dim, config.latent_dim, hidden=config.hidden, decoder=config.decoder,
        image_shape=data.image_shape, iso_weight=float(config.iso_weight or 0.0), measure=config.measure,
        eta=config.eta, estimator=config.estimator, n_probes=config.n_probes,
        init_sigma=float(config.init_sigma or 1.0), iso_weighting=config.iso_weighting,
        reg_every=config.reg_every, reg_subsample=config.reg_subsample,
    )


def resume_config(requested: TrainConfig, saved: dict[str, Any], path: str) -> tuple[TrainConfig, dict[str, list[Any]]]:
    """The configuration of a ``--resume`` of the checkpoint at ``path`` (saved resolved config
    ``saved``), and the honoured changes ``{option: [checkpoint's, now]}``.

    Options left ``None`` take the checkpoint's values; :data:`RESUME_HONOURED` options may differ;
    any other difference is refused.

    Raises:
        ValueError: naming every option that differs and what to do.
    """
    inherit = {k: saved[k] for k in _DEFAULTED if getattr(requested, k) is None and saved.get(k) is not None}
    config = dataclasses.replace(requested, **inherit).resolved()
    now = dataclasses.asdict(config)
    refused = [k for k in now if k not in RESUME_HONOURED and saved.get(k) != now[k]]
    if refused:
        detail = ", ".join(f"{k}: {saved.get(k)!r} -> {now[k]!r}" for k in refused)
        raise ValueError(f"--resume: {path} was trained with other options ({detail}); a resume cannot change "
                         f"them: pass the checkpoint's values (or leave them out where they default to it), "
                         f"or start a new run in another --out folder")
    # Recorded in config.json: the honoured changes that a reader of the run should know about.
    changed = {k: [saved.get(k), now[k]] for k in RESUME_HONOURED
               if k not in ("out", "epochs", "resume", "progress") and saved.get(k) != now[k]}
    return config, changed


def _check_out(out: str) -> None:
    """``out`` must be (or become) a folder this process can write to."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise ValueError(f"--out {out} is a file, not a folder: name a folder (it is created if missing)")
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as exc:
        raise ValueError(f"--out {out}: cannot create the folder ({exc.strerror or exc})") from exc
    probe = os.path.join(out, f".write-test{os.getpid()}")
    try:
        if not os.access(out, os.W_OK | os.X_OK):
            raise PermissionError(13, "Permission denied")
        with open(probe, "w"):
            pass
        os.remove(probe)
    except OSError as exc:
        raise ValueError(f"--out {out}: the folder is not writable ({exc.strerror or exc}); choose another --out") from exc


def train(config: TrainConfig) -> dict[str, Any]:
    """Train ``config`` (single process or under torchrun) and write the outputs; returns the final
    metrics (rank 0; other ranks return ``{}``).

    Raises:
        ValueError: an option the loop cannot honour (one line each; ``CheckpointError`` for a
            damaged checkpoint), before anything is trained or written.
        FileNotFoundError: missing dataset files.
    """
    ckpt = None
    changed: dict[str, list[Any]] = {}
    ckpt_path = os.path.join(config.out, CHECKPOINT_FILE)
    if config.resume and os.path.isfile(ckpt_path):
        ckpt = load_checkpoint(ckpt_path)
        config, changed = resume_config(config, ckpt["config"], ckpt_path)
        if config.epochs < int(ckpt["epoch"]):  # type: ignore[operator]
            raise ValueError(f"--resume: --epochs {config.epochs} is below the {ckpt['epoch']} epochs {ckpt_path} "
                             f"already trained; pass --epochs >= {ckpt['epoch']}")
    else:
        config = config.resolved()
    device = D.resolve_device(config.device, int(os.environ.get("LOCAL_RANK", "0")))
    info = D.init(device)
    if config.batch_size % info.world_size:
        raise ValueError(f"--batch-size {config.batch_size} (global) must divide by the {info.world_size} processes")
    try:
        return _train(config, device, info, ckpt, changed)
    finally:
        D.barrier(info)


def _selected_metrics(config: TrainConfig, data: DataBundle, best: dict[str, Any] | None,
                      test: Split) -> dict[str, Any] | None:
    """Test metrics of the selected (best validation MSE) model, with when it was found."""
    if best is None:
        return None
    model = make_model(config, data).to(test.x.device)
    model.load_state_dict(best["model"])
    model.eval()
    scores, _, _ = evaluate(model, test, geodesic=data.geodesic, max_points=config.eval_points)
    return {**scores, "step": best["step"], "epoch": best["epoch"], "val_mse": best["val_mse"]}


def _val_mse(model: IsoAutoencoder, x: Tensor) -> float:
    with torch.no_grad():
        return float(((model.decoder(model.encode(x)) - x) ** 2).mean())


def _train(config: TrainConfig, device: torch.device, info: D.DistInfo, ckpt: dict[str, Any] | None,
           changed: dict[str, list[Any]]) -> dict[str, Any]:
    out = config.out
    if info.is_main:
        _check_out(out)
    D.barrier(info)
    data = load_dataset(config.dataset, digits=config.digits, data_dir=config.data_dir,
                        n_samples=config.n_samples, seed=config.seed)

    # Same initialisation on every rank (DDP would broadcast rank 0's anyway), then per-rank noise.
    seed_everything(config.seed)
    model = make_model(config, data).to(device)
    seed_everything(config.seed + 7919 * info.rank)
    generator = torch.Generator().manual_seed(config.seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)

    history: list[dict[str, float]] = []
    resumes: list[dict[str, Any]] = []
    # The official model selection: the model with the best validation MSE so far (checked every
    # ``select_every`` steps), kept on rank 0 beside the training state.
    best: dict[str, Any] | None = None
    start_epoch = step = 0
    ckpt_path = os.path.join(out, CHECKPOINT_FILE)
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        for group in optimizer.param_groups:  # a changed --lr applies from here on
            group["lr"] = config.lr
        history, start_epoch, step = list(ckpt["history"]), int(ckpt["epoch"]), int(ckpt["step"])
        best, resumes = ckpt["best"], list(ckpt["resumes"])
        resumes.append({"from_epoch": start_epoch, "changed": changed})
        if info.is_main and changed:
            print(f"--resume: from epoch {start_epoch} on, " + ", ".join(
                f"{k} {a!r} -> {b!r}" for k, (a, b) in changed.items()) + " (recorded in config.json)", file=sys.stderr)
        if len(ckpt["rng"]) == info.world_size:
            set_rng_state(ckpt["rng"][info.rank], generator)
        elif info.is_main:
            print(f"--resume: checkpoint has RNG state for {len(ckpt['rng'])} processes, not "
                  f"{info.world_size}; continuing with fresh RNG streams", file=sys.stderr)
    elif config.resume and info.is_main:
        print(f"--resume: no {ckpt_path} yet, starting from scratch", file=sys.stderr)

    if info.is_main:
        _write_json(os.path.join(out, CONFIG_FILE), {
            **dataclasses.asdict(config), "world_size": info.world_size, "device_used": str(device),
            "torch": torch.__version__, "resumes": resumes,
        })

    timer = RegTimer(model, device)
    ddp_model: nn.Module = model
    if info.enabled:
        model.sync = True  # distortion all-reduces its batch means: DDP grads = global-batch grads
        ddp_model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    train_x = data.train.x.to(device)
    per_rank_batch = config.batch_size // info.world_size
    if info.enabled:
        sampler: torch.utils.data.Sampler[int] = torch.utils.data.DistributedSampler(
            range(len(data.train)), num_replicas=info.world_size, rank=info.rank, shuffle=True,
            seed=config.seed,
        )
    else:
        sampler = torch.utils.data.RandomSampler(range(len(data.train)), generator=generator)
    batches = torch.utils.data.BatchSampler(sampler, per_rank_batch, drop_last=False)
    val_split = Split(data.val.x.to(device), data.val.y, data.val.coords)
    tb = _TensorBoard(config.tensorboard and info.is_main, os.path.join(out, "tensorboard"))

    from tqdm.auto import tqdm

    for epoch in range(start_epoch, config.epochs):
        if info.enabled:
            sampler.set_epoch(epoch)  # type: ignore[attr-defined]
        model.train()
        sums = {"loss": 0.0, "recon": 0.0, "kl": 0.0, "reg": 0.0}
        step_time = reg_time = 0.0
        n = 0
        # disable=None: tqdm draws the bar only on a terminal (a log file keeps the epoch lines).
        bar = tqdm(batches, desc=f"{config.model} epoch {epoch + 1}/{config.epochs}", leave=False,
                   disable=None if config.progress and info.is_main else True, dynamic_ncols=True)
        t_epoch, cpu_epoch = time.perf_counter(), time.process_time()
        for idx in bar:
            parts = train_step(ddp_model, train_x[idx], optimizer, timer)
            dt, dr = timer.read()
            step_time, reg_time, n, step = step_time + dt, reg_time + dr, n + 1, step + 1
            if info.is_main and config.select_every and step % config.select_every == 0:
                model.eval()
                mse = _val_mse(model, val_split.x)
                model.train()
                if best is None or mse < best["val_mse"]:
                    best = {"step": step, "epoch": epoch + 1, "val_mse": mse,
                            "model": copy.deepcopy(model.state_dict())}
            for k in sums:
                sums[k] += float(parts[k])
            bar.set_postfix(loss=f"{sums['loss'] / n:.4g}", reg=f"{sums['reg'] / n:.4g}",
                            reg_share=f"{reg_time / max(step_time, 1e-12):.0%}")
        bar.close()
        row: dict[str, float] = {"epoch": epoch + 1, **{k: v / max(n, 1) for k, v in sums.items()}}
        row["epoch_time_s"] = time.perf_counter() - t_epoch
        # CPU time of the process: what an epoch costs, whatever else shares the machine.
        row["epoch_cpu_s"] = time.process_time() - cpu_epoch
        row["reg_share"] = reg_time / max(step_time, 1e-12)
        row["lr"] = optimizer.param_groups[0]["lr"]
        if model.variational:
            row["sigma"] = float(model.log_sigma.detach().exp())
        if info.is_main:
            model.eval()
            val, _, _ = evaluate(model, val_split, geodesic=data.geodesic, max_points=config.eval_points)
            row.update({f"val_{k}": v for k, v in val.items()})
        history.append(row)
        rngs = D.gather_objects(rng_state(generator), info)
        last = epoch + 1 == config.epochs
        if info.is_main and (last or (epoch + 1) % config.checkpoint_every == 0):
            save_checkpoint({"epoch": epoch + 1, "step": step, "model": model.state_dict(),
                             "optimizer": optimizer.state_dict(), "history": history,
                             "config": dataclasses.asdict(config), "rng": rngs, "best": best,
                             "resumes": resumes}, ckpt_path)
        if info.is_main:
            _write_csv(os.path.join(out, LOG_FILE), history)
            tb.log(row)
            if config.progress:
                tqdm.write(f"epoch {epoch + 1}/{config.epochs} " + " ".join(
                    f"{k}={v:.4g}" for k, v in row.items() if k != "epoch"), file=sys.stderr)
    tb.close()

    if not info.is_main:
        return {}
    model.eval()
    test_split = Split(data.test.x.to(device), data.test.y, data.test.coords)
    final, z, h = evaluate(model, test_split, geodesic=data.geodesic, max_points=config.eval_points)
    metrics = {**final, "model": config.model, "dataset": config.dataset, "epochs": config.epochs,
               "n_test": len(data.test), "train_time_s": sum(r["epoch_time_s"] for r in history),
               "train_cpu_s": sum(r.get("epoch_cpu_s", math.nan) for r in history),
               "selected": _selected_metrics(config, data, best, test_split), "history": history}
    _write_json(os.path.join(out, METRICS_FILE), metrics)
    _write_csv(os.path.join(out, LOG_FILE), history)
    if config.latent_dim == 2:
        save_latent_plot(os.path.join(out, LATENT_FILE), z, h, data.test.y[: len(z)],
                         f"{config.model.upper()}  MCN {final['mcn']:.3g}  VoR {final['vor']:.3g}")
    return metrics
