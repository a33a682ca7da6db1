"""Two builds of the compiled extension in one process: ``python benchmarks/ab_extension.py --base OTHER_C.so``.

Loads this checkout's extension and another build of it (for instance the ``isofast/_C*.so`` of
an older checkout, copied aside), runs both builds' ``mlp_pullback`` and ``mlp_hutchinson``
forward + backward on the same weights, codes and probes, alternating, and prints medians and
the ratio ``base / this`` per case (above 1: this build is faster). With ``--threads 1`` the
clock is this process's CPU time, which other processes on a shared machine disturb least.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from benchmarks.timing import time_alternating
from isofast import _ext
from isofast.library import act_args
from isofast.mlp import extract_mlp

PAPER = (256, 256, 256, 256, 784)
#: ``(name, latent width, batch, probes or None for exact, hidden activation)``.
CASES = (
    ("paper b100 exact", 2, 100, None, torch.nn.ReLU),
    ("paper b1024 exact", 2, 1024, None, torch.nn.ReLU),
    ("paper b1024 hutchinson K1", 2, 1024, 1, torch.nn.ReLU),
    ("m8 b1024 hutchinson K1 softplus", 8, 1024, 1, torch.nn.Softplus),
    ("m4 b256 exact tanh", 4, 256, None, torch.nn.Tanh),
)


def load_other(path: Path):
    """Another build of the extension, loaded beside this checkout's (a distinct module name)."""
    spec = importlib.util.spec_from_file_location("isofast_base._C", path)
    if spec is None or spec.loader is None:
        raise SystemExit(f"--base must be a compiled extension module, got {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def decoder(m: int, act: type[torch.nn.Module]) -> torch.nn.Sequential:
    widths = (m, *PAPER)
    layers: list[torch.nn.Module] = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        layers += [torch.nn.Linear(a, b), act() if i < len(widths) - 2 else torch.nn.Sigmoid()]
    return torch.nn.Sequential(*layers)


def step(module, dec: torch.nn.Sequential, z: torch.Tensor, probes: torch.Tensor | None) -> Callable[[], None]:
    """One forward + backward of the op through ``module`` (gradient of the sum of the outputs)."""
    spec, _ = extract_mlp(dec)
    linears = [layer for layer in dec if isinstance(layer, torch.nn.Linear)]
    w = [layer.weight.detach() for layer in linears]
    b = [layer.bias.detach() for layer in linears]
    acts = act_args(spec.activations)
    has_bias = [True] * len(w)
    if probes is None:
        def run() -> None:
            h, saved = module.mlp_pullback_forward(z, w, b, *acts)
            module.mlp_pullback_backward(torch.ones_like(h), w, has_bias, *acts, saved)
    else:
        def run() -> None:
            stats, saved = module.mlp_hutchinson_forward(z, probes, w, b, *acts)
            module.mlp_hutchinson_backward(torch.ones_like(stats), w, has_bias, *acts, saved)
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", type=Path, required=True, help="the other build's compiled module (.so)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reps", type=int, default=21)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    clock = time.thread_time if args.threads == 1 else time.perf_counter
    builds = {"base": load_other(args.base), "this": _ext.get()}
    print(f"{torch.get_num_threads()} torch thread(s), clock {clock.__name__}, {args.reps} alternating repetitions")
    ratios = []
    for name, m, bsz, k, act in CASES:
        torch.manual_seed(0)
        dec = decoder(m, act)
        z = torch.randn(bsz, m)
        probes = None if k is None else torch.randn(bsz, k, m)
        fns = {label: step(module, dec, z, probes) for label, module in builds.items()}
        t = time_alternating(fns, reps=args.reps, warmup=2, clock=clock)
        base, this = t["base"].median_ms, t["this"].median_ms
        ratios.append(base / this)
        print(f"{name:32s} base {base:8.2f} ms   this {this:8.2f} ms   base/this {base / this:.3f}")
    print(f"geometric mean base/this {statistics.geometric_mean(ratios):.3f}")


if __name__ == "__main__":
    main()
