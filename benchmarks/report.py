"""Result records, the printed/markdown table and the speed-up plot.

Every measurement is one JSON record (``provider``, ``case``, ``batch``, ``phase``,
``median_ms``, ``status``, ...) that also carries the machine description (:func:`environment`):
``device``, ``versions`` and ``commit``, so records stay meaningful when concatenated.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import subprocess
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

if __name__ == "__main__":  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

import isofast

#: Keys every record has (the smoke test checks them).
RECORD_KEYS = ("provider", "case", "batch", "phase", "status", "error", "median_ms", "device", "versions", "commit")


def cpu_model() -> str:
    """The CPU model name from ``/proc/cpuinfo`` (or :func:`platform.processor`)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def device_name(device: torch.device) -> str:
    """Human-readable device: GPU name, or ``CPU model (N cores, T torch threads)``."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_model()} ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"


def _version(pkg: str) -> str | None:
    try:
        return importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
        return None


def git_commit() -> str:
    """``git rev-parse HEAD`` of the checkout holding this file, or ``"unknown"``."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent,
                             capture_output=True, text=True, timeout=10, check=True)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def environment(device: torch.device) -> dict[str, Any]:
    """The fields every record carries: ``device``, ``device_type``, ``versions``, ``commit``."""
    return {
        "device": device_name(device),
        "device_type": device.type,
        "versions": {"torch": torch.__version__, "triton": _version("triton"), "isofast": isofast.__version__,
                     "python": platform.python_version(), "jax": _version("jax")},
        "commit": git_commit(),
    }


