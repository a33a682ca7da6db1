"""The reference training loop: data, models, steps, resume, CLI outputs, geodesic fidelity."""

from __future__ import annotations

import csv
import gzip
import json
import os

import numpy as np
import pytest
import torch

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")
pytest.importorskip("tqdm")

from isofast.cli import main as cli_main  # noqa: E402
from isofast.training import data as D  # noqa: E402
from isofast.training.loop import TrainConfig, train, train_step  # noqa: E402
from isofast.training.models import ConvDecoder, build_model  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models: one intra-op thread is as fast and cannot oversubscribe a busy machine. Restored
    afterwards; the CLI calls below pass ``--threads 0`` so they leave the count alone."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TINY = [16, 16]  # tiny hidden widths: the loop's logic does not depend on the width


def _tiny_config(out: str, **kw: object) -> TrainConfig:
    base = dict(out=str(out), dataset="digits", digits="0,1", model="irvae", hidden=TINY, epochs=2,
                progress=False, eval_points=200)
    base.update(kw)
    return TrainConfig(**base)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- data


@pytest.mark.parametrize("suffix", ["", ".gz"])
@pytest.mark.parametrize("dtype", [np.uint8, np.int32, np.float32])
def test_idx_roundtrip(tmp_path, suffix, dtype):
    a = (np.arange(2 * 3 * 5) * 7 % 251).reshape(2, 3, 5).astype(dtype)
    path = tmp_path / f"a-idx3{suffix}"
    D.write_idx(path, a)
    b = D.read_idx(path)
    assert b.shape == a.shape and b.dtype.kind == np.dtype(dtype).kind
    np.testing.assert_array_equal(a, b)


def test_idx_reader_matches_the_spec_byte_for_byte(tmp_path):
    # Hand-written header (not via write_idx): magic 0x00000801, 3 labels.
    path = tmp_path / "labels"
    path.write_bytes(bytes([0, 0, 8, 1, 0, 0, 0, 3, 7, 1, 9]))
    np.testing.assert_array_equal(D.read_idx(path), [7, 1, 9])
    path.write_bytes(b"PK\x03\x04junk")
    with pytest.raises(ValueError, match="not an IDX"):
        D.read_idx(path)
    path.write_bytes(bytes([0, 0, 8, 1, 0, 0, 0, 9, 1]))
    with pytest.raises(ValueError, match="truncated"):
        D.read_idx(path)


def _write_fake_mnist(folder, n_train=28, n_test=14, gz=False):
    rng = np.random.default_rng(0)
    labels = {"train": np.arange(n_train) % 10, "test": (np.arange(n_test) + 3) % 10}
    images = {}
    for part, n in (("train", n_train), ("test", n_test)):
        img = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        img[:, 0, 0] = labels[part]  # tag each image with its label, to check pairing
        img[:, 0, 1] = 0 if part == "train" else 255  # and with its origin, to check order
        images[part] = img
    sfx = ".gz" if gz else ""
    D.write_idx(folder / f"train-images-idx3-ubyte{sfx}", images["train"])
    D.write_idx(folder / f"train-labels-idx1-ubyte{sfx}", labels["train"].astype(np.uint8))
    D.write_idx(folder / f"t10k-images-idx3-ubyte{sfx}", images["test"])
    D.write_idx(folder / f"t10k-labels-idx1-ubyte{sfx}", labels["test"].astype(np.uint8))
    return labels


@pytest.mark.parametrize("gz", [False, True])
def test_mnist_loader_concatenates_filters_and_splits_in_order(tmp_path, gz):
    labels = _write_fake_mnist(tmp_path, gz=gz)
    x, y = D.load_idx_dataset(str(tmp_path), "mnist")
    assert x.shape == (42, 784) and x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1
    np.testing.assert_array_equal(y.numpy(), np.concatenate([labels["train"], labels["test"]]))
    assert torch.allclose(x[:, 0] * 255, y.float())  # images stay paired with their labels
    assert (x[:28, 1] == 0).all() and (x[28:, 1] == 1).all()  # official train set first

    bundle = D.load_dataset("mnist", data_dir=str(tmp_path), digits="0,1,5")
    keep = np.isin(y.numpy(), [0, 1, 5])
    n = int(keep.sum())
    sizes = D.split_sizes(n)
    assert (len(bundle.train), len(bundle.val), len(bundle.test)) == sizes
    got = torch.cat([bundle.train.y, bundle.val.y, bundle.test.y]).numpy()
    np.testing.assert_array_equal(got, y.numpy()[keep])  # filtered, order preserved, no shuffle
    assert bundle.image_shape == (1, 28, 28)


def test_mnist_loader_reads_torchvision_layout(tmp_path):
    raw = tmp_path / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    _write_fake_mnist(raw)
    x, _ = D.load_idx_dataset(str(tmp_path), "fmnist")
    assert x.shape[0] == 42


