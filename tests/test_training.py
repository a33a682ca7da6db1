"""The reference training loop: data, models, steps, resume, CLI outputs, geodesic fidelity."""

from __future__ import annotations

import copy
import csv
import gzip
import json
import math
import os

import numpy as np
import pytest
import torch

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")
pytest.importorskip("tqdm")

import isofast  # noqa: E402
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
    assert {"epoch", "loss", "reg", "reg_share", "val_mse", "val_mcn", "val_vor", "epoch_cpu_s"} <= set(metrics["history"][0])
    assert metrics["train_cpu_s"] == pytest.approx(sum(r["epoch_cpu_s"] for r in metrics["history"]))
    assert metrics["train_cpu_s"] > 0
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
    assert {"mse", "mcn", "vor", "train_cpu_s"} <= set(table["models"]["irvae"])
    assert (out / "compare.png").read_bytes()[:8] == PNG_MAGIC
    printed = capsys.readouterr().out
    assert "IRVAE" in printed and "CPU (s)" in printed


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


# ----------------------------------------------------------------------------- resume: what it honours


def _config_json(folder) -> dict:
    return json.load(open(folder / "config.json"))


def test_resume_applies_a_new_lr_and_records_it(tmp_path, capsys):
    train(_tiny_config(tmp_path, epochs=2))
    m = train(_tiny_config(tmp_path, epochs=4, lr=0.5, resume=True))
    assert [r["lr"] for r in m["history"]] == [1e-3, 1e-3, 0.5, 0.5]  # the rate the optimizer used
    config = _config_json(tmp_path)
    assert config["lr"] == 0.5 and config["resumes"] == [{"from_epoch": 2, "changed": {"lr": [1e-3, 0.5]}}]
    assert "lr 0.001 -> 0.5" in capsys.readouterr().err


def test_resume_without_options_keeps_the_checkpoints_values(tmp_path):
    # lr / iso_weight / init_sigma left unset on the resume mean "the checkpoint's", not the defaults.
    train(_tiny_config(tmp_path, epochs=1, lr=0.01, iso_weight=3.0, init_sigma=0.5))
    m = train(_tiny_config(tmp_path, epochs=2, resume=True))
    assert [r["lr"] for r in m["history"]] == [0.01, 0.01]
    config = _config_json(tmp_path)
    assert (config["lr"], config["iso_weight"], config["init_sigma"]) == (0.01, 3.0, 0.5)
    assert config["resumes"] == [{"from_epoch": 1, "changed": {}}]


@pytest.mark.parametrize("option,value", [
    ("seed", 1), ("iso_weight", 7.0), ("eta", None), ("batch_size", 50), ("init_sigma", 0.3),
    ("estimator", "hutchinson"), ("n_probes", 2), ("eval_points", 100), ("select_every", 7),
])
def test_resume_refuses_options_it_cannot_honour(tmp_path, option, value):
    train(_tiny_config(tmp_path, epochs=1))
    before = (tmp_path / "config.json").read_bytes()
    with pytest.raises(ValueError, match=rf"--resume: .*checkpoint.pt was trained with other options \({option}: "):
        train(_tiny_config(tmp_path, epochs=2, resume=True, **{option: value}))
    assert (tmp_path / "config.json").read_bytes() == before  # nothing recorded for a refused run


def test_resume_refuses_a_new_seed_of_a_synthetic_dataset(tmp_path):
    # The seed draws the synthetic sample: resuming with another would train on other data.
    kw = dict(dataset="swissroll", digits=None, model="irae", n_samples=70, batch_size=10)
    train(_tiny_config(tmp_path, epochs=1, **kw))
    with pytest.raises(ValueError, match=r"seed: 0 -> 5"):
        train(_tiny_config(tmp_path, epochs=2, seed=5, resume=True, **kw))


def test_resume_refuses_fewer_epochs_than_trained(tmp_path):
    train(_tiny_config(tmp_path, epochs=3))
    with pytest.raises(ValueError, match=r"--epochs 2 is below the 3 epochs"):
        train(_tiny_config(tmp_path, epochs=2, resume=True))


# ----------------------------------------------------------------------------- options refused up front


def _cli_error(capsys, argv: list[str]) -> str:
    """Run ``isofast train`` expecting a refusal: non-zero exit and exactly one line on stderr."""
    capsys.readouterr()
    rc = cli_main(["train", "--threads", "0", "--digits", "0,1", "--hidden", "8", "--epochs", "1",
                   "--no-progress", *argv])
    err = capsys.readouterr().err.strip()
    assert rc != 0 and err.startswith("isofast train: ") and "\n" not in err, err
    return err


