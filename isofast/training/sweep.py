"""The hierarchy experiment: a grid of distortion measures x weights x seeds, resumable cell by cell.

``run_sweep(SweepSpec(...))`` trains every cell of the grid through :func:`~.loop.train` and writes
into ``spec.out``:

- ``cells/<measure>-w<weight>-s<seed>/``: one training run per cell on ``spec.dataset`` (the
  loop's usual outputs: ``metrics.json``, ``checkpoint.pt``, ``log.csv``, ...); the unregularised
  baseline of each seed (model ``vae`` for ``irvae``, ``ae`` for ``irae``) is
  ``cells/baseline-w0-s<seed>/``;
- ``fidelity/<same name>/``: the same model, measure, weight and seed trained on a flat synthetic
  manifold with known intrinsic coordinates (``spec.fidelity_dataset``, default ``swissroll``), whose
  held-out ``geodesic_fidelity`` (rank correlation of latent and true geodesic distances) is the
  cell's geometry score;
- ``results.json``: one record per cell and seed (:data:`RECORD_KEYS`);
- ``summary.csv``: mean and sample standard deviation over seeds per (measure, weight);
- ``pareto.png``: held-out reconstruction MSE against MCN and against VoR, one curve per measure
  across weights, the baseline marked.

Resuming: a run is *finished* when its ``metrics.json`` exists and records the requested number of
epochs; finished runs are never retrained (their metrics are read back). A run with a checkpoint
but no final metrics (interrupted) continues from its checkpoint with the loop's ``resume``. A
finished run whose ``config.json`` disagrees with the request on an option that changes the result
raises :class:`ValueError` instead of silently mixing two experiments in one folder.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import json
import math
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from .loop import CHECKPOINT_FILE, CONFIG_FILE, METRICS_FILE, TrainConfig, train

#: The measures of the hierarchy the sweep trains by default (docs/maths.md section 2).
DEFAULT_MEASURES = ("isometry", "scaled_isometry", "conformal", "volume")
DEFAULT_WEIGHTS = (0.1, 1.0, 10.0, 100.0)
#: ``measure`` of the unregularised baseline rows.
BASELINE = "baseline"
#: The unregularised model each regularised model is compared with.
BASELINE_MODEL = {"irvae": "vae", "irae": "ae"}
#: Keys of every record in ``results.json``.
RECORD_KEYS = ("measure", "weight", "seed", "model", "mse", "mcn", "vor", "geodesic_fidelity", "seconds")
#: Metrics aggregated in ``summary.csv`` (mean and standard deviation over seeds).
SUMMARY_METRICS = ("mse", "mcn", "vor", "geodesic_fidelity", "seconds")
RESULTS_FILE, SUMMARY_FILE, PARETO_FILE = "results.json", "summary.csv", "pareto.png"
# Resolved TrainConfig fields that must agree between a finished run and the request.
_MATCH_KEYS = ("dataset", "digits", "model", "latent_dim", "iso_weight", "measure", "seed", "hidden",
               "decoder", "lr", "batch_size", "eta", "estimator", "n_probes", "init_sigma", "n_samples",
               "eval_points")

TrainFn = Callable[[TrainConfig], dict[str, Any]]


@dataclass
class SweepSpec:
    """What to sweep and how each run is configured.

    ``base`` holds the :class:`TrainConfig` fields shared by every run (``hidden``, ``lr``,
    ``digits``, ...); ``model``, ``measure``, ``iso_weight``, ``seed``, ``dataset``, ``epochs`` and
    ``out`` are set per run by the sweep. ``epochs=None`` is the loop's per-dataset default.
    """

    out: str
    dataset: str = "digits"
    model: str = "irvae"
    measures: Sequence[str] = DEFAULT_MEASURES
    weights: Sequence[float] = DEFAULT_WEIGHTS
    seeds: Sequence[int] = (0, 1, 2)
    epochs: int | None = None
    fidelity_dataset: str | None = "swissroll"
    fidelity_epochs: int | None = None
    base: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Cell:
    """One (measure, weight, seed) of the grid; ``measure == BASELINE`` is the unregularised model."""

    measure: str
    weight: float
    seed: int

    @property
    def name(self) -> str:
        """Folder name, e.g. ``scaled_isometry-w10-s0`` or ``baseline-w0-s1``."""
        return f"{self.measure}-w{self.weight:g}-s{self.seed}"

    @property
    def is_baseline(self) -> bool:
        return self.measure == BASELINE


# ----------------------------------------------------------------------------- grid / configs


def grid(spec: SweepSpec) -> list[Cell]:
    """Every cell: the baseline of each seed first, then measure x weight x seed in the given order."""
    if spec.model not in BASELINE_MODEL:
        raise ValueError(f"--model must be one of {', '.join(BASELINE_MODEL)}, got {spec.model!r}")
    if any(w <= 0 for w in spec.weights):
        raise ValueError(f"--weights must be positive (the weight-0 baseline is always trained), got {list(spec.weights)}")
    if len(set(spec.seeds)) != len(spec.seeds) or len(set(spec.measures)) != len(spec.measures):
        raise ValueError("--measures and seeds must not repeat")
    cells = [Cell(BASELINE, 0.0, s) for s in spec.seeds]
    cells += [Cell(m, float(w), s) for m in spec.measures for w in spec.weights for s in spec.seeds]
    return cells


def cell_config(spec: SweepSpec, cell: Cell, *, fidelity: bool = False) -> TrainConfig:
    """The :class:`TrainConfig` of ``cell`` on the main dataset, or on the fidelity dataset."""
    base = {k: v for k, v in spec.base.items() if k not in ("out", "resume")}
    base.setdefault("progress", False)
    if cell.is_baseline:
        # The measure is unused at weight 0; fixed so that the run's folder check stays stable.
        model, measure, weight = BASELINE_MODEL[spec.model], "scaled_isometry", 0.0
    else:
        model, measure, weight = spec.model, cell.measure, cell.weight
    base.update(model=model, measure=measure, iso_weight=weight, seed=cell.seed)
    if fidelity:
        if spec.fidelity_dataset is None:
            raise ValueError("this sweep has no fidelity dataset")
        base.update(dataset=spec.fidelity_dataset, epochs=spec.fidelity_epochs, digits=None,
                    out=os.path.join(spec.out, "fidelity", cell.name))
    else:
        base.update(dataset=spec.dataset, epochs=spec.epochs, out=os.path.join(spec.out, "cells", cell.name))
    return TrainConfig(**base)


# ----------------------------------------------------------------------------- resume logic


def _read_json(path: str) -> dict[str, Any] | None:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None  # missing or truncated (a crash mid-write): not finished


def finished_metrics(config: TrainConfig) -> dict[str, Any] | None:
    """The metrics of ``config``'s run if it is finished (``metrics.json`` records the requested
    epochs), else ``None``.

    Raises:
        ValueError: the folder holds a finished run trained with different options.
    """
    resolved = config.resolved()
    metrics = _read_json(os.path.join(resolved.out, METRICS_FILE))
    if metrics is None or metrics.get("epochs") != resolved.epochs:
        return None
    saved = _read_json(os.path.join(resolved.out, CONFIG_FILE)) or {}
    want = dataclasses.asdict(resolved)
    diff = [k for k in _MATCH_KEYS if k in saved and saved[k] != want[k]]
    if diff:
        detail = ", ".join(f"{k}: {saved[k]!r} -> {want[k]!r}" for k in diff)
        raise ValueError(f"{resolved.out} holds a run trained with different options ({detail}); "
                         f"sweep into a new --out")
    return metrics


def run_once(config: TrainConfig, train_fn: TrainFn | None = None) -> tuple[dict[str, Any], bool]:
    """``(metrics, trained)``: read a finished run back, else train it (resuming from its checkpoint
    if one exists). ``trained`` is False when nothing was trained."""
    done = finished_metrics(config)
    if done is not None:
        return done, False
    resume = os.path.exists(os.path.join(config.out, CHECKPOINT_FILE))
    fn = train if train_fn is None else train_fn
    return fn(dataclasses.replace(config, resume=resume)), True


def run_cell(spec: SweepSpec, cell: Cell, train_fn: TrainFn | None = None) -> dict[str, Any]:
    """Train (or read back) ``cell`` and its fidelity run; returns its ``results.json`` record.

    ``seconds`` is the training time the loop recorded (``train_time_s``: epochs including the
    per-epoch validation) of the main run plus the fidelity run, so it survives resuming.
    """
    main, _ = run_once(cell_config(spec, cell), train_fn)
    seconds = float(main.get("train_time_s", math.nan))
    fidelity = math.nan
    if spec.fidelity_dataset is not None:
        fid, _ = run_once(cell_config(spec, cell, fidelity=True), train_fn)
        fidelity = float(fid.get("geodesic_fidelity", math.nan))
        seconds += float(fid.get("train_time_s", math.nan))
    return {
        "measure": cell.measure, "weight": cell.weight, "seed": cell.seed,
        "model": BASELINE_MODEL[spec.model] if cell.is_baseline else spec.model,
        "mse": float(main["mse"]), "mcn": float(main["mcn"]), "vor": float(main["vor"]),
        "geodesic_fidelity": fidelity, "seconds": seconds,
    }


def _worker(spec: SweepSpec, cell: Cell, threads: int | None) -> dict[str, Any]:
    """Process-pool entry point (module level so it pickles)."""
    if threads:
        import torch

        torch.set_num_threads(threads)
    return run_cell(spec, cell)


def run_sweep(
    spec: SweepSpec,
    *,
    jobs: int = 1,
    threads: int | None = None,
    progress: bool = True,
    train_fn: TrainFn | None = None,
) -> list[dict[str, Any]]:
    """Train every cell of ``spec`` (skipping finished ones) and write the three result files.

    Args:
        jobs: cells trained at once in separate processes (``1``: in this process). Small MLPs
            use cores better as independent processes than as threads of one GEMM.
        threads: torch threads per process (``None``: torch's choice).
        progress: a tqdm bar over cells.
        train_fn: replaces :func:`~.loop.train` (tests); only with ``jobs == 1``.

    Returns:
        The records, in grid order.
    """
    from tqdm.auto import tqdm

    cells = grid(spec)
    os.makedirs(spec.out, exist_ok=True)
    records: dict[Cell, dict[str, Any]] = {}
    bar = tqdm(total=len(cells), desc="sweep cells", unit="cell", disable=not progress, dynamic_ncols=True)
    t0 = time.perf_counter()
    try:
        if jobs <= 1:
            with _torch_threads(threads):
                for cell in cells:
                    bar.set_postfix_str(cell.name)
                    records[cell] = run_cell(spec, cell, train_fn)
                    bar.update()
        else:
            if train_fn is not None:
                raise ValueError("train_fn needs jobs == 1")
            _run_parallel(spec, cells, jobs, threads, records, bar)
    finally:
        bar.close()
        if records:  # write what is done, also after an interruption
            ordered = [records[c] for c in cells if c in records]
            write_outputs(spec.out, ordered)
    if progress:
        print(f"sweep: {len(cells)} cells in {time.perf_counter() - t0:.1f} s -> {spec.out}", file=sys.stderr)
    return [records[c] for c in cells]


@contextlib.contextmanager
def _torch_threads(threads: int | None) -> Iterator[None]:
    """Run with ``threads`` torch threads, restoring the previous number afterwards."""
    import torch

    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _run_parallel(spec: SweepSpec, cells: list[Cell], jobs: int, threads: int | None,
                  records: dict[Cell, dict[str, Any]], bar: Any) -> None:  # noqa: ANN401
    import concurrent.futures as cf
    import multiprocessing as mp

    # spawn, not fork: forking a process whose torch thread pools already started can deadlock.
    with cf.ProcessPoolExecutor(max_workers=jobs, mp_context=mp.get_context("spawn")) as pool:
        futures = {pool.submit(_worker, spec, cell, threads): cell for cell in cells}
        try:
            for fut in cf.as_completed(futures):
                cell = futures[fut]
                records[cell] = fut.result()
                bar.set_postfix_str(cell.name)
                bar.update()
        except BaseException:
            for fut in futures:
                fut.cancel()
            raise


# ----------------------------------------------------------------------------- aggregation


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof 1; NaN with one value) of the finite ``values``."""
    v = [x for x in values if isinstance(x, (int, float)) and math.isfinite(x)]
    if not v:
        return math.nan, math.nan
    mean = sum(v) / len(v)
    if len(v) < 2:
        return mean, math.nan
    return mean, math.sqrt(sum((x - mean) ** 2 for x in v) / (len(v) - 1))


def summarize(records: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (measure, weight), in first-seen order: ``n_seeds`` and ``<metric>_mean`` /
    ``<metric>_std`` for every metric in :data:`SUMMARY_METRICS`."""
    groups: dict[tuple[str, float], list[dict[str, Any]]] = {}
    for r in records:
        groups.setdefault((r["measure"], float(r["weight"])), []).append(r)
    rows = []
    for (measure, weight), rs in groups.items():
        row: dict[str, Any] = {"measure": measure, "weight": weight, "n_seeds": len(rs)}
        for k in SUMMARY_METRICS:
            row[f"{k}_mean"], row[f"{k}_std"] = _mean_std([float(r.get(k, math.nan)) for r in rs])
        rows.append(row)
    return rows


def _json_safe(x: Any) -> Any:  # noqa: ANN401
    """NaN / inf -> ``None`` so results.json is strict JSON."""
    return None if isinstance(x, float) and not math.isfinite(x) else x


def write_outputs(out: str, records: list[dict[str, Any]]) -> None:
    """``results.json``, ``summary.csv`` and ``pareto.png`` in ``out``."""
    tmp = os.path.join(out, f"{RESULTS_FILE}.tmp{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump([{k: _json_safe(r.get(k)) for k in RECORD_KEYS} for r in records], f, indent=2)
    os.replace(tmp, os.path.join(out, RESULTS_FILE))
    rows = summarize(records)
    with open(os.path.join(out, SUMMARY_FILE), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows([{k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()} for r in rows])
    plot_pareto(rows, os.path.join(out, PARETO_FILE))


def format_summary(rows: list[dict[str, Any]]) -> str:
    """A fixed-width text table of the summary (mean +- std over seeds)."""
    cols = ("mse", "mcn", "vor", "geodesic_fidelity")
    head = f"{'measure':<16}{'weight':>8}" + "".join(f"{c:>22}" for c in ("MSE", "MCN", "VoR", "geo. fidelity"))
    lines = [head]
    for r in rows:
        cells = "".join(f"{_pm(r[c + '_mean'], r[c + '_std']):>22}" for c in cols)
        lines.append(f"{r['measure']:<16}{r['weight']:>8g}{cells}")
    return "\n".join(lines)


def _pm(mean: float, std: float) -> str:
    if not math.isfinite(mean):
        return "-"
    return f"{mean:.4g}" + (f" +- {std:.2g}" if math.isfinite(std) else "")


# ----------------------------------------------------------------------------- plot


def plot_pareto(rows: list[dict[str, Any]], path: str) -> None:
    """Two panels: MSE against MCN and MSE against VoR (means over seeds, std error bars), one curve
    per measure ordered by weight with each point annotated by its weight, the baseline as a star.
    Axes are logarithmic where every value is positive (MCN >= 1 always; VoR or MSE may hit 0)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4.6))
    for i, x_key in enumerate(("mcn", "vor")):
        ax = fig.add_subplot(1, 2, i + 1)
        for measure in dict.fromkeys(r["measure"] for r in rows):
            rs = sorted((r for r in rows if r["measure"] == measure), key=lambda r: r["weight"])
            xs, ys = [r[f"{x_key}_mean"] for r in rs], [r["mse_mean"] for r in rs]
            xerr = [_nan0(r[f"{x_key}_std"]) for r in rs]
            yerr = [_nan0(r["mse_std"]) for r in rs]
            if measure == BASELINE:
                ax.errorbar(xs, ys, xerr=xerr, yerr=yerr, fmt="*", color="k", markersize=14,
                            label="baseline (weight 0)", zorder=3)
                continue
            ax.errorbar(xs, ys, xerr=xerr, yerr=yerr, fmt="o-", capsize=2, label=measure.replace("_", " "))
            for r, x, y in zip(rs, xs, ys):
                ax.annotate(f"{r['weight']:g}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
        _log_if_positive(ax, [r[f"{x_key}_mean"] for r in rows], [r["mse_mean"] for r in rows])
        ax.set_xlabel({"mcn": "MCN (mean condition number, 1 = isotropic)",
                       "vor": "VoR (variance of the metric, 0 = homogeneous)"}[x_key])
        ax.set_ylabel("held-out reconstruction MSE")
        ax.grid(True, which="both", alpha=0.3)
        if i == 0:
            ax.legend(fontsize=8)
    fig.suptitle("Reconstruction vs geometry across the hierarchy (numbers: regulariser weight)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _nan0(x: float) -> float:
    return 0.0 if not math.isfinite(x) else x


def _log_if_positive(ax: Any, xs: Sequence[float], ys: Sequence[float]) -> None:  # noqa: ANN401
    fx = [x for x in xs if math.isfinite(x)]
    fy = [y for y in ys if math.isfinite(y)]
    if fx and min(fx) > 0:
        ax.set_xscale("log")
    if fy and min(fy) > 0:
        ax.set_yscale("log")