def test_missing_files_message_names_files_and_folder(tmp_path):
    _write_fake_mnist(tmp_path)
    os.remove(tmp_path / "t10k-labels-idx1-ubyte")
    with pytest.raises(FileNotFoundError) as err:
        D.load_dataset("mnist", data_dir=str(tmp_path))
    msg = str(err.value)
    assert "t10k-labels-idx1-ubyte" in msg and str(tmp_path) in msg
    assert msg.split("missing:")[1].split("(")[0].strip() == "t10k-labels-idx1-ubyte"
    with pytest.raises(FileNotFoundError, match="--data-dir"):
        D.load_dataset("mnist", data_dir=None)


def test_missing_files_cli_message(tmp_path, capsys):
    rc = cli_main(["train", "--threads", "0", "--dataset", "mnist", "--data-dir", str(tmp_path), "--out", str(tmp_path / "o")])
    assert rc == 2
    err = capsys.readouterr().err
    assert "train-images-idx3-ubyte" in err and str(tmp_path) in err


@pytest.mark.parametrize("n,expected", [(70, (50, 10, 10)), (1797, (1283, 256, 258)), (6, (4, 0, 2))])
def test_split_proportions(n, expected):
    assert D.split_sizes(n) == expected
    x = torch.arange(n, dtype=torch.float32)[:, None]
    tr, va, te = D.split_in_order(x, torch.arange(n))
    assert (len(tr), len(va), len(te)) == expected
    assert torch.equal(torch.cat([tr.x, va.x, te.x]), x)


def test_digits_dataset_and_filtering():
    full = D.load_dataset("digits")
    assert full.data_dim == 64 and full.image_shape == (1, 8, 8)
    assert len(full.train) + len(full.val) + len(full.test) == 1797
    assert 0.0 <= float(full.train.x.min()) and float(full.train.x.max()) == 1.0
    sub = D.load_dataset("digits", digits="5,0,1")
    ys = torch.cat([sub.train.y, sub.val.y, sub.test.y])
    assert set(ys.tolist()) == {0, 1, 5}
    assert len(ys) == int(np.isin(np.asarray(full.train.y.tolist() + full.val.y.tolist() + full.test.y.tolist()), [0, 1, 5]).sum())
    assert D.parse_digits("all") is None and D.parse_digits("1, 0") == [0, 1]
    with pytest.raises(ValueError):
        D.parse_digits("1,12")


def test_geodesic_fidelity_is_one_on_exact_isometric_embeddings():
    _, _, coords = D.make_swissroll(400, seed=1)
    assert D.geodesic_fidelity(coords, D.swissroll_geodesic(coords)) == pytest.approx(1.0, abs=1e-9)
    # A rigid motion plus scale is still isometric up to scale.
    rot = torch.tensor([[0.6, -0.8], [0.8, 0.6]], dtype=torch.float64)
    assert D.geodesic_fidelity(3 * coords @ rot + 1, D.swissroll_geodesic(coords)) == pytest.approx(1.0, abs=1e-9)
    # The raw 3-D roll is not: points across a fold are close in R^3 but far along the roll.
    x, _, _ = D.make_swissroll(400, seed=1)
    assert D.geodesic_fidelity(x, D.swissroll_geodesic(coords)) < 0.9
    # Sphere cap: chord length is monotone in great-circle distance, so the embedding scores 1.
    xs, _, cs = D.make_spherecap(300, seed=2)
    assert np.allclose(xs.norm(dim=1).numpy(), 1, atol=1e-6)
    assert D.geodesic_fidelity(xs, D.spherecap_geodesic(cs)) == pytest.approx(1.0, abs=1e-6)
    assert abs(D.geodesic_fidelity(torch.randn(300, 2), D.spherecap_geodesic(cs))) < 0.2


def test_synthetic_bundles():
    for name in ("swissroll", "spherecap"):
        b = D.load_dataset(name, n_samples=700, seed=0)
        assert b.image_shape is None and b.data_dim == 3 and b.geodesic is not None
        assert b.test.coords is not None and b.test.coords.shape == (len(b.test), 2)


# ----------------------------------------------------------------------------- models


