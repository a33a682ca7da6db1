"""The GPU suite's dry mode (``benchmarks/gpu_checks.py --dry-run``): the checks of the "triton"
backend run end to end on CPU through the Triton interpreter, and report failures."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")
REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_checks_dry_run(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "gpu_checks.py"), "--dry-run", "--skip-timing", "--out", str(tmp_path)],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((tmp_path / "checks.json").read_text())
    assert summary["env"]["dry_run"] is True
    checks = [r for r in summary["records"] if r["section"] == "correctness"]
    # 3 shapes x {exact, hutchinson} x {fp32, tf32, bf16} + the official recipe
    assert len(checks) == 19 and all(r["ok"] for r in checks)
    assert summary["failed"] == []
