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
    del parser  # no options yet


def run(args: argparse.Namespace) -> int:
    del args
    print("\n".join(report()))
    return 0
