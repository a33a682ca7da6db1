"""What the torch.library dispatcher costs the fused MLP ops in eager mode: ``python benchmarks/dispatcher.py``.

Runs ``mlp_pullback`` and ``mlp_hutchinson`` (one probe) forward + backward on the cpu backend's
kernels of the paper decoder (2-256x4-784, batch 100), once through the custom ops
``torch.ops.isofast.<op>_forward`` / ``_backward`` and once through :func:`isofast.library.call`
(the kernels called directly, what eager mode runs), alternating, and prints the medians and the
median of the paired differences with its interquartile range. With ``--threads 1`` (the default)
the clock is this thread's CPU time, which other processes on a shared machine disturb least.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from benchmarks.ab_extension import PAPER, decoder
from benchmarks.timing import time_alternating
from isofast import library
from isofast.library import act_args
from isofast.mlp import extract_mlp


def _runner(dispatcher: bool) -> Callable[..., object]:
    """``run(name, *args)``: op ``isofast::<name>`` through the dispatcher, or its CPU kernel."""
    if dispatcher:
        return lambda name, *args: getattr(torch.ops.isofast, name)(*args)
    return lambda name, *args: library.call(name, torch.device("cpu"), *args)


def step(op: str, dispatcher: bool, dec: torch.nn.Sequential, z: torch.Tensor, probes: torch.Tensor) -> Callable[[], None]:
    """One forward + backward of ``op`` (gradient of the sum of its outputs) on the cpu kernels."""
    spec, _ = extract_mlp(dec)
    w = [layer.weight.detach() for layer in dec if isinstance(layer, torch.nn.Linear)]
    b = [layer.bias.detach() for layer in dec if isinstance(layer, torch.nn.Linear)]
    acts, has_bias, n = act_args(spec.activations), [True] * len(w), 3 * len(w)
    run = _runner(dispatcher)

    def pullback() -> None:
        h, saved = run("mlp_pullback_forward", z, w, b, *acts, None)
        run("mlp_pullback_backward", torch.ones_like(h), w, has_bias, *acts, [z, *saved], None)

    def hutchinson() -> None:
        stats, saved = run("mlp_hutchinson_forward", z, probes, w, b, *acts, None)
        full = [*saved[:n], saved[n - 1], saved[n]]  # the alias the op leaves out (isofast.library)
        run("mlp_hutchinson_backward", torch.ones_like(stats), w, has_bias, *acts, full, None)

    return pullback if op == "mlp_pullback" else hutchinson


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--reps", type=int, default=400)
    parser.add_argument("--batch", type=int, default=100)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    clock = time.thread_time if args.threads == 1 else time.perf_counter
    print(f"{torch.get_num_threads()} torch thread(s), clock {clock.__name__}, {args.reps} alternating repetitions, "
          f"decoder 2-{'x'.join(map(str, PAPER))}, batch {args.batch}")
    torch.manual_seed(0)
    dec = decoder(2, torch.nn.ReLU)
    z, probes = torch.randn(args.batch, 2), torch.randn(args.batch, 1, 2)
    for op in ("mlp_pullback", "mlp_hutchinson"):
        fns = {label: step(op, label == "dispatcher", dec, z, probes) for label in ("dispatcher", "direct")}
        t = time_alternating(fns, reps=args.reps, warmup=20, clock=clock)
        diffs = [a - b for a, b in zip(t["dispatcher"].samples, t["direct"].samples)]
        q1, _, q3 = statistics.quantiles(diffs, n=4)
        via, direct = t["dispatcher"].median_ms, t["direct"].median_ms
        print(f"{op:16s} dispatcher {via:7.2f} ms   direct {direct:7.2f} ms   paired difference "
              f"{1e3 * statistics.median(diffs):.3f} ms (IQR {1e3 * q1:.3f} to {1e3 * q3:.3f}), "
              f"{100 * (via / direct - 1):.1f}%")


if __name__ == "__main__":
    main()
