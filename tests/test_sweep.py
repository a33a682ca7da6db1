"""``isofast sweep``: the grid, the output files, aggregation and cell-by-cell resuming.

The training tests run a tiny grid (digits 0/1, 16-wide MLPs, 1 epoch, a 210-point swiss roll) for
real; they are marked ``slow`` (seconds each), the rest is pure logic."""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import shutil

import pytest

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")
pytest.importorskip("tqdm")

from isofast.cli import main as cli_main  # noqa: E402
from isofast.training import sweep as S  # noqa: E402
from isofast.training.loop import TrainConfig  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
MEASURES, WEIGHTS = ["scaled_isometry", "isometry"], [1.0, 10.0]
# 2 measures x 2 weights x 1 seed + 1 baseline = 5 cells, each a digits run and a swiss-roll run.
N_CELLS, N_RUNS = 5, 10


def _argv(out, **over: str) -> list[str]:
    opts = {"--digits": "0,1", "--hidden": "16,16", "--measures": ",".join(MEASURES),
            "--weights": ",".join(f"{w:g}" for w in WEIGHTS), "--seeds": "1", "--epochs": "1",
            "--fidelity-epochs": "1", "--n-samples": "210", "--eval-points": "60", "--jobs": "1",
            "--out": str(out)}
    opts.update(over)
    return ["sweep", "--no-progress", *[x for kv in opts.items() for x in kv]]


class Recorder:
    """Wraps the real ``train``: records each config, optionally raises on call ``fail_at``."""

    def __init__(self, real, fail_at: int | None = None) -> None:
        self.real, self.fail_at, self.configs = real, fail_at, []

    def __call__(self, config: TrainConfig):
        if self.fail_at is not None and len(self.configs) == self.fail_at:
            raise KeyboardInterrupt  # what Ctrl-C mid-sweep looks like
        self.configs.append(config)
        return self.real(config)

    @property
    def outs(self) -> list[str]:
        return [os.path.relpath(c.out, os.path.dirname(os.path.dirname(c.out))) for c in self.configs]


@pytest.fixture
def recorder(monkeypatch):
    rec = Recorder(S.train)
    monkeypatch.setattr(S, "train", rec)
    return rec


def _mtimes(out) -> dict[str, int]:
    found = {}
    for root, _, files in os.walk(out):
        if "metrics.json" in files:
            p = os.path.join(root, "metrics.json")
            found[os.path.relpath(p, out)] = os.stat(p).st_mtime_ns
    return found


# ----------------------------------------------------------------------------- pure logic


def test_grid_has_baselines_then_every_cell():
    spec = S.SweepSpec(out="x", measures=["isometry", "volume"], weights=[0.1, 100], seeds=[0, 1])
    cells = S.grid(spec)
    assert [c.name for c in cells[:2]] == ["baseline-w0-s0", "baseline-w0-s1"]
    assert len(cells) == 2 + 2 * 2 * 2 and len({c.name for c in cells}) == len(cells)
    assert "volume-w0.1-s1" in {c.name for c in cells} and "isometry-w100-s0" in {c.name for c in cells}
    with pytest.raises(ValueError, match="positive"):
        S.grid(dataclasses.replace(spec, weights=[0.0, 1.0]))
    with pytest.raises(ValueError, match="model"):
        S.grid(dataclasses.replace(spec, model="vae"))


@pytest.mark.parametrize("model, baseline", [("irvae", "vae"), ("irae", "ae")])
def test_cell_configs(model, baseline):
    spec = S.SweepSpec(out="o", model=model, epochs=7, fidelity_epochs=3, base={"digits": "0,1", "lr": 0.01})
    c = S.cell_config(spec, S.Cell("conformal", 10.0, 2))
    assert (c.model, c.measure, c.iso_weight, c.seed, c.epochs, c.dataset, c.lr) == (model, "conformal", 10.0, 2, 7, "digits", 0.01)
    assert c.out == os.path.join("o", "cells", "conformal-w10-s2") and c.digits == "0,1"
    f = S.cell_config(spec, S.Cell("conformal", 10.0, 2), fidelity=True)
    assert (f.dataset, f.epochs, f.digits, f.measure) == ("swissroll", 3, None, "conformal")
    assert f.out == os.path.join("o", "fidelity", "conformal-w10-s2")
    b = S.cell_config(spec, S.Cell(S.BASELINE, 0.0, 1))
    assert b.model == baseline and b.resolved().iso_weight == 0.0


def test_summary_means_and_sample_std():
    recs = [{"measure": "conformal", "weight": 1.0, "seed": s, "mse": v, "mcn": 1.0, "vor": 0.0,
             "geodesic_fidelity": math.nan, "seconds": 1.0} for s, v in enumerate([1.0, 2.0, 4.0])]
    recs.append({"measure": "conformal", "weight": 10.0, "seed": 0, "mse": 5.0, "mcn": 2.0, "vor": 1.0,
                 "geodesic_fidelity": 0.5, "seconds": 2.0})
    rows = S.summarize(recs)
    assert [(r["measure"], r["weight"], r["n_seeds"]) for r in rows] == [("conformal", 1.0, 3), ("conformal", 10.0, 1)]
    assert rows[0]["mse_mean"] == pytest.approx(7 / 3)
    assert rows[0]["mse_std"] == pytest.approx(math.sqrt(((1 - 7 / 3) ** 2 + (2 - 7 / 3) ** 2 + (4 - 7 / 3) ** 2) / 2))
    assert math.isnan(rows[0]["geodesic_fidelity_mean"]) and math.isnan(rows[1]["mse_std"])


