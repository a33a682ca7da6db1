"""``isofast doctor``: versions and the state of every backend."""

from __future__ import annotations

import argparse
import platform

import torch

import isofast
from isofast import backends


def report() -> list[str]:
    """Lines describing this installation: versions, devices and each backend's availability."""
    lines = [
        f"isofast {isofast.__version__}",
        f"python {platform.python_version()} on {platform.machine()}",
        f"torch {torch.__version__} (CUDA build: {torch.version.cuda or 'no'}; "
        f"CUDA devices: {torch.cuda.device_count() if torch.cuda.is_available() else 0})",
    ]
    for name in backends.REGISTRY:
        ok, why = backends.status(name)
        lines.append(f"backend {name:<7} {'available' if ok else 'missing':<10} {why}".rstrip())
    return lines


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--build", action="store_true", help="build the backends that need building (the C++ extension)")
    parser.add_argument(
        "--compile-check", action="store_true",
        help="compile every kernel for the GPU target without running it; exit 1 on any failure",
    )


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
        for name in backends.REGISTRY:
            backend = backends.get(name)
            for kernel, ok, msg in [] if backend is None else backend.compile_check():
                failed |= not ok
                print(f"compile {name}:{kernel}: {'ok' if ok else 'FAILED'} {msg}".rstrip())
    return 1 if failed else 0
