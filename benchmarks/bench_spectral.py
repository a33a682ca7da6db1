"""Time the extension's batched eigenvalues against ``torch.linalg.eigvalsh``.

``n`` (default 10,000) random SPD matrices ``H = A A^T + 0.1 I`` of each size ``m`` (default
2, 4, 8, 16), float64, on the CPU: ``torch.linalg.eigvalsh(H)`` vs the extension's Jacobi kernel
``eigvalsh(H)``, alternating within each repetition (so drift and other load hit both alike).
Prints medians, the speed-up and the largest relative deviation ``max |l - l_ref| / max |l_ref|``,
and writes ``benchmarks/results/spectral.json``. (Regulariser timings are ``benchmarks/run.py``.)

    python benchmarks/bench_spectral.py [--sizes 2 4 8 16] [--n 10000] [--repeats 10] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from benchmarks import report
from benchmarks.timing import time_alternating
from isofast import _ext

RESULTS = Path(__file__).resolve().parent / "results" / "spectral.json"
TORCH, ISOFAST = "torch.linalg.eigvalsh", "isofast (Jacobi)"


def bench_eigvalsh(sizes: list[int], n: int, repeats: int, dtype: torch.dtype = torch.float64) -> list[dict[str, Any]]:
    """One row per size ``m``: median milliseconds of both methods on ``(n, m, m)`` SPD matrices."""
    ext = _ext.get()
    rows = []
    for m in sizes:
        torch.manual_seed(m)
        a = torch.randn(n, m, m, dtype=dtype)
        h = a @ a.transpose(1, 2) + 0.1 * torch.eye(m, dtype=dtype)
        ref = torch.linalg.eigvalsh(h)
        err = ((ext.eigvalsh(h) - ref).abs().max() / ref.abs().max()).item()
        timings = time_alternating({TORCH: lambda: torch.linalg.eigvalsh(h), ISOFAST: lambda: ext.eigvalsh(h)},
                                   reps=repeats)
        med = {name: t.median_ms for name, t in timings.items()}
        rows.append({"m": m, "n": n, "dtype": str(dtype).removeprefix("torch."), "median_ms": med,
                     "reps": len(timings[ISOFAST].samples), "speedup": med[TORCH] / med[ISOFAST],
                     "max_rel_err": err})
    return rows


def main(argv: list[str] | None = None) -> int:
    """Parse the CLI, time every size, print the table and write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[2, 4, 8, 16])
    parser.add_argument("--n", type=int, default=10_000, help="matrices per size")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    module, why = _ext.load()
    if module is None:
        print(f"the compiled extension is not available: {why}")
        return 1
    load_start = report.load_average()
    rows = bench_eigvalsh(args.sizes, args.n, args.repeats)

    print(f"batched eigenvalues, {args.n} SPD matrices, float64, {torch.get_num_threads()} threads (median ms)")
    print(f"{'m':>4} {'torch.linalg':>13} {'isofast':>9} {'speed-up':>9} {'max rel err':>12}")
    for r in rows:
        med = r["median_ms"]
        print(f"{r['m']:>4} {med[TORCH]:>13.2f} {med[ISOFAST]:>9.2f} {r['speedup']:>8.2f}x {r['max_rel_err']:>12.1e}")
    meta = {**report.environment(torch.device("cpu")), "torch_threads": torch.get_num_threads(),
            "extension": dict(module.build_info()), "load_start": load_start, "load_end": report.load_average()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"meta": meta, "eigvalsh": rows}, indent=2) + "\n")
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
