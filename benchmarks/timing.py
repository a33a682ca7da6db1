"""Timing and memory probes: competitors alternate within every repetition; medians are reported.

Alternating (rather than timing one provider's repetitions back to back) spreads slow drift of
a shared machine (thermal state, other processes) evenly over all competitors; the provider order
is rotated every repetition so none always runs right after the same neighbour.
"""

from __future__ import annotations

import ctypes
import gc
import os
import statistics
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field

import torch


@dataclass
class Timing:
    """Wall-clock samples (seconds) of one provider, or the error that stopped it."""

    samples: list[float] = field(default_factory=list)
    error: str | None = None

    @property
    def median_ms(self) -> float | None:
        return statistics.median(self.samples) * 1e3 if self.samples else None

    @property
    def min_ms(self) -> float | None:
        return min(self.samples) * 1e3 if self.samples else None

    @property
    def iqr_ms(self) -> float | None:
        """Inter-quartile range, a robust spread (``None`` with fewer than 4 samples)."""
        if len(self.samples) < 4:
            return None
        q = statistics.quantiles(self.samples, n=4)
        return (q[2] - q[0]) * 1e3


CLOCKS: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "cpu": time.process_time}


def describe_error(exc: BaseException) -> str:
    """``Type: message`` of an exception, first line of the message only, at most 300 chars."""
    msg = str(exc).strip().splitlines()
    head = msg[0] if msg else ""
    return f"{type(exc).__name__}: {head}"[:300]


def time_alternating(
    fns: dict[str, Callable[[], None]],
    reps: int,
    warmup: int = 1,
    budget_s: float | None = None,
    min_reps: int = 3,
    clock: Callable[[], float] = time.perf_counter,
) -> dict[str, Timing]:
    """Time every callable ``reps`` times, alternating between them within each repetition.

    ``warmup`` untimed calls each come first (compilation, allocator warm-up); a callable that
    raises (in warm-up or later) is dropped and its error kept. With ``budget_s``, repetitions stop
    early once that many seconds have been spent on timed calls, but never before ``min_reps``.
    ``clock`` is wall time by default; ``time.process_time`` (CPU seconds of this process) is robust
    to other processes on a shared machine when torch runs one thread.
    """
    out = {name: Timing() for name in fns}
    live = list(fns)
    for name in list(live):
        try:
            for _ in range(warmup):
                fns[name]()
        except Exception as exc:  # noqa: BLE001 - every failure becomes a result record
            out[name].error = describe_error(exc)
            live.remove(name)
    spent = 0.0
    for rep in range(reps):
        if not live:
            break
        shift = rep % len(live)
        for name in live[shift:] + live[:shift]:
            if out[name].error is not None:
                continue
            try:
                t0 = clock()
                fns[name]()
                dt = clock() - t0
            except Exception as exc:  # noqa: BLE001
                out[name].error = describe_error(exc)
                continue
            out[name].samples.append(dt)
            spent += dt
        live = [n for n in live if out[n].error is None]
        if budget_s is not None and rep + 1 >= min_reps and spent > budget_s:
            break
    return out


def _malloc_trim() -> None:
    """Return freed heap pages to the OS (glibc), so resident-set growth is measured from a clean base."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:  # pragma: no cover - not glibc
        pass


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class _RSSSampler(threading.Thread):
    """Polls the resident set size every ``period`` seconds (torch ops release the GIL)."""

    def __init__(self, period: float = 2e-4) -> None:
        super().__init__(daemon=True)
        self.period, self.peak, self._stop_evt = period, _rss_bytes(), threading.Event()

    def run(self) -> None:
        while not self._stop_evt.is_set():
            self.peak = max(self.peak, _rss_bytes())
            time.sleep(self.period)

    def stop(self) -> int:
        self._stop_evt.set()
        self.join()
        return max(self.peak, _rss_bytes())


def peak_memory(fn: Callable[[], None], device: torch.device) -> tuple[float | None, str]:
    """Peak extra memory of one call of ``fn`` in MiB, and how it was measured.

    CUDA: ``torch.cuda.max_memory_allocated`` above the allocation before the call (exact for
    tensors). CPU: growth of the sampled resident set size after ``malloc_trim`` (a lower bound:
    the allocator may reuse pages it kept, and short peaks between samples are missed);
    ``None`` with ``"n/a"`` where ``/proc`` is missing.
    """
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - base) / 2**20, "cuda.max_memory_allocated"
    if not os.path.exists("/proc/self/statm"):
        return None, "n/a"
    _malloc_trim()
    base = _rss_bytes()
    sampler = _RSSSampler()
    sampler.start()
    try:
        fn()
    finally:
        peak = sampler.stop()
    return (peak - base) / 2**20, "rss-growth (sampled, lower bound)"


def page_faults(fn: Callable[[], None]) -> int | None:
    """Minor page faults of one call of ``fn`` (memory the allocator had returned to the OS and
    that must be zero-filled again): a load-independent count, ``None`` where unsupported."""
    try:
        import resource
    except ImportError:  # pragma: no cover - not POSIX
        return None
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    fn()
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


def safe(fn: Callable[[], object]) -> tuple[object | None, str | None]:
    """``(result, None)`` or ``(None, error)``; never raises (the traceback goes to ``debug``)."""
    try:
        return fn(), None
    except Exception as exc:  # noqa: BLE001
        safe.debug = traceback.format_exc()  # type: ignore[attr-defined]
        return None, describe_error(exc)