@pytest.mark.parametrize("kind", ["ae", "vae", "irae", "irvae"])
def test_model_shapes_and_official_architecture(kind):
    m = build_model(kind, 64, 3, image_shape=(1, 8, 8), iso_weight=1.0)
    x = torch.rand(5, 64)
    assert m.encode(x).shape == (5, 3)
    assert m.encoder(x).shape == (5, 6 if kind in ("vae", "irvae") else 3)
    assert m.decoder(torch.randn(5, 3)).shape == (5, 64)
    # The decoder is a plain Sequential of Linear / activations (isofast's fused MLP path).
    assert type(m.decoder) is torch.nn.Sequential
    linears = [l for l in m.decoder if isinstance(l, torch.nn.Linear)]
    assert [l.out_features for l in linears] == [256, 256, 256, 256, 64]
    assert isinstance(m.decoder[-1], torch.nn.Sigmoid)
    assert all(isinstance(l, (torch.nn.Linear, torch.nn.ReLU, torch.nn.Sigmoid)) for l in m.decoder)
    assert hasattr(m, "log_sigma") == (kind in ("vae", "irvae"))
    parts = m(x)
    assert set(parts) == {"loss", "recon", "kl", "reg"} and all(v.dim() == 0 for v in parts.values())
    assert (float(parts["reg"].detach()) > 0) == (kind in ("irae", "irvae"))


def test_vector_and_conv_decoders():
    m = build_model("irvae", 3, 2, hidden=TINY, iso_weight=1.0)
    assert not isinstance(m.decoder[-1], torch.nn.Sigmoid)  # vector data: linear output
    c = build_model("irvae", 64, 2, hidden=TINY, decoder="conv", image_shape=(1, 8, 8), iso_weight=1.0)
    assert isinstance(c.decoder, ConvDecoder)
    assert c.decoder(torch.randn(4, 2)).shape == (4, 64)
    assert torch.isfinite(c(torch.rand(4, 64))["loss"])
    with pytest.raises(ValueError):
        build_model("vae", 3, 2, decoder="conv")


def _steps(kind, n=8, seed=0):
    torch.manual_seed(seed)
    m = build_model(kind, 64, 2, hidden=[32, 32], image_shape=(1, 8, 8), iso_weight=10.0)
    opt = torch.optim.Adam(m.parameters(), lr=1e-3)
    x = D.load_dataset("digits", digits="0,1").train.x[:100]
    torch.manual_seed(seed + 1)
    losses = [float(train_step(m, x, opt)["loss"]) for _ in range(n)]
    return m, losses


@pytest.mark.parametrize("kind", ["ae", "irvae"])
def test_training_steps_reduce_loss_and_are_deterministic(kind):
    m1, l1 = _steps(kind)
    m2, l2 = _steps(kind)
    assert l1[-1] < l1[0]
    assert l1 == l2
    for p, q in zip(m1.parameters(), m2.parameters()):
        assert torch.equal(p, q)
    _, l3 = _steps(kind, seed=1)
    assert l3 != l1


def test_regulariser_pulls_distortion_down():
    torch.manual_seed(0)
    m = build_model("irae", 64, 2, hidden=[32, 32], image_shape=(1, 8, 8), iso_weight=1.0, eta=None)
    x = D.load_dataset("digits", digits="0,1").train.x[:100]
    opt = torch.optim.Adam(m.parameters(), lr=1e-3)
    first = float(train_step(m, x, opt)["reg"])
    for _ in range(30):
        last = float(train_step(m, x, opt)["reg"])
    assert last < first


# ----------------------------------------------------------------------------- loop, resume, CLI


def test_resume_continues_exactly(tmp_path):
    straight = train(_tiny_config(tmp_path / "a", epochs=4))
    train(_tiny_config(tmp_path / "b", epochs=2))
    resumed = train(_tiny_config(tmp_path / "b", epochs=4, resume=True))
    assert [r["epoch"] for r in resumed["history"]] == [1, 2, 3, 4]
    # Same RNG streams (torch, numpy, python, data order) => the same run, to the bit.
    for a, b in zip(straight["history"], resumed["history"]):
        for k in ("loss", "recon", "kl", "reg", "val_mse", "val_mcn"):
            assert a[k] == b[k], k
    assert straight["mse"] == resumed["mse"] and straight["mcn"] == resumed["mcn"]
    with open(tmp_path / "b" / "log.csv") as f:
        assert len(list(csv.DictReader(f))) == 4


def test_resume_10_plus_10_gives_20_epochs(tmp_path):
    train(_tiny_config(tmp_path, epochs=10, digits="0", hidden=[8]))
    m = train(_tiny_config(tmp_path, epochs=20, digits="0", hidden=[8], resume=True))
    assert len(m["history"]) == 20 and m["history"][-1]["epoch"] == 20
    assert json.load(open(tmp_path / "metrics.json"))["epochs"] == 20


def test_resume_refuses_a_different_model(tmp_path):
    train(_tiny_config(tmp_path, epochs=1))
    with pytest.raises(ValueError, match="latent_dim"):
        train(_tiny_config(tmp_path, epochs=2, latent_dim=3, resume=True))


def test_checkpoint_is_loadable_with_weights_only(tmp_path):
    train(_tiny_config(tmp_path, epochs=1))
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert ckpt["epoch"] == 1 and set(ckpt["rng"][0]) >= {"torch", "numpy", "python", "generator"}
    assert not [p for p in os.listdir(tmp_path) if ".tmp" in p]  # the atomic write left no temp file


