"""Smoke test of the benchmark runner's pieces on a tiny case (fast; no timings are asserted)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import data_metric, dispatcher, report  # noqa: E402
from benchmarks.cases import Case, make_inputs  # noqa: E402
from benchmarks.estimator_quality import estimator_quality  # noqa: E402
from benchmarks.flops import forward_flops, regulariser_flops  # noqa: E402
from benchmarks.providers import Provider, Runner, all_providers  # noqa: E402
from benchmarks.run import measure_case  # noqa: E402
from benchmarks.timing import time_alternating  # noqa: E402

TINY = Case("tiny", "paper", batch=6, m=2, hidden=(8, 8), out=5)
CPU = torch.device("cpu")


def _broken_build(inputs, device):  # type: ignore[no-untyped-def]
    raise RuntimeError("cannot build\nsecond line")


def _broken_backward(inputs, device):  # type: ignore[no-untyped-def]
    def fail() -> None:
        raise RuntimeError("double backward refused")
    return Runner(lambda: None, fail, lambda: 0.0)


def test_records_keys_and_failures(tmp_path: Path) -> None:
    cat = dict(all_providers())
    cat["broken-build"] = Provider("broken-build", "hutchinson", _broken_build)
    cat["broken-backward"] = Provider("broken-backward", "hutchinson", _broken_backward)
    names = ["official", "isofast-torch-exact", "isofast-torch-hutch-K1", "broken-build", "broken-backward", "jax"]
    env = report.environment(CPU)
    recs = measure_case(TINY, names, CPU, env, reps=3, budget_s=None, memory=True, catalogue=cat)
    assert len(recs) == 2 * len(names)
    for r in recs:
        for key in report.RECORD_KEYS:
            assert key in r, key
        assert set(r["versions"]) >= {"torch", "triton", "isofast", "python"}
    by = {(r["provider"], r["phase"]): r for r in recs}
    for prov in ("official", "isofast-torch-exact", "isofast-torch-hutch-K1"):
        for phase in ("fwd", "fwd_bwd"):
            r = by[(prov, phase)]
            assert r["status"] == "ok" and r["median_ms"] > 0 and r["reps"] == 3
            assert r["speedup_vs_official"] is not None
    # Same probes, same codes: the Hutchinson recipes agree on the loss.
    assert by[("official", "fwd")]["value"] == pytest.approx(by[("isofast-torch-hutch-K1", "fwd")]["value"], rel=1e-4)
    bb = by[("broken-build", "fwd_bwd")]
    assert bb["status"] == "failed" and bb["error"] == "RuntimeError: cannot build" and bb["median_ms"] is None
    assert by[("broken-backward", "fwd")]["status"] == "ok"
    assert by[("broken-backward", "fwd_bwd")]["status"] == "failed"
    assert "double backward refused" in by[("broken-backward", "fwd_bwd")]["error"]
    assert by[("jax", "fwd")]["status"] in ("skipped", "ok")

    meta = {**env, "mode": "test", "clock": "wall", "torch_threads": 1}
    report.write_json(tmp_path / "results.json", meta, recs)
    loaded = json.loads((tmp_path / "results.json").read_text())
    assert len(loaded["records"]) == len(recs)
    md = report.markdown(meta, recs)
    assert "broken-build" in md and "failed" in md
    report.plot(tmp_path / "speedup.png", recs, "test")
    assert (tmp_path / "speedup.png").stat().st_size > 0


def test_alternating_timer_drops_failures() -> None:
    calls: list[str] = []

    def bad() -> None:
        raise ValueError("nope")

    out = time_alternating({"a": lambda: calls.append("a"), "b": lambda: calls.append("b"), "bad": bad}, reps=4)
    assert len(out["a"].samples) == 4 and len(out["b"].samples) == 4
    assert out["bad"].error == "ValueError: nope" and not out["bad"].samples
    # rotation: the two live providers alternate and neither always goes first
    timed = calls[2:]
    assert timed[0::2] != ["a"] * 4


def test_flops_and_quality() -> None:
    widths = (2, 256, 256, 256, 256, 784)
    assert forward_flops(widths) == 795648
    assert regulariser_flops(widths, "hutchinson", 1) == regulariser_flops(widths, "exact") == 9 * 795648
    q = estimator_quality(m_values=(2,), ks=(1,), n_draws=3, batch=5)
    assert [r["estimator"] for r in q] == ["exact", "hutchinson"]
    assert q[0]["rel_std_loss"] == 0.0 and q[1]["rel_std_loss"] > 0.0
    inputs = make_inputs(TINY)
    assert inputs.z.shape == (6, 2) and inputs.probes.shape[:2] == (6, 4)


def test_data_metric_quick(tmp_path: Path) -> None:
    """``benchmarks/data_metric.py --quick``: identity and diagonal timed per backend, ratio, files."""
    records = data_metric.main(["--quick", "--out", str(tmp_path)])
    assert {r["backend"] for r in records} >= {"torch"}
    for r in records:
        assert r["error"] is None and r["reps"] == 3
        assert r["identity_ms"] > 0 and r["diagonal_ms"] > 0 and r["ratio"] > 0
    assert {r["op"] for r in records} == {"exact", "hutchinson K=1"}
    saved = json.loads((tmp_path / "data_metric.json").read_text())
    assert saved["meta"]["torch_threads"] == 1 and saved["meta"]["clock"].startswith("cpu")
    assert len(saved["records"]) == len(records)
    assert "| torch | tiny m=2 | exact | 4 |" in (tmp_path / "data_metric.md").read_text()


@pytest.mark.parametrize("op", ["mlp_pullback", "mlp_hutchinson"])
def test_dispatcher_steps_run(op: str) -> None:
    """``benchmarks/dispatcher.py``: each op's step runs through the dispatcher and directly."""
    from conftest import require_backend

    require_backend("cpu")
    dec = torch.nn.Sequential(torch.nn.Linear(2, 8), torch.nn.ReLU(), torch.nn.Linear(8, 5), torch.nn.Sigmoid())
    z, probes = torch.randn(3, 2), torch.randn(3, 1, 2)
    for via in (True, False):
        dispatcher.step(op, via, dec, z, probes)()


@pytest.mark.slow
def test_conv_and_attention_cases() -> None:
    """The decoder cases build and agree: the stream path equals today's generic path (exact) and
    the generic Hutchinson path equals the official recipe on the same probes."""
    from benchmarks.cases import ATTENTION, CONV

    env = report.environment(CPU)
    conv = Case("tiny-deconv28", "conv", batch=2, m=2, kind="deconv28", providers=CONV)
    recs = measure_case(conv, list(CONV), CPU, env, reps=1, budget_s=None, memory=False)
    by = {r["provider"]: r for r in recs if r["phase"] == "fwd_bwd"}
    assert by["isofast-seq-exact"]["status"] == "ok" and by["isofast-forward-K2"]["status"] == "ok"
    assert by["isofast-seq-exact"]["value"] == pytest.approx(by["generic-exact"]["value"], rel=1e-5)
    assert by["generic-hutch-K1"]["value"] == pytest.approx(by["official"]["value"], rel=1e-5)
    assert all(r["flops"] is None for r in recs)
    attention = Case("tiny-attention", "attention", batch=2, m=256, kind="attention", providers=ATTENTION)
    recs += measure_case(attention, ["official", "official-math-sdpa"], CPU, env, reps=1, budget_s=None, memory=False)
    table = report.decoder_table(recs)
    assert "| tiny-deconv28 | isofast-seq-exact |" in table and "| tiny-attention | official-math-sdpa |" in table
