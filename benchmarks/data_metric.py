"""Cost of the diagonal data-space metric in the fused MLP ops: ``python benchmarks/data_metric.py``.

For each backend with the metric (``torch``, ``cpu``), each case and each batch, one forward +
backward of the op (gradients of ``z`` and every parameter) with ``data_weight=None`` (identity)
and with a positive ``(D,)`` weight (diagonal), alternating within every repetition in one process
(:func:`benchmarks.timing.time_alternating`); medians and the ratio ``diagonal / identity``.
Cases: the IRVAE paper decoder (2-256-256-256-256-784, ReLU, sigmoid) with the exact metric, and
the same MLP at ``m = 16`` with Hutchinson's estimator at ``K = 1``. One torch thread (the
machine may be shared) and this process's CPU time as the clock. Writes
``benchmarks/results/data_metric.json`` and ``data_metric.md`` (``--out`` for another folder);
``--quick`` runs a tiny decoder in a few seconds (the smoke test).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from benchmarks import report
from benchmarks.cases import Case, make_decoder
from benchmarks.timing import CLOCKS, time_alternating
from isofast import backends
from isofast.mlp import extract_mlp
from isofast.ops import mlp_hutchinson, mlp_pullback

#: The clock of the timings (a key of :data:`benchmarks.timing.CLOCKS`): CPU time of this process.
CLOCK = "cpu"
#: Backends measured (those of them that are available and have the metric).
BACKENDS = ("torch", "cpu")
#: The target of the diagonal metric's overhead on the fused path.
TARGET_RATIO = 1.10


@dataclass(frozen=True)
class MetricCase:
    """A decoder shape and the op that measures it (``n_probes=None``: exact ``mlp_pullback``)."""

    name: str
    case: Case
    n_probes: int | None

    @property
    def op(self) -> str:
        return "exact" if self.n_probes is None else f"hutchinson K={self.n_probes}"


def cases(quick: bool) -> tuple[list[MetricCase], tuple[int, ...]]:
    """The measured cases and batches (``quick``: a tiny MLP, batch 4)."""
    if quick:
        tiny = dict(hidden=(8, 8), out=5)
        return [MetricCase("tiny m=2", Case("tiny", "paper", 4, m=2, **tiny), None),
                MetricCase("tiny m=3", Case("tiny", "latent", 4, m=3, **tiny), 1)], (4,)
    return [MetricCase("paper 2-256x4-784", Case("paper", "paper", 0, m=2), None),
            MetricCase("m=16 16-256x4-784", Case("m16", "latent", 0, m=16), 1)], (100, 1024)


def step(backend: Any, spec: Any, z: torch.Tensor, probes: torch.Tensor | None,
         data_weight: torch.Tensor | None, params: list[torch.Tensor]):
    """One forward + backward of the op (gradient of the sum of its outputs)."""
    def run() -> None:
        if probes is None:
            out = mlp_pullback(backend, spec, z, data_weight=data_weight)
        else:
            out = mlp_hutchinson(backend, spec, z, probes, data_weight=data_weight)
        torch.autograd.grad(out.sum(), params)
    return run


def measure(quick: bool = False, reps: int = 31, backend_names: tuple[str, ...] = BACKENDS) -> list[dict[str, Any]]:
    """One record per ``(backend, case, batch)``: identity and diagonal medians and their ratio."""
    records = []
    metric_cases, batches = cases(quick)
    for name in backend_names:
        ok, why = backends.status(name)
        if not ok or not backends.get(name).diagonal_data_metric:
            print(f"skipping backend {name}: {why or 'no diagonal data-space metric'}")
            continue
        backend = backends.get(name)
        for mc in metric_cases:
            dec = make_decoder(mc.case)
            spec, _ = extract_mlp(dec)
            params = [p for p in spec.params() if p is not None]
            for batch in batches:
                gen = torch.Generator().manual_seed(batch)
                z = torch.randn(batch, mc.case.m, generator=gen).requires_grad_()
                probes = (None if mc.n_probes is None
                          else torch.randn(batch, mc.n_probes, mc.case.m, generator=gen))
                w = 0.5 + torch.rand(spec.out_features, generator=gen)
                fns = {"identity": step(backend, spec, z, probes, None, [z, *params]),
                       "diagonal": step(backend, spec, z, probes, w, [z, *params])}
                t = time_alternating(fns, reps=reps, warmup=2, clock=CLOCKS[CLOCK])
                ident, diag = t["identity"], t["diagonal"]
                rec = {
                    "backend": name, "case": mc.name, "op": mc.op, "batch": batch,
                    "identity_ms": ident.median_ms, "diagonal_ms": diag.median_ms,
                    "identity_iqr_ms": ident.iqr_ms, "diagonal_iqr_ms": diag.iqr_ms,
                    "ratio": (diag.median_ms / ident.median_ms
                              if ident.median_ms and diag.median_ms else None),
                    "reps": len(ident.samples), "error": ident.error or diag.error,
                }
                records.append(rec)
                print(f"{name:6s} {mc.name:20s} {mc.op:14s} B={batch:5d}  identity {_ms(rec['identity_ms'])}  "
                      f"diagonal {_ms(rec['diagonal_ms'])}  ratio {_ratio(rec['ratio'])}", flush=True)
    return records


def _ms(x: float | None) -> str:
    return "   n/a  " if x is None else f"{x:8.2f}"


def _ratio(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def metadata(reps: int, quick: bool) -> dict[str, Any]:
    """Machine, threads, clock and versions of a run."""
    env = report.environment(torch.device("cpu"))
    return {**env, "machine": report.cpu_model(), "torch_threads": torch.get_num_threads(),
            "clock": f"{CLOCK}: {CLOCKS[CLOCK].__module__}.{CLOCKS[CLOCK].__name__} (CPU time of this process)",
            "reps": reps, "mode": "quick" if quick else "full", "load_average": report.load_average(),
            "target_ratio": TARGET_RATIO}


def markdown(meta: dict[str, Any], records: list[dict[str, Any]]) -> str:
    lines = [
        "# Diagonal data-space metric: cost on the fused MLP path",
        "",
        f"{meta['machine']}, {meta['torch_threads']} torch thread(s), clock {meta['clock']}, "
        f"torch {meta['versions']['torch']}, commit {meta['commit'][:12]}; fwd+bwd of the op (gradients of z "
        f"and every parameter), identity (`data_weight=None`) and diagonal (`data_weight` a positive (D,) "
        f"tensor) alternating in one process, {meta['reps']} repetitions, medians; load average at the end "
        f"{meta['load_average']}. Target: ratio <= {meta['target_ratio']:.2f}.",
        "",
        "| backend | case | op | batch | identity ms (IQR) | diagonal ms (IQR) | diagonal / identity |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in records:
        lines.append(f"| {r['backend']} | {r['case']} | {r['op']} | {r['batch']} "
                     f"| {_ms(r['identity_ms']).strip()} ({_ms(r['identity_iqr_ms']).strip()}) "
                     f"| {_ms(r['diagonal_ms']).strip()} ({_ms(r['diagonal_iqr_ms']).strip()}) | {_ratio(r['ratio'])} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a tiny decoder, a few repetitions (smoke test)")
    parser.add_argument("--reps", type=int, default=None, help="alternating repetitions (default 31, quick 3)")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = parser.parse_args(argv)
    reps = args.reps or (3 if args.quick else 31)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        records = measure(args.quick, reps)
        meta = metadata(reps, args.quick)
    finally:
        torch.set_num_threads(threads)
    args.out.mkdir(parents=True, exist_ok=True)
    report.write_json(args.out / "data_metric.json", meta, records)
    table = markdown(meta, records)
    (args.out / "data_metric.md").write_text(table)
    print(table)
    return records


if __name__ == "__main__":
    main()
