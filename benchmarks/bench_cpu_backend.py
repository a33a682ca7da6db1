"""Time the ``"cpu"`` backend (C++ extension) against the official IRVAE recipe and the torch twin.

One process, methods interleaved round by round (so drift and thermal effects hit all alike):

1. regulariser forward + backward on the paper decoder 2-256-256-256-256-784 (ReLU, sigmoid),
   exact estimator, at several batch sizes: official recipe (``autograd.functional`` jvp + vjp,
   one probe) vs ``isofast.relaxed_distortion`` with backend ``torch`` vs backend ``cpu``;
2. batched eigenvalues of 10,000 SPD matrices (m = 2..16): ``torch.linalg.eigvalsh`` vs the
   extension's Jacobi kernel.

Prints a table of medians and ratios and writes ``benchmarks/results/cpu_backend.json``.

    python benchmarks/bench_cpu_backend.py [--batches 100 1024] [--repeats 30] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

import isofast
from isofast import _ext, backends
from isofast.baselines import official_relaxed_distortion

RESULTS = Path(__file__).resolve().parent / "results" / "cpu_backend.json"


def paper_decoder(dtype: torch.dtype) -> torch.nn.Sequential:
    torch.manual_seed(0)
    widths = [2, 256, 256, 256, 256, 784]
    layers: list[torch.nn.Module] = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        layers += [torch.nn.Linear(a, b), torch.nn.Sigmoid() if i == len(widths) - 2 else torch.nn.ReLU()]
    return torch.nn.Sequential(*layers).to(dtype)


def _step(fn, decoder, z):
    decoder.zero_grad(set_to_none=True)
    z.grad = None
    loss = fn()
    loss.backward()


def bench_regulariser(batches: list[int], repeats: int, dtype: torch.dtype) -> list[dict]:
    decoder = paper_decoder(dtype)
    rows = []
    for bsz in batches:
        z = torch.randn(bsz, 2, dtype=dtype, requires_grad=True)
        v = torch.randn(bsz, 2, dtype=dtype)

        def official():
            return official_relaxed_distortion(decoder, z, v)

        def twin():
            with backends.use("torch"):
                return isofast.relaxed_distortion(decoder, z, eta=None, estimator="exact")

        def cpu():
            with backends.use("cpu"):
                return isofast.relaxed_distortion(decoder, z, eta=None, estimator="exact")

        methods = {"official": official, "torch_twin": twin, "cpu_backend": cpu}
        times: dict[str, list[float]] = {k: [] for k in methods}
        for _ in range(3):  # warm-up
            for fn in methods.values():
                _step(fn, decoder, z)
        for _ in range(repeats):
            for name, fn in methods.items():
                t0 = time.perf_counter()
                _step(fn, decoder, z)
                times[name].append(time.perf_counter() - t0)
        med = {k: statistics.median(t) * 1e3 for k, t in times.items()}
        rows.append({
            "batch": bsz,
            "dtype": str(dtype).replace("torch.", ""),
            "median_ms": med,
            "speedup_cpu_vs_official": med["official"] / med["cpu_backend"],
            "speedup_twin_vs_official": med["official"] / med["torch_twin"],
            "speedup_cpu_vs_twin": med["torch_twin"] / med["cpu_backend"],
        })
    return rows


def bench_eigvalsh(sizes: list[int], n: int, repeats: int, dtype: torch.dtype) -> list[dict]:
    ext = _ext.get()
    rows = []
    for m in sizes:
        torch.manual_seed(m)
        a = torch.randn(n, m, m, dtype=dtype)
        H = a @ a.transpose(1, 2) + 0.1 * torch.eye(m, dtype=dtype)
        ref = torch.linalg.eigvalsh(H)
        err = ((ext.eigvalsh(H) - ref).abs().max() / ref.abs().max()).item()
        times: dict[str, list[float]] = {"torch.linalg.eigvalsh": [], "isofast (Jacobi)": []}
        for _ in range(repeats):
            t0 = time.perf_counter()
            torch.linalg.eigvalsh(H)
            times["torch.linalg.eigvalsh"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            ext.eigvalsh(H)
            times["isofast (Jacobi)"].append(time.perf_counter() - t0)
        med = {k: statistics.median(t) * 1e3 for k, t in times.items()}
        rows.append({"m": m, "n": n, "dtype": str(dtype).replace("torch.", ""), "median_ms": med,
                     "speedup": med["torch.linalg.eigvalsh"] / med["isofast (Jacobi)"], "max_rel_err": err})
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[100, 1024])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: as given)")
    parser.add_argument("--eig-sizes", type=int, nargs="+", default=[2, 4, 8, 16])
    parser.add_argument("--eig-n", type=int, default=10_000)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    ok, why = backends.status("cpu")
    if not ok:
        print(f"the cpu backend is not available: {why}")
        return 1
    reg = bench_regulariser(args.batches, args.repeats, torch.float32)
    eig = bench_eigvalsh(args.eig_sizes, args.eig_n, max(5, args.repeats // 3), torch.float64)

    print(f"regulariser forward+backward, paper decoder, exact, float32, {torch.get_num_threads()} threads (median ms)")
    print(f"{'batch':>6} {'official':>10} {'torch twin':>11} {'cpu backend':>12} {'cpu/official':>13} "
          f"{'twin/official':>14} {'cpu/twin':>9}")
    for r in reg:
        med = r["median_ms"]
        print(f"{r['batch']:>6} {med['official']:>10.3f} {med['torch_twin']:>11.3f} {med['cpu_backend']:>12.3f} "
              f"{r['speedup_cpu_vs_official']:>12.2f}x {r['speedup_twin_vs_official']:>13.2f}x "
              f"{r['speedup_cpu_vs_twin']:>8.2f}x")
    print(f"\nbatched eigenvalues, {args.eig_n} SPD matrices, float64 (median ms)")
    print(f"{'m':>4} {'torch.linalg':>13} {'isofast':>9} {'speed-up':>9} {'max rel err':>12}")
    for r in eig:
        med = r["median_ms"]
        print(f"{r['m']:>4} {med['torch.linalg.eigvalsh']:>13.2f} {med['isofast (Jacobi)']:>9.2f} "
              f"{r['speedup']:>8.2f}x {r['max_rel_err']:>12.1e}")
    payload = {
        "machine": {"cpu_threads": torch.get_num_threads(), "platform": platform.platform(terse=True),
                    "processor": platform.processor() or platform.machine()},
        "torch": torch.__version__,
        "extension": dict(_ext.get().build_info()),
        "regulariser": reg,
        "eigvalsh": eig,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
