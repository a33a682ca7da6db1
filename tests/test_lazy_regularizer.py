"""IsometricRegularizer(every=k, subsample=f): lazy and subsampled regularisation, and their
``isofast train`` options."""

from __future__ import annotations

import pytest
import torch
from conftest import GRAD_RTOL, RTOL, make_mlp, rel_err

import isofast

F64 = torch.float64


def _setup(bsz: int = 6) -> tuple[torch.nn.Module, torch.Tensor]:
    dec = make_mlp([3, 8, 5], act="softplus", seed=4)
    z = torch.randn(bsz, 3, dtype=F64, generator=torch.Generator().manual_seed(1), requires_grad=True)
    return dec, z


def test_every_k_regularises_every_kth_call_scaled_by_k() -> None:
    dec, z = _setup()
    full = isofast.distortion(dec, z, eta=None, estimator="exact")
    reg = isofast.IsometricRegularizer(weight=2.0, eta=None, estimator="exact", every=3)
    values = [reg(dec, z) for _ in range(7)]
    for i, v in enumerate(values):
        if i % 3 == 0:
            assert rel_err(v, 2.0 * 3 * full) < RTOL[F64] and v.requires_grad
        else:
            assert float(v) == 0.0 and v.grad_fn is None and v.shape == ()
    assert reg.calls == 7


def test_every_k_keeps_the_summed_gradient() -> None:
    """Over k calls on the same codes, the lazy regulariser's gradients sum to the eager one's."""
    dec, z = _setup()
    params = [z, *dec.parameters()]

    def summed(every: int) -> list[torch.Tensor]:
        reg = isofast.IsometricRegularizer(eta=None, estimator="exact", every=every)
        total = sum(reg(dec, z) for _ in range(4))
        return list(torch.autograd.grad(total, params))

    for lazy, eager in zip(summed(4), summed(1)):
        assert rel_err(lazy, eager) < GRAD_RTOL[F64]


def test_eval_mode_regularises_every_call_unscaled() -> None:
    dec, z = _setup()
    full = isofast.distortion(dec, z, eta=None, estimator="exact")
    reg = isofast.IsometricRegularizer(eta=None, estimator="exact", every=5, subsample=0.5).eval()
    for _ in range(3):
        assert rel_err(reg(dec, z), full) < RTOL[F64]
    assert reg.calls == 0


def test_call_count_is_in_the_state_dict() -> None:
    dec, z = _setup()
    reg = isofast.IsometricRegularizer(eta=None, estimator="exact", every=4)
    for _ in range(6):
        reg(dec, z)
    resumed = isofast.IsometricRegularizer(eta=None, estimator="exact", every=4)
    resumed.load_state_dict(reg.state_dict())
    assert resumed.calls == 6
    assert [float(resumed(dec, z).detach()) != 0 for _ in range(3)] == [False, False, True]  # calls 6, 7, 8


def test_subsample_takes_a_random_fraction_of_the_batch() -> None:
    dec, z = _setup(bsz=7)
    reg = isofast.IsometricRegularizer(eta=None, estimator="exact", subsample=0.4)
    value = reg(dec, z, generator=torch.Generator().manual_seed(9))
    idx = torch.randperm(7, generator=torch.Generator().manual_seed(9))[:3]  # ceil(0.4 * 7) = 3 codes
    assert rel_err(value, isofast.distortion(dec, z[idx], eta=None, estimator="exact")) < RTOL[F64]
    (grad,) = torch.autograd.grad(value, z)
    unused = torch.ones(7, dtype=torch.bool)
    unused[idx] = False
    assert grad[unused].abs().max() == 0 and grad[idx].abs().max() > 0


@pytest.mark.parametrize("kwargs, match", [
    ({"every": 0}, "every must be an int >= 1, got 0"),
    ({"every": 2.0}, "every must be an int >= 1, got 2.0"),
    ({"subsample": 0.0}, r"subsample must be a fraction in \(0, 1\], got 0.0"),
    ({"subsample": 1.5}, r"subsample must be a fraction in \(0, 1\], got 1.5"),
])
def test_arguments_are_checked(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        isofast.IsometricRegularizer(**kwargs)


def test_isofast_train_options(tmp_path) -> None:  # type: ignore[no-untyped-def]
    pytest.importorskip("sklearn")
    from isofast.cli import main as cli_main
    from isofast.training.loop import TrainConfig, train

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rc = cli_main(["train", "--threads", "0", "--dataset", "digits", "--digits", "0,1", "--epochs", "1",
                       "--hidden", "8", "--reg-every", "4", "--reg-subsample", "0.5", "--no-progress",
                       "--out", str(tmp_path / "run")])
        assert rc == 0
        import json

        config = json.load(open(tmp_path / "run" / "config.json"))
        assert config["reg_every"] == 4 and config["reg_subsample"] == 0.5
        with pytest.raises(ValueError, match="--reg-every must be an integer >= 1, got 0"):
            train(TrainConfig(out=str(tmp_path / "x"), digits="0", hidden=[8], epochs=1, reg_every=0, progress=False))
    finally:
        torch.set_num_threads(before)
