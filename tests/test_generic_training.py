"""A conv decoder's training step with the first-order estimator: the loss under
torch.compile(fullgraph=True) (its backward compiled by AOTAutograd) matches eager, and a two-process gloo DDP step equals the single-process step on the global batch."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import isofast
from tests.conftest import ConvDecoder

WORLD, GLOBAL_BATCH, K = 2, 8, 3


def _inputs(dtype=torch.float64):
    g = torch.Generator().manual_seed(3)
    z = torch.randn(GLOBAL_BATCH, 4, generator=g, dtype=dtype)
    return z, torch.randn(GLOBAL_BATCH, K, 4, generator=g, dtype=dtype)


def _loss(decoder, z, probes, estimator="forward"):
    return isofast.relaxed_distortion(decoder, z, eta=None, estimator=estimator, probes=probes)


def _step(decoder, z, probes, loss_fn=_loss, estimator="forward"):
    loss = loss_fn(decoder, z, probes, estimator)
    return loss, torch.autograd.grad(loss, list(decoder.parameters()))


@pytest.mark.slow
def test_compiled_training_step_matches_eager():
    dec = ConvDecoder(4, dtype=torch.float32)
    z, probes = (t.float() for t in _inputs())
    loss, grads = _step(dec, z, probes)
    closs, cgrads = _step(dec, z, probes, torch.compile(_loss, fullgraph=True))
    torch.testing.assert_close(closs, loss, rtol=1e-5, atol=0)
    for c, e in zip(cgrads, grads):
        torch.testing.assert_close(c, e, rtol=1e-4, atol=1e-7)


def _worker(rank: int, store: str, out: str, estimator: str) -> None:
    torch.set_num_threads(1)
    # a file store in the test's own folder: no TCP port that another test may still hold
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
    try:
        dec = ConvDecoder(4)
        ddp = torch.nn.parallel.DistributedDataParallel(dec)
        z, probes = (t.chunk(WORLD)[rank] for t in _inputs())
        loss = isofast.relaxed_distortion(ddp, z, eta=None, estimator=estimator, probes=probes, sync=True)
        loss.backward()
        if rank == 0:
            torch.save({"loss": loss.detach(), "grads": [p.grad for p in dec.parameters()]}, out)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("estimator", ["forward", "hutchinson"])
def test_ddp_step_equals_single_process_step_on_global_batch(tmp_path, estimator):
    """Both first-order estimators; Hutchinson runs the decoder's forward twice and takes a plain
    VJP inside the DDP module's step."""
    out = str(tmp_path / "ddp.pt")
    mp.spawn(_worker, args=(str(tmp_path / "store"), out, estimator), nprocs=WORLD, join=True)
    got = torch.load(out, weights_only=True)
    loss, grads = _step(ConvDecoder(4), *_inputs(), estimator=estimator)
    torch.testing.assert_close(got["loss"], loss.detach(), rtol=1e-10, atol=0)
    for g, w in zip(got["grads"], grads):
        # DDP averages gradients over ranks; the synced loss makes that the global-batch gradient
        torch.testing.assert_close(g, w, rtol=1e-8, atol=1e-12)
