"""Run the benchmark grid: ``python benchmarks/run.py --quick --out DIR``.

Writes ``DIR/results.json`` (one record per measurement), ``DIR/table.md`` (the printed table)
and ``DIR/speedup.png``. Modes: ``--quick`` (under 3 minutes on 2 CPU cores; a smoke test),
``--medium`` (paper decoder at batch 100 and 1024, latent sweep, widths, activations, estimator
quality) and ``--full`` (adds batch 8192 and 65536: meant for a GPU, ``--device cuda``).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

import isofast
from benchmarks import report
from benchmarks.cases import Case, grid, make_inputs
from benchmarks.estimator_quality import estimator_quality
from benchmarks.flops import regulariser_flops
from benchmarks.providers import Provider, Runner, Skip, all_providers, available_backend_names, default_names
from benchmarks.timing import CLOCKS, Timing, describe_error, page_faults, peak_memory, time_alternating

#: Per mode: timed repetitions, seconds of timed calls per phase and case after which repetitions
#: stop early (never below 3), and the estimator-quality grid (m values, K values, draws).
SETTINGS: dict[str, dict[str, Any]] = {
    "quick": {"reps": 5, "budget_s": 3.0, "quality": ((2,), (1, 4), 12)},
    "medium": {"reps": 9, "budget_s": 15.0, "quality": ((2, 4, 8, 16, 64), (1, 4, 16), 50)},
    "full": {"reps": 21, "budget_s": 60.0, "quality": ((2, 4, 8, 16, 64), (1, 4, 16), 200)},
}


def providers_for(case: Case, device: torch.device, compile_: bool) -> list[str]:
    """The provider names a case runs: its own list plus the other available isofast backends,
    or, for the paper decoder, :func:`benchmarks.providers.default_names`."""
    if case.providers is None:
        return default_names(device, compile_)
    names = list(case.providers)
    if case.kind != "mlp":  # the compiled backends run MLPs only
        return names
    for backend in available_backend_names(device):
        names += [f"isofast-{backend}-exact", f"isofast-{backend}-hutch-K1"]
    return names


def _record(env: dict[str, Any], case: Case, prov: Provider, phase: str, **fields: Any) -> dict[str, Any]:
    rec: dict[str, Any] = {
        "provider": prov.name, "case": case.name, "group": case.group, "batch": case.batch, "m": case.m,
        "widths": list(case.widths), "decoder": case.describe(), "activation": case.act,
        "out_activation": case.out_act, "estimator": prov.estimator,
        "n_probes": prov.n_probes if prov.estimator in ("hutchinson", "forward") else None, "phase": phase,
        "status": "ok", "error": None, "median_ms": None, "min_ms": None, "iqr_ms": None, "reps": 0,
        "speedup_vs_official": None, "peak_mem_mb": None, "mem_method": None, "flops": None,
        "achieved_tflops": None, "value": None, "note": prov.note,
    }
    rec.update(fields)
    rec.update(env)
    return rec


def measure_case(case: Case, names: list[str], device: torch.device, env: dict[str, Any], reps: int,
                 budget_s: float | None, memory: bool = True, warmup: int = 1,
                 clock: str = "wall", catalogue: dict[str, Provider] | None = None) -> list[dict[str, Any]]:
    """Time every provider of ``case`` (forward, then forward+backward) in one process, alternating
    between providers each repetition; failures and skips become records, never exceptions.
    ``catalogue`` maps names to providers (default :func:`benchmarks.providers.all_providers`)."""
    catalogue = catalogue if catalogue is not None else all_providers()
    provs = [catalogue[n] for n in names]
    inputs = make_inputs(case, device)
    runners: dict[str, Runner] = {}
    records: list[dict[str, Any]] = []
    values: dict[str, float] = {}
    for prov in provs:
        try:
            runner = prov.build(inputs, device)
            values[prov.name] = runner.value()
            runners[prov.name] = runner
        except Skip as exc:
            records += [_record(env, case, prov, ph, status="skipped", error=str(exc)) for ph in ("fwd", "fwd_bwd")]
        except Exception as exc:  # noqa: BLE001 - a provider that cannot run is a result
            records += [_record(env, case, prov, ph, status="failed", error=describe_error(exc)) for ph in ("fwd", "fwd_bwd")]
    timings: dict[str, dict[str, Timing]] = {}
    for phase in ("fwd", "fwd_bwd"):
        fns = {n: (r.forward if phase == "fwd" else r.forward_backward) for n, r in runners.items()}
        timings[phase] = time_alternating(fns, reps, warmup=warmup, budget_s=budget_s, clock=CLOCKS[clock])
    for prov in provs:
        if prov.name not in runners:
            continue
        mem, method, faults = None, None, None
        if memory and timings["fwd_bwd"][prov.name].error is None:
            try:
                mem, method = peak_memory(runners[prov.name].forward_backward, device)
                if device.type == "cpu":
                    faults = page_faults(runners[prov.name].forward_backward)
            except Exception as exc:  # noqa: BLE001
                mem, method = None, f"failed: {describe_error(exc)}"
        for phase in ("fwd", "fwd_bwd"):
            t = timings[phase][prov.name]
            official = timings[phase].get("official")
            ref = official.median_ms if official is not None else None
            flops = (case.batch * regulariser_flops(case.widths, prov.estimator, prov.n_probes, backward=phase == "fwd_bwd")
                     if case.kind == "mlp" else None)
            med = t.median_ms
            records.append(_record(
                env, case, prov, phase, status="ok" if t.error is None else "failed", error=t.error,
                median_ms=med, min_ms=t.min_ms, iqr_ms=t.iqr_ms, reps=len(t.samples),
                speedup_vs_official=(ref / med) if (ref and med) else None,
                peak_mem_mb=mem if phase == "fwd_bwd" else None, mem_method=method if phase == "fwd_bwd" else None,
                page_faults=faults if phase == "fwd_bwd" else None,
                flops=flops, achieved_tflops=(flops / (med * 1e-3) / 1e12) if med and flops else None,
                value=values.get(prov.name), clock=clock,
            ))
    return records


def _print_case(records: list[dict[str, Any]]) -> None:
    fb = {r["provider"]: r for r in records if r["phase"] == "fwd_bwd"}
    fw = {r["provider"]: r for r in records if r["phase"] == "fwd"}
    r0 = records[0]
    print(f"\n== {r0['case']} ({r0['decoder']}), batch {r0['batch']}", flush=True)
    for name, r in fb.items():
        if r["status"] != "ok":
            print(f"  {name:34s} {r['status']}: {r['error']}", flush=True)
            continue
        sp = f"{r['speedup_vs_official']:.2f}x" if r["speedup_vs_official"] else "-"
        print(f"  {name:34s} fwd {fw[name]['median_ms'] or float('nan'):9.2f} ms   fwd+bwd {r['median_ms']:9.2f} ms"
              f"   vs official {sp:>7s}   loss {r['value']:.5g}", flush=True)


def main(argv: list[str] | None = None) -> int:
    """Parse the CLI, run the grid, write ``results.json``, ``table.md`` and ``speedup.png``."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_const", dest="mode", const="quick", help="smoke-test grid (default)")
    mode.add_argument("--medium", action="store_const", dest="mode", const="medium", help="CPU-sized complete grid")
    mode.add_argument("--full", action="store_const", dest="mode", const="full", help="complete grid incl. batch 8192/65536")
    ap.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda if available")
    ap.add_argument("--out", type=Path, required=True, help="output directory")
    ap.add_argument("--reps", type=int, default=None, help="timed repetitions per phase (default by mode)")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    ap.add_argument("--clock", choices=tuple(CLOCKS), default="wall",
                    help="wall (default) or cpu: CPU seconds of this process, robust to other load; use with --threads 1")
    ap.add_argument("--cases", default=None, help="comma-separated case-name prefixes to run (default: all)")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile providers")
    ap.add_argument("--no-quality", action="store_true", help="skip the estimator-quality study")
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-memory probe")
    ap.add_argument("--time-limit", type=float, default=None, metavar="S",
                    help="start no case after S seconds (results so far are written after every case)")
    args = ap.parse_args(argv)
    mode_name = args.mode or "quick"
    settings = SETTINGS[mode_name]
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda but CUDA is not available")
    args.out.mkdir(parents=True, exist_ok=True)
    env = report.environment(device)
    if args.clock == "cpu" and torch.get_num_threads() > 1:
        print("note: --clock cpu sums the CPU time of all torch threads; pass --threads 1 for per-core time", flush=True)
    meta: dict[str, Any] = {**env, "mode": mode_name, "torch_threads": torch.get_num_threads(), "clock": args.clock,
                            "backends": isofast.backends.available(), "load_start": report.load_average(),
                            "mem_method": "cuda.max_memory_allocated" if device.type == "cuda" else
                            "resident-set growth after malloc_trim, sampled (lower bound)"}
    print(f"isofast benchmarks: mode={mode_name} device={env['device']} commit={env['commit'][:12]} "
          f"backends={meta['backends']} load={meta['load_start']}", flush=True)
    t0 = time.perf_counter()
    records: list[dict[str, Any]] = []
    cases = grid(mode_name, device)
    if args.cases:
        prefixes = tuple(args.cases.split(","))
        cases = [c for c in cases if c.name.startswith(prefixes)]
    reps = args.reps or settings["reps"]
    meta["skipped_cases"] = []
    for i, case in enumerate(cases):
        if args.time_limit is not None and time.perf_counter() - t0 > args.time_limit:
            meta["skipped_cases"] = [c.name for c in cases[i:]]
            print(f"\ntime limit of {args.time_limit:.0f} s reached: {len(cases) - i} case(s) not run: "
                  f"{', '.join(meta['skipped_cases'])}", flush=True)
            break
        names = providers_for(case, device, compile_=not args.no_compile)
        if device.type == "cpu" and (case.group != "paper" or case.batch > (100 if mode_name == "quick" else 1024)):
            # compiling on CPU costs tens of seconds per shape: only where the table needs it
            names = [n for n in names if "compile" not in n]
        recs = measure_case(case, names, device, env, reps, settings["budget_s"], memory=not args.no_memory,
                            clock=args.clock)
        _print_case(recs)
        records += recs
        report.write_json(args.out / "results.json", {**meta, "partial": True}, records)  # survives a kill
    if not args.no_quality and not meta["skipped_cases"]:
        m_values, ks, draws = settings["quality"]
        print(f"\n== estimator quality: m in {m_values}, K in {ks}, {draws} draws, batch 100", flush=True)
        q = estimator_quality(m_values, ks, draws, batch=100, device=device, clock=CLOCKS[args.clock])
        records += [{**r, **env} for r in q]
    meta["load_end"] = report.load_average()
    meta["elapsed_s"] = round(time.perf_counter() - t0, 1)
    report.write_json(args.out / "results.json", meta, records)
    md = report.markdown(meta, records)
    (args.out / "table.md").write_text(md)
    report.plot(args.out / "speedup.png", records, f"isofast vs official IRVAE recipe, {env['device']}")
    print("\n" + md)
    print(f"wrote {args.out / 'results.json'}, {args.out / 'table.md'}, {args.out / 'speedup.png'} "
          f"in {meta['elapsed_s']} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
