"""DistributedDataParallel: one DDP step on 2 gloo processes equals one single-process step on the
global batch (this also checks the core's ``sync=True`` collective), and torchrun end to end."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

pytest.importorskip("sklearn")
pytest.importorskip("tqdm")

from isofast.training.models import build_model  # noqa: E402
from isofast.training.loop import train_step  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
WORLD = 2
GLOBAL_BATCH = 16


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _setup(kind: str, measure: str):
    torch.manual_seed(0)
    # IRAE without mixup: the only randomness is the initialisation, so the runs are comparable.
    model = build_model(kind, 64, 2, hidden=[32, 32], image_shape=(1, 8, 8), iso_weight=0.5, eta=None,
                        measure=measure).double()
    g = torch.Generator().manual_seed(1)
    x = torch.rand(GLOBAL_BATCH, 64, generator=g, dtype=torch.float64)
    return model, x


def _worker(rank: int, port: int, out: str, kind: str, measure: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        model, x = _setup(kind, measure)
        model.sync = True
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        local = x.chunk(WORLD)[rank]
        parts = train_step(ddp, local, opt)
        if rank == 0:
            torch.save({"params": [p.detach() for p in model.parameters()], "reg": parts["reg"]}, out)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("measure", ["scaled_isometry", "isometry"])
def test_ddp_step_equals_single_process_step_on_global_batch(tmp_path, measure):
    out = str(tmp_path / "ddp.pt")
    mp.spawn(_worker, args=(_free_port(), out, "irae", measure), nprocs=WORLD, join=True)
    ddp = torch.load(out, weights_only=True)

    model, x = _setup("irae", measure)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before = [p.detach().clone() for p in model.parameters()]
    parts = train_step(model, x, opt)
    # The distortion is a ratio of batch means: synced over ranks it is the global-batch value.
    torch.testing.assert_close(ddp["reg"], parts["reg"], rtol=1e-10, atol=0)
    moved = 0.0
    for p0, p, q in zip(before, model.parameters(), ddp["params"]):
        torch.testing.assert_close(q, p.detach(), rtol=1e-9, atol=1e-12)
        moved += float((p.detach() - p0).abs().sum())
    assert moved > 0  # the step did something, so the equality means something


@pytest.mark.slow
def test_torchrun_train_end_to_end(tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
           "-m", "isofast", "train", "--digits", "0,1", "--hidden", "16", "--epochs", "2", "--no-progress",
           "--device", "cpu", "--out", str(out)]
    proc = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    config = json.load(open(out / "config.json"))
    assert config["world_size"] == 2
    metrics = json.load(open(out / "metrics.json"))
    assert len(metrics["history"]) == 2 and metrics["mcn"] >= 1
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert len(ckpt["rng"]) == 2  # every rank's RNG state, for an exact resume