@pytest.mark.parametrize("argv,needle", [
    (["--epochs", "-1"], "--epochs must be an integer >= 1, got -1"),
    (["--epochs", "0"], "--epochs must be an integer >= 1, got 0"),
    (["--latent-dim", "-2"], "--latent-dim must be an integer >= 1, got -2"),
    (["--hidden", "0"], "--hidden must be comma-separated widths >= 1"),
    (["--hidden", "16,x"], "--hidden must be comma-separated widths >= 1"),
    (["--device", "bogus"], "--device must be auto, cpu, cuda or cuda:N, got 'bogus'"),
    (["--batch-size", "0"], "--batch-size must be an integer >= 1, got 0"),
    (["--lr", "nan"], "--lr must be a finite number > 0, got nan"),
])
def test_cli_refuses_bad_options_in_one_line(tmp_path, capsys, argv, needle):
    out = tmp_path / "run"
    err = _cli_error(capsys, [*argv, "--out", str(out)])  # later options win: argv overrides the base
    assert needle in err
    assert not out.exists()  # refused before anything was written


def test_cli_refuses_cuda_on_a_torch_without_it(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    err = _cli_error(capsys, ["--device", "cuda", "--out", str(tmp_path / "run")])
    assert "--device cuda: " in err and "use --device cpu" in err


def test_cli_refuses_an_out_that_is_a_file(tmp_path, capsys):
    target = tmp_path / "file"
    target.write_text("x")
    assert "is a file, not a folder" in _cli_error(capsys, ["--out", str(target)])
    assert "cannot create the folder" in _cli_error(capsys, ["--out", str(target / "sub")])
    assert target.read_text() == "x"


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root may write to any folder")
def test_cli_refuses_a_read_only_out(tmp_path, capsys):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        assert "is not writable" in _cli_error(capsys, ["--out", str(folder)])
    finally:
        folder.chmod(0o755)


def test_cli_refuses_an_out_without_write_permission(tmp_path, capsys, monkeypatch):
    # The same refusal where permissions cannot be taken away (running as root): os.access says no.
    folder = tmp_path / "denied"
    folder.mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if str(p) == str(folder) else real_access(p, mode, **kw))
    assert "is not writable" in _cli_error(capsys, ["--out", str(folder)])
    assert os.listdir(folder) == []


# ----------------------------------------------------------------------------- checkpoints