def test_checkpoint_every_n_epochs_and_always_the_last(tmp_path, monkeypatch):
    import isofast.training.loop as loop

    saved_epochs: list[int] = []
    real_save = loop.save_checkpoint
    monkeypatch.setattr(loop, "save_checkpoint", lambda obj, path: (saved_epochs.append(obj["epoch"]), real_save(obj, path)))
    train(_tiny_config(tmp_path, epochs=5, checkpoint_every=2))
    assert saved_epochs == [2, 4, 5]
    with pytest.raises(ValueError, match="checkpoint-every"):
        train(_tiny_config(tmp_path / "x", epochs=1, checkpoint_every=0))


def test_cli_train_writes_every_output(tmp_path, capsys):
    out = tmp_path / "run"
    rc = cli_main(["train", "--threads", "0", "--dataset", "digits", "--digits", "0,1,5", "--model", "irvae", "--latent-dim", "2",
                   "--epochs", "2", "--iso-weight", "100", "--measure", "scaled_isometry", "--seed", "3",
                   "--hidden", "32,32", "--no-progress", "--out", str(out)])
    assert rc == 0
    assert "mcn" in capsys.readouterr().out
    assert {"config.json", "metrics.json", "checkpoint.pt", "latent.png", "log.csv"} <= set(os.listdir(out))
    config = json.load(open(out / "config.json"))
    assert config["seed"] == 3 and config["iso_weight"] == 100 and config["lr"] == 1e-3 and config["hidden"] == [32, 32]
    metrics = json.load(open(out / "metrics.json"))
    assert {"mse", "mcn", "vor", "history"} <= set(metrics)
    assert metrics["mcn"] >= 1 and metrics["vor"] >= 0 and 0 < metrics["mse"] < 1
    assert len(metrics["history"]) == 2
    assert {"epoch", "loss", "reg", "reg_share", "val_mse", "val_mcn", "val_vor"} <= set(metrics["history"][0])
    assert (out / "latent.png").read_bytes()[:8] == PNG_MAGIC
    with open(out / "log.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["epoch"]) for r in rows] == [1, 2]


def test_cli_train_synthetic_reports_geodesic_fidelity(tmp_path):
    out = tmp_path / "roll"
    assert cli_main(["train", "--threads", "0", "--dataset", "swissroll", "--model", "irae", "--epochs", "1", "--n-samples", "300",
                     "--hidden", "16", "--latent-dim", "3", "--no-progress", "--out", str(out)]) == 0
    metrics = json.load(open(out / "metrics.json"))
    assert -1 <= metrics["geodesic_fidelity"] <= 1
    assert not (out / "latent.png").exists()  # latent dim 3: no latent plot


def test_cli_compare_tiny(tmp_path, capsys):
    out = tmp_path / "cmp"
    assert cli_main(["compare", "--threads", "0", "--digits", "0,1", "--epochs", "1", "--hidden", "16", "--no-progress",
                     "--out", str(out)]) == 0
    table = json.load(open(out / "compare.json"))
    assert set(table["models"]) == {"vae", "irvae"}
    assert {"mse", "mcn", "vor"} <= set(table["models"]["irvae"])
    assert (out / "compare.png").read_bytes()[:8] == PNG_MAGIC
    assert "IRVAE" in capsys.readouterr().out


def test_tensorboard_flag_without_tensorboard_is_explained(tmp_path, capsys):
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        train(_tiny_config(tmp_path, epochs=1, tensorboard=True))
        assert "tensorboard" in capsys.readouterr().err
    else:
        train(_tiny_config(tmp_path, epochs=1, tensorboard=True))
        assert (tmp_path / "tensorboard").is_dir()


def test_gzip_is_really_gzip(tmp_path):
    D.write_idx(tmp_path / "x.gz", np.zeros((2, 2), np.uint8))
    with gzip.open(tmp_path / "x.gz", "rb") as f:
        assert f.read(4) == bytes([0, 0, 8, 2])


@pytest.mark.slow
def test_compare_acceptance_on_bundled_digits(tmp_path):
    """The README's main job: 30 epochs, latent dim 2, same seed (about a minute on 2 cores)."""
    out = tmp_path / "cmp"
    assert cli_main(["compare", "--threads", "0", "--no-progress", "--out", str(out)]) == 0
    rows = json.load(open(out / "compare.json"))["models"]
    vae, irvae = rows["vae"], rows["irvae"]
    assert irvae["mcn"] < 3 and vae["mcn"] >= 5 * irvae["mcn"]
    assert irvae["vor"] < vae["vor"]
    assert irvae["mse"] <= 1.5 * vae["mse"]
    assert (out / "compare.png").read_bytes()[:8] == PNG_MAGIC