# ----------------------------------------------------------------------------- the command


@pytest.mark.slow
def test_sweep_command_writes_outputs_and_resumes(tmp_path, recorder, capsys):
    out = tmp_path / "sw"
    assert cli_main(_argv(out)) == 0
    assert len(recorder.configs) == N_RUNS
    assert not any(c.resume for c in recorder.configs)  # nothing to resume from on a fresh sweep

    results = json.loads((out / "results.json").read_text())
    assert len(results) == N_CELLS
    assert all(set(r) == set(S.RECORD_KEYS) for r in results)
    base = [r for r in results if r["measure"] == S.BASELINE]
    assert [(r["model"], r["weight"]) for r in base] == [("vae", 0.0)]
    for r in results:
        assert r["mse"] > 0 and r["mcn"] >= 1 and r["vor"] >= 0 and r["seconds"] > 0
        assert -1 <= r["geodesic_fidelity"] <= 1
    with open(out / "summary.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["measure"], float(r["weight"])) for r in rows] == [
        (S.BASELINE, 0.0)] + [(m, w) for m in MEASURES for w in WEIGHTS]
    assert {"mse_mean", "mse_std", "mcn_mean", "vor_mean", "geodesic_fidelity_mean", "n_seeds"} <= set(rows[0])
    assert (out / "pareto.png").read_bytes()[:8] == PNG_MAGIC
    assert "scaled_isometry" in capsys.readouterr().out

    # Rerun: everything is finished, nothing trains, no file of a finished run is rewritten.
    before = _mtimes(out)
    assert len(before) == N_RUNS
    recorder.configs.clear()
    assert cli_main(_argv(out)) == 0
    assert recorder.configs == []
    assert _mtimes(out) == before
    assert json.loads((out / "results.json").read_text()) == results

    # Delete one cell's digits run: only that run trains again.
    shutil.rmtree(out / "cells" / "isometry-w10-s0")
    assert cli_main(_argv(out)) == 0
    assert recorder.outs == [os.path.join("cells", "isometry-w10-s0")]
    after = _mtimes(out)
    changed = {k for k in after if after[k] != before.get(k)}
    assert changed == {os.path.join("cells", "isometry-w10-s0", "metrics.json")}


@pytest.mark.slow
def test_interrupted_sweep_continues_where_it_stopped(tmp_path, monkeypatch):
    out = tmp_path / "sw"
    first = Recorder(S.train, fail_at=3)  # baseline (2 runs) + the first cell's digits run, then Ctrl-C
    monkeypatch.setattr(S, "train", first)
    with pytest.raises(KeyboardInterrupt):
        cli_main(_argv(out))
    assert len(first.configs) == 3
    partial = json.loads((out / "results.json").read_text())  # what finished is already reported
    assert [r["measure"] for r in partial] == [S.BASELINE]
    done = _mtimes(out)

    second = Recorder(first.real)
    monkeypatch.setattr(S, "train", second)
    assert cli_main(_argv(out)) == 0
    trained_first = {os.path.relpath(c.out, out) for c in first.configs}
    assert not trained_first & {os.path.relpath(c.out, out) for c in second.configs}
    assert len(second.configs) == N_RUNS - 3
    assert all(_mtimes(out)[k] == v for k, v in done.items())
    assert len(json.loads((out / "results.json").read_text())) == N_CELLS


@pytest.mark.slow
def test_more_epochs_resume_half_trained_runs_from_their_checkpoint(tmp_path, recorder):
    out = tmp_path / "sw"
    argv = _argv(out, **{"--measures": "conformal", "--weights": "1", "--fidelity-dataset": "none"})
    assert cli_main(argv) == 0
    assert len(recorder.configs) == 2  # baseline + one cell, no fidelity runs
    recorder.configs.clear()
    # metrics.json records 1 epoch, 2 are requested: not finished, resumed from checkpoint.pt.
    assert cli_main(argv + ["--epochs", "2"]) == 0
    assert len(recorder.configs) == 2 and all(c.resume and c.epochs == 2 for c in recorder.configs)
    history = json.loads((out / "cells" / "conformal-w1-s0" / "metrics.json").read_text())["history"]
    assert [h["epoch"] for h in history] == [1, 2]
    results = json.loads((out / "results.json").read_text())
    assert all(r["geodesic_fidelity"] is None for r in results)  # --fidelity-dataset none


@pytest.mark.slow
def test_finished_run_with_other_options_is_not_reused(tmp_path, recorder, capsys):
    out = tmp_path / "sw"
    argv = _argv(out, **{"--measures": "conformal", "--weights": "1", "--fidelity-dataset": "none"})
    assert cli_main(argv) == 0
    assert cli_main(argv + ["--lr", "0.01"]) == 2
    assert "different options" in capsys.readouterr().err


def test_bad_arguments_fail_clearly(tmp_path, capsys):
    assert cli_main(_argv(tmp_path, **{"--weights": "0,1"})) == 2
    assert "positive" in capsys.readouterr().err
    assert cli_main(_argv(tmp_path) + ["--measure", "volume"]) == 2
    assert "--measures" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli_main(_argv(tmp_path, **{"--measures": "isometry,nonsense"}))