def _damage(path, how: str) -> None:
    raw = bytearray(path.read_bytes())
    if how == "truncated":
        raw = raw[: len(raw) // 2]
    elif how == "empty":
        raw = bytearray()
    elif how == "random":
        raw = bytearray(np.random.default_rng(0).integers(0, 256, len(raw), dtype=np.uint8).tobytes())
    elif how == "flipped":
        # One bit of the first encoder weight: the file still unpickles, to different weights.
        weight = torch.load(path, weights_only=True)["model"]["encoder.0.weight"]
        at = bytes(raw).find(weight.numpy().tobytes()[:64])
        assert at > 0
        raw[at + 5] ^= 0x10
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize("how", ["truncated", "empty", "random", "flipped"])
def test_damaged_checkpoint_is_refused_and_kept(tmp_path, capsys, how):
    from isofast.training.checkpoint import CheckpointError

    train(_tiny_config(tmp_path, epochs=1))
    ckpt = tmp_path / "checkpoint.pt"
    _damage(ckpt, how)
    damaged = ckpt.read_bytes()
    with pytest.raises(CheckpointError, match=r"checkpoint .*checkpoint.pt is damaged .*restore a good copy"):
        train(_tiny_config(tmp_path, epochs=2, resume=True))
    rc = cli_main(["train", "--threads", "0", "--digits", "0,1", "--hidden", "16", "--epochs", "2", "--no-progress",
                   "--resume", "--out", str(tmp_path)])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and str(ckpt) in err and "\n" not in err
    assert ckpt.read_bytes() == damaged  # the evidence is left alone


def test_checkpoint_without_a_checksum_is_refused(tmp_path):
    from isofast.training.checkpoint import CheckpointError, load_checkpoint

    train(_tiny_config(tmp_path, epochs=1))
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    del state["sha256"]
    torch.save(state, tmp_path / "checkpoint.pt")
    with pytest.raises(CheckpointError, match="no stored checksum"):
        load_checkpoint(str(tmp_path / "checkpoint.pt"))


@pytest.mark.parametrize("failure", ["raises", "writes garbage"])
def test_a_failed_checkpoint_write_keeps_the_last_good_one(tmp_path, monkeypatch, failure):
    import isofast.training.checkpoint as C

    train(_tiny_config(tmp_path, epochs=2))
    good = (tmp_path / "checkpoint.pt").read_bytes()
    real_save = torch.save

    def broken_save(obj, path):
        if failure == "raises":
            raise OSError(28, "No space left on device")
        real_save(obj, path)
        with open(path, "r+b") as f:  # a short write: half the file
            f.truncate(os.path.getsize(path) // 2)

    monkeypatch.setattr(C.torch, "save", broken_save)
    with pytest.raises((OSError, C.CheckpointError), match="No space left|did not verify"):
        train(_tiny_config(tmp_path, epochs=3, resume=True))
    monkeypatch.undo()
    assert (tmp_path / "checkpoint.pt").read_bytes() == good
    assert not [p for p in os.listdir(tmp_path) if ".tmp" in p]
    assert C.load_checkpoint(str(tmp_path / "checkpoint.pt"))["epoch"] == 2


# ----------------------------------------------------------------------------- MNIST naming, model selection


@pytest.mark.parametrize("gz", [False, True])
def test_mnist_loader_reads_the_dotted_names(tmp_path, gz):
    _write_fake_mnist(tmp_path, gz=gz)
    for p in list(tmp_path.iterdir()):
        p.rename(tmp_path / p.name.replace("-idx", ".idx"))  # train-images.idx3-ubyte[.gz]
    x, y = D.load_idx_dataset(str(tmp_path), "mnist")
    assert x.shape == (42, 784) and torch.allclose(x[:, 0] * 255, y.float())


def test_missing_files_message_says_what_it_looked_for(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        D.load_idx_dataset(str(tmp_path), "mnist")
    msg = str(err.value)
    for name in ("train-images-idx3-ubyte", "train-images-idx3-ubyte.gz", "train-images.idx3-ubyte",
                 "train-images.idx3-ubyte.gz", "t10k-labels.idx1-ubyte.gz"):
        assert name in msg
    assert "MNIST/raw" in msg


def test_model_selection_keeps_the_best_validation_mse(tmp_path):
    m = train(_tiny_config(tmp_path, epochs=3, select_every=1))
    sel = m["selected"]
    # Checked after every step, so after each epoch's last step too: never worse than an epoch's end.
    assert sel["val_mse"] <= min(r["val_mse"] for r in m["history"])
    assert 1 <= sel["epoch"] <= 3 and 1 <= sel["step"] and {"mse", "mcn", "vor"} <= set(sel)
    assert json.load(open(tmp_path / "metrics.json"))["selected"] == sel
    assert train(_tiny_config(tmp_path / "off", epochs=1, select_every=0))["selected"] is None


def test_model_selection_survives_a_resume(tmp_path):
    straight = train(_tiny_config(tmp_path / "a", epochs=4, select_every=5))["selected"]
    train(_tiny_config(tmp_path / "b", epochs=2, select_every=5))
    resumed = train(_tiny_config(tmp_path / "b", epochs=4, select_every=5, resume=True))["selected"]
    assert straight == resumed


def test_cli_compare_mnist_official_defaults_and_both_models(tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    _write_fake_mnist(data, n_train=140, n_test=70, gz=True)
    out = tmp_path / "cmp"
    assert cli_main(["compare", "--threads", "0", "--dataset", "mnist", "--data-dir", str(data), "--digits", "0,1",
                     "--epochs", "1", "--hidden", "16", "--select-every", "1", "--no-progress", "--out", str(out)]) == 0
    config = _config_json(out / "irvae")
    # The official IRVAE setting on MNIST (everything but the shortened run and tiny widths here).
    assert (config["lr"], config["batch_size"], config["iso_weight"], config["eta"], config["init_sigma"],
            config["latent_dim"], config["measure"]) == (1e-4, 100, 100.0, 0.2, 1.0, 2, "scaled_isometry")
    assert _config_json(out / "vae")["iso_weight"] == 0.0
    table = json.load(open(out / "compare.json"))
    assert set(table["selected"]) == {"vae", "irvae"} and table["selected"]["irvae"]["step"] >= 1
    assert "IRVAE@best" in capsys.readouterr().out


MNIST_DIR = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "mnist")


@pytest.mark.skipif(not os.path.isfile(os.path.join(MNIST_DIR, "train-images-idx3-ubyte.gz")),
                    reason="real MNIST not present at ../shared/data/mnist")
def test_real_mnist_01_split_and_a_short_compare(tmp_path):
    bundle = D.load_dataset("mnist", data_dir=MNIST_DIR, digits="0,1")
    assert (len(bundle.train), len(bundle.val), len(bundle.test)) == (10557, 2111, 2112)
    out = tmp_path / "cmp"
    assert cli_main(["compare", "--threads", "0", "--dataset", "mnist", "--data-dir", MNIST_DIR, "--digits", "0,1",
                     "--epochs", "1", "--hidden", "32", "--no-progress", "--out", str(out)]) == 0
    table = json.load(open(out / "compare.json"))
    assert table["selected"]["irvae"]["step"] == 100  # 106 steps in the epoch: one check, at step 100
    assert json.load(open(out / "irvae" / "metrics.json"))["n_test"] == 2112
    assert table["models"]["irvae"]["mcn"] < table["models"]["vae"]["mcn"]


# ----------------------------------------------------------------------------- regulariser weighting


def test_regularizer_recon_scale_multiplies_the_loss_detached():
    import isofast

    dec = build_model("irvae", 20, 2, hidden=[8]).decoder
    z = torch.randn(16, 2)
    reg = isofast.IsometricRegularizer(weight=3.0, eta=None)
    scale = torch.tensor(4.0, requires_grad=True)
    plain, scaled = reg(dec, z), reg(dec, z, recon_scale=scale)
    torch.testing.assert_close(scaled, 4.0 * plain)
    scaled.backward()
    assert scale.grad is None  # a weight, not something to optimise
    torch.testing.assert_close(reg(dec, z, recon_scale=2.5), 2.5 * plain)
    for bad in (0.0, -1.0, float("inf"), torch.ones(2), torch.tensor(2)):
        with pytest.raises(ValueError, match="recon_scale must be"):
            reg(dec, z, recon_scale=bad)


def test_recon_scale_weighting_is_official_at_start_and_grows_as_sigma_shrinks():
    torch.manual_seed(0)
    x = torch.rand(32, 64)
    const = build_model("irvae", 64, 2, hidden=[16], image_shape=(1, 8, 8), iso_weight=10.0, init_sigma=0.5)
    scaled = build_model("irvae", 64, 2, hidden=[16], image_shape=(1, 8, 8), iso_weight=10.0, init_sigma=0.5,
                         iso_weighting="recon_scale")
    scaled.load_state_dict(const.state_dict())

    def parts(model):
        torch.manual_seed(1)
        return model(x)

    a, b = parts(const), parts(scaled)
    torch.testing.assert_close(a["loss"], b["loss"])  # sigma = sigma0: the official objective
    with torch.no_grad():
        for m in (const, scaled):
            m.log_sigma.fill_(math.log(0.1))  # sigma fell 5-fold: the recon term's scale grew 25-fold
    a, b = parts(const), parts(scaled)
    base = a["recon"] + a["kl"]
    torch.testing.assert_close(b["loss"] - base, 25.0 * (a["loss"] - base), rtol=1e-5, atol=1e-6)
    for m, p in ((const, a), (scaled, b)):
        m.zero_grad()
        p["loss"].backward()
    torch.testing.assert_close(const.log_sigma.grad, scaled.log_sigma.grad)  # detached: sigma's gradient unchanged


def test_recon_scale_weighting_is_refused_for_autoencoders(tmp_path, capsys):
    err = _cli_error(capsys, ["--model", "irae", "--iso-weighting", "recon_scale", "--out", str(tmp_path / "r")])
    assert "--iso-weighting recon_scale must be used with a VAE model" in err
    m = train(_tiny_config(tmp_path / "ok", epochs=1, iso_weighting="recon_scale"))
    assert json.load(open(tmp_path / "ok" / "config.json"))["iso_weighting"] == "recon_scale"
    assert 0 < m["history"][0]["sigma"]


def test_resume_records_every_honoured_change(tmp_path):
    train(_tiny_config(tmp_path, epochs=1))
    train(_tiny_config(tmp_path, epochs=2, checkpoint_every=3, device="cpu", resume=True))
    assert _config_json(tmp_path)["resumes"] == [{"from_epoch": 1, "changed": {"device": ["auto", "cpu"],
                                                                              "checkpoint_every": [1, 3]}}]


def test_evaluate_builds_the_exact_metric_in_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Held-out MCN / VoR take the exact metric EVAL_CHUNK codes at a time (one call over the whole
    split would hold m tangent streams of every code at once), and agree with one call."""
    from isofast.training import loop

    model = build_model("irae", 64, 3, hidden=(16,), image_shape=(1, 8, 8), decoder="conv")
    split = D.Split(torch.rand(300, 64), torch.zeros(300, dtype=torch.int64))
    sizes: list[int] = []
    real = isofast.pullback_metric

    def spy(dec, z, **kw):  # type: ignore[no-untyped-def]
        sizes.append(z.shape[0])
        return real(dec, z, **kw)

    monkeypatch.setattr(isofast, "pullback_metric", spy)
    metrics, z, h = loop.evaluate(model, split, max_points=300)
    assert max(sizes) <= loop.EVAL_CHUNK and sum(sizes) == 300
    ref = real(copy.deepcopy(model.decoder).double(), z.double())
    assert torch.allclose(h, ref)