def load_average() -> list[float] | None:
    """1/5/15-minute load averages (a shared machine's timings are noisier when these exceed the cores)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def write_json(path: Path, meta: dict[str, Any], records: Sequence[dict[str, Any]]) -> None:
    """``{"meta": ..., "records": [...]}`` to ``path``."""
    path.write_text(json.dumps({"meta": meta, "records": list(records)}, indent=1, default=str) + "\n")


def _fmt(x: float | None, digits: int = 1) -> str:
    if x is None:
        return "-"
    if abs(x) >= 100:
        return f"{x:.0f}"
    return f"{x:.{digits}f}"


def _index(records: Iterable[dict[str, Any]]) -> dict[tuple[str, int, str, str], dict[str, Any]]:
    return {(r["case"], r["batch"], r["provider"], r["phase"]): r for r in records if r.get("group") != "quality"}


def timing_table(records: Sequence[dict[str, Any]]) -> str:
    """Markdown table: one row per (case, batch, provider) with forward and forward+backward medians."""
    idx = _index(records)
    rows = ["| case | decoder | batch | provider | fwd ms | fwd+bwd ms | speed-up vs official (fwd+bwd) | peak MiB | page faults | GFLOP/s | note |",
            "|---|---|---:|---|---:|---:|---:|---:|---:|---:|---|"]
    seen: set[tuple[str, int, str]] = set()
    for r in records:
        key = (r["case"], r["batch"], r["provider"])
        if r.get("group") == "quality" or key in seen:
            continue
        seen.add(key)
        fwd = idx.get((*key, "fwd"), {})
        fb = idx.get((*key, "fwd_bwd"), {})
        status = fb.get("status") or fwd.get("status")
        note = "" if status == "ok" else f"{status}: {fb.get('error') or fwd.get('error')}"
        sp = fb.get("speedup_vs_official")
        gf = fb.get("achieved_tflops")
        rows.append(f"| {r['case']} | {r.get('decoder', '')} | {r['batch']} | {r['provider']} | {_fmt(fwd.get('median_ms'))} | "
                    f"{_fmt(fb.get('median_ms'))} | {_fmt(sp, 2) + 'x' if sp else '-'} | {_fmt(fb.get('peak_mem_mb'))} | "
                    f"{fb.get('page_faults') if fb.get('page_faults') is not None else '-'} | "
                    f"{_fmt(gf * 1e3 if gf else None)} | {note.replace('|', '/')} |")
    return "\n".join(rows)


def auto_provider(m: int, providers: Iterable[str]) -> str | None:
    """The isofast provider ``estimator="auto"`` corresponds to at latent width ``m``: exact up to
    ``isofast.planning.EXACT_MAX_LATENT``, Hutchinson K=1 above; a compiled backend if measured."""
    from isofast.planning import EXACT_MAX_LATENT

    if "isofast-auto" in providers:
        return "isofast-auto"
    suffix = "-exact" if m <= EXACT_MAX_LATENT else "-hutch-K1"
    names = [p for p in providers if p.startswith("isofast-") and p.endswith(suffix)]
    for backend in ("triton", "cuda", "cpu", "torch"):
        if f"isofast-{backend}{suffix}" in names:
            return f"isofast-{backend}{suffix}"
    return None


def headline_table(records: Sequence[dict[str, Any]]) -> str:
    """One row per case: the official recipe against what ``estimator="auto"`` runs, fwd+bwd."""
    fb = [r for r in records if r.get("group") not in (None, "quality") and r["phase"] == "fwd_bwd" and r["status"] == "ok"]
    rows = ["| case | decoder | batch | official ms | best baseline (ms) | isofast auto | isofast ms | speed-up vs official | vs best baseline |",
            "|---|---|---:|---:|---|---|---:|---:|---:|"]
    for key in dict.fromkeys((r["case"], r["batch"]) for r in fb):
        rs = {r["provider"]: r for r in fb if (r["case"], r["batch"]) == key}
        off = rs.get("official")
        auto = auto_provider(next(iter(rs.values()))["m"], rs)
        if off is None or auto is None:
            continue
        base = [r for p, r in rs.items() if not p.startswith("isofast-") and "+compile" not in p]
        best = min(base, key=lambda r: r["median_ms"])
        a = rs[auto]
        rows.append(f"| {key[0]} | {a['decoder']} | {key[1]} | {_fmt(off['median_ms'])} | {best['provider']} ({_fmt(best['median_ms'])}) | "
                    f"{auto.removeprefix('isofast-')} | {_fmt(a['median_ms'])} | {off['median_ms'] / a['median_ms']:.2f}x | "
                    f"{best['median_ms'] / a['median_ms']:.2f}x |")
    return "\n".join(rows)


def latent_table(records: Sequence[dict[str, Any]]) -> str:
    """Latent sweep: forward+backward ms per provider against ``m``, and exact / Hutchinson K=1."""
    sweep = [r for r in records if r.get("group") == "latent" and r["phase"] == "fwd_bwd" and r["status"] == "ok"]
    if not sweep:
        return ""
    provs = list(dict.fromkeys(r["provider"] for r in sweep))
    by = {(r["m"], r["provider"]): r["median_ms"] for r in sweep}
    ms = sorted({r["m"] for r in sweep})
    batch = sweep[0]["batch"]
    head = f"| m (batch {batch}) | " + " | ".join(provs) + " | exact / hutch-K1 | exact / hutch-K4 |"
    rows = [head, "|" + "---:|" * (len(provs) + 3)]
    for m in ms:
        ex = next((by.get((m, p)) for p in provs if p.endswith("-exact") and (m, p) in by), None)
        k1 = next((by.get((m, p)) for p in provs if p.endswith("-hutch-K1") and (m, p) in by), None)
        k4 = next((by.get((m, p)) for p in provs if p.endswith("-hutch-K4") and (m, p) in by), None)
        cells = [_fmt(by.get((m, p))) for p in provs]
        r1 = _fmt(ex / k1, 2) if ex and k1 else "-"
        r4 = _fmt(ex / k4, 2) if ex and k4 else "-"
        rows.append(f"| {m} | " + " | ".join(cells) + f" | {r1} | {r4} |")
    return "\n".join(rows)


def decoder_table(records: Sequence[dict[str, Any]]) -> str:
    """Conv and attention cases, fwd+bwd: every provider against the official recipe (and against
    it with the math attention kernel forced), and its loss against the same estimator's reference
    on the same codes and probes (Hutchinson K=1: the official recipe; exact: the generic path)."""
    fb = [r for r in records if r.get("group") in ("conv", "attention") and r["phase"] == "fwd_bwd"]
    if not fb:
        return ""
    rows = ["| case | provider | fwd+bwd ms | vs official | vs official (math SDPA) | loss | rel. diff vs reference | note |",
            "|---|---|---:|---:|---:|---:|---:|---|"]
    for case in dict.fromkeys(r["case"] for r in fb):
        rs = {r["provider"]: r for r in fb if r["case"] == case}

        def ms(name: str) -> float | None:
            r = rs.get(name)
            return r["median_ms"] if r is not None and r["status"] == "ok" else None

        refs = {"hutchinson": rs.get("official") if ms("official") else rs.get("official-math-sdpa"),
                "exact": rs.get("generic-exact") or rs.get("isofast-seq-exact")}
        for name, r in rs.items():
            if r["status"] != "ok":
                rows.append(f"| {case} | {name} | - | - | - | - | - | {r['status']}: {str(r['error']).replace('|', '/')} |")
                continue
            cells = [f"{ms(b) / r['median_ms']:.2f}x" if ms(b) else "-" for b in ("official", "official-math-sdpa")]
            ref = refs.get(r["estimator"])
            diff = "-"
            if ref is not None and ref is not r and ref["value"] and r["value"] is not None:
                diff = f"{abs(r['value'] - ref['value']) / abs(ref['value']):.1e}"
            rows.append(f"| {case} | {name} | {_fmt(r['median_ms'])} | {cells[0]} | {cells[1]} | {r['value']:.5g} | {diff} | {r['note']} |")
    return "\n".join(rows)


def quality_table(records: Sequence[dict[str, Any]]) -> str:
    """Estimator quality: relative std / bias of the loss and relative std of the gradient."""
    q = [r for r in records if r.get("group") == "quality"]
    if not q:
        return ""
    rows = ["| m | estimator | draws | rel. std loss | rel. bias loss | rel. std grad | rel. RMSE grad | mean cos(grad) | ms / draw (fwd+bwd) |",
            "|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in q:
        est = "exact" if r["estimator"] == "exact" else f"hutchinson K={r['n_probes']}"
        rows.append(f"| {r['m']} | {est} | {r['n_draws']} | {100 * r['rel_std_loss']:.2f}% | {100 * r['rel_bias_loss']:+.2f}% | "
                    f"{100 * r['rel_std_grad']:.1f}% | {100 * r['rel_rmse_grad']:.1f}% | {r['mean_cos_grad']:.3f} | {_fmt(r['median_ms'])} |")
    return "\n".join(rows)


def markdown(meta: dict[str, Any], records: Sequence[dict[str, Any]]) -> str:
    """The whole report: header, timing table, latent sweep and estimator quality."""
    parts = [f"# isofast benchmarks ({meta['mode']}, {meta['device']})", "",
             f"torch {meta['versions']['torch']}, isofast {meta['versions']['isofast']}, python {meta['versions']['python']}, "
             f"commit {meta['commit'][:12]}; load average at start/end {meta.get('load_start')} / {meta.get('load_end')}; "
             f"backends available: {meta.get('backends')}.",
             "Medians over alternating repetitions; speed-up = official fwd+bwd median / provider's; "
             "GFLOP/s credits every recipe with the floor FLOP count (docs/maths.md section 5); "
             f"peak memory: {meta.get('mem_method')}; clock: {meta.get('clock', 'wall')}, "
             f"{meta.get('torch_threads')} torch thread(s).", "",
             "## Headline: official recipe vs what `estimator=\"auto\"` runs (fwd+bwd)", "", headline_table(records),
             "", "## Timings", "", timing_table(records)]
    dt = decoder_table(records)
    if dt:
        parts += ["", "## Conv and attention decoders (fwd+bwd)", "", dt]
    lt = latent_table(records)
    if lt:
        parts += ["", "## Latent sweep (fwd+bwd ms)", "", lt]
    qt = quality_table(records)
    if qt:
        parts += ["", "## Estimator quality (fixed weights and codes, probe draws only)", "", qt]
    return "\n".join(parts) + "\n"


def plot(path: Path, records: Sequence[dict[str, Any]], title: str) -> None:
    """PNG: speed-up over the official recipe against batch (paper decoder, fwd+bwd), and the
    latent sweep's fwd+bwd time against ``m``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    names = list(dict.fromkeys(r["provider"] for r in records))
    colour = {n: plt.get_cmap("tab20")(i % 20) for i, n in enumerate(names)}  # same colour in both panels
    paper = [r for r in records if r.get("group") == "paper" and r["phase"] == "fwd_bwd" and r["status"] == "ok"
             and r.get("speedup_vs_official")]
    ax = axes[0]
    for prov in dict.fromkeys(r["provider"] for r in paper):
        pts = sorted((r["batch"], r["speedup_vs_official"]) for r in paper if r["provider"] == prov)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=prov, color=colour[prov])
    ax.axhline(1.0, color="k", lw=0.8, ls="--")
    ax.set_xscale("log")
    ax.set_xlabel("batch")
    ax.set_ylabel("speed-up over official recipe (fwd+bwd)")
    ax.set_title("paper decoder 2-256x4-784")
    if paper:
        ax.legend(fontsize=7)
    ax = axes[1]
    sweep = [r for r in records if r.get("group") == "latent" and r["phase"] == "fwd_bwd" and r["status"] == "ok"]
    for prov in dict.fromkeys(r["provider"] for r in sweep):
        pts = sorted((r["m"], r["median_ms"]) for r in sweep if r["provider"] == prov)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=prov, color=colour[prov])
    if sweep:
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_title(f"latent sweep, batch {sweep[0]['batch']}")
    ax.set_xlabel("latent width m")
    ax.set_ylabel("fwd+bwd median ms")
    if sweep:
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def render(out_dir: Path) -> str:
    """Re-render ``table.md`` and ``speedup.png`` from ``out_dir/results.json``; returns the markdown."""
    data = json.loads((out_dir / "results.json").read_text())
    md = markdown(data["meta"], data["records"])
    (out_dir / "table.md").write_text(md)
    plot(out_dir / "speedup.png", data["records"], f"isofast vs official IRVAE recipe, {data['meta']['device']}")
    return md


if __name__ == "__main__":  # python benchmarks/report.py DIR: re-render a results directory
    print(render(Path(sys.argv[1])))
