"""The GPU suite's dry mode (``benchmarks/gpu_suite.sh --dry-run``): every step of the suite runs on
CPU (the checks through the Triton interpreter), writes its files within the GPU machine's limits
and reports failures; and the targets are judged from the timing records."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_suite_dry_run(tmp_path: Path) -> None:
    pytest.importorskip("triton")
    out = tmp_path / "out"
    env = {**os.environ, "OUT": str(out), "PYTHON": sys.executable}
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_suite.sh"), "--dry-run"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    # what comes back from the GPU machine: at most 8 files, two folders deep, plain names
    assert len(files) <= 8 and all(re.fullmatch(r"[A-Za-z0-9._-]+(/[A-Za-z0-9._-]+)?", f) for f in files), files
    assert {"suite.log", "summary.md", "suite.json", "checks.json", "compile_stats.json", "bench/results.json"} <= set(files)
    suite = json.loads((out / "suite.json").read_text())
    assert suite["env"]["dry_run"] is True and suite["failed"] == []
    steps = {s["step"]: s for s in suite["steps"]}
    assert steps["build"]["exit"] == -1  # skipped in a dry run, and said so
    for name in ("correctness-paper-relu", "correctness-paper-sigmoid", "correctness-large", "official-and-cudagraph",
                 "warm-headline", "cuda-and-generic", "headline", "timing", "grid"):
        assert steps[name]["exit"] == 0, (name, steps[name])
    records = json.loads((out / "checks.json").read_text())["records"]
    checks = [r for r in records if r["section"] == "correctness"]
    # 3 shapes x {exact, hutchinson} x {fp32, tf32, bf16} + the official recipe
    assert len(checks) == 19 and all(r["ok"] for r in checks)
    assert any(r["section"] == "headline" and r.get("median_ms") for r in records)
    assert "## Checks" in (out / "summary.md").read_text()
    grid = json.loads((out / "bench" / "results.json").read_text())["meta"]
    assert grid["skipped_cases"] == ["paper"]  # --time-limit: batch 100 ran, batch 1024 did not start


def test_targets_are_judged_from_the_timing_records() -> None:
    from benchmarks import gpu_checks

    def rec(what, batch, provider, prec, graph, ms):
        return {"section": "headline", "what": what, "batch": batch, "provider": provider, "precision": prec,
                "cudagraph": graph, "median_ms": ms}

    records = [rec("regulariser", 100, "official", "fp32", False, 1.5),
               rec("regulariser", 100, "isofast-triton-exact", "fp32", True, 0.05),
               rec("regulariser", 65536, "official", "fp32", False, 10.0),
               rec("regulariser", 65536, "isofast-triton-exact", "fp32", False, 4.0),
               rec("regulariser", 65536, "isofast-triton-exact", "bf16", False, 1.2),
               rec("train-step", 100, "official", "fp32", False, 3.0),
               rec("train-step", 100, "isofast-triton", "fp32", True, 0.2)]
    v = gpu_checks.verdicts(records)
    assert v["batch100_graph_us"]["value"] == pytest.approx(50.0) and not v["batch100_graph_us"]["met"]
    assert v["batch100_speedup_vs_official"]["value"] == pytest.approx(30.0) and v["batch100_speedup_vs_official"]["met"]
    assert v["batch65536_fp32_speedup_vs_official"]["met"] and not v["batch65536_bf16_ms"]["met"]
    assert v["train_step_batch100_speedup_vs_official"]["value"] == pytest.approx(15.0)
    assert "batch65536_tf32_ms" not in v  # not measured is not met
