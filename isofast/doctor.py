"""``isofast doctor``: versions, the state of every backend and the dispatch table of every op."""

from __future__ import annotations

import argparse
import platform
import subprocess
from pathlib import Path
from typing import Any

import torch

import isofast
from isofast import backends, compile_stats, dispatch


def report() -> list[str]:
    """Lines describing this installation: versions, devices, each backend's availability, and per
    op the backends that implement it (``cuda->torch``: cuda declares torch's as its fallback)."""
    lines = [
        f"isofast {isofast.__version__}",
        f"python {platform.python_version()} on {platform.machine()}",
        f"torch {torch.__version__} (CUDA build: {torch.version.cuda or 'no'}; "
        f"CUDA devices: {torch.cuda.device_count() if torch.cuda.is_available() else 0})",
    ]
    for name in backends.REGISTRY:
        ok, why = backends.status(name)
        lines.append(f"backend {name:<7} {'available' if ok else 'missing':<10} {why}".rstrip())
    for op in dispatch.OPS:
        entries = [(name, dispatch.TABLE[name][op]) for name in backends.REGISTRY]
        cells = [name if isinstance(e, dispatch.Native) else f"{name}->{'/'.join(e.to)}" for name, e in entries]
        lines.append(f"op {op:<17} {', '.join(cells)}")
    return lines


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--build", action="store_true", help="build the backends that need building (the C++ extension)")
    parser.add_argument(
        "--compile-check", action="store_true",
        help="compile every kernel for the GPU target without running it; exit 1 on any failure",
    )
    parser.add_argument(
        "--backend", action="append", choices=tuple(backends.REGISTRY), default=None,
        help="with --compile-check: only this backend's kernels (repeatable; default: every backend)",
    )
    parser.add_argument(
        "--stats", type=Path, default=None, metavar="FILE",
        help="with --compile-check: write each kernel's registers, spills and shared memory to FILE "
             "(JSON) and a markdown table beside it",
    )


def compile_env() -> dict[str, Any]:
    """The compilers behind a compile check: torch, Triton and nvcc versions."""
    from isofast.backends.cuda_backend import COMPILE_CHECK_ARCH, find_nvcc

    env: dict[str, Any] = {"isofast": isofast.__version__, "torch": torch.__version__, "arch": COMPILE_CHECK_ARCH}
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    nvcc = find_nvcc()
    env["nvcc"] = None
    if nvcc is not None:
        try:
            out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=60).stdout
            env["nvcc"] = next((line.split("release")[-1].strip() for line in out.splitlines() if "release" in line), None)
        except (OSError, subprocess.TimeoutExpired):
            pass
    return env


def run(args: argparse.Namespace) -> int:
    failed = False
    if args.build:
        for name in backends.REGISTRY:
            backend = backends.get(name)
            if backend is not None:
                ok, msg = backend.build()
                failed |= not ok
                print(f"build {name}: {'ok' if ok else 'FAILED'} {msg}")
        backends.refresh()
    print("\n".join(report()))
    if args.compile_check:
        stats: list[dict[str, Any]] = []
        for name in args.backend or backends.REGISTRY:
            backend = backends.get(name)
            for res in [] if backend is None else backend.compile_check():
                failed |= not res.ok
                stats += res.stats
                print(f"compile {name}:{res.kernel}: {'ok' if res.ok else 'FAILED'} {res.message}".rstrip(), flush=True)
        if args.stats is not None:
            compile_stats.write(args.stats, stats, compile_env())
            print(f"wrote {len(stats)} kernel records to {args.stats} and {args.stats.with_suffix('.md')}")
    return 1 if failed else 0
