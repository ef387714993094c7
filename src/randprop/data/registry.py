"""Dataset registry, train / validation / test splits and the on-disk cache.

``load_dataset(name)`` returns :class:`Splits` of ``TensorDataset(x float32, y int64)``. The
validation split is a seeded random fraction of the training set (contiguous for text); the test
split is the dataset's official one (or a fixed held-out fraction where there is none).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import TensorDataset

from randprop.random import derive_seed, generator

#: salt mixed into the run seed for the validation split (independent of other seeded streams)
_SPLIT_SALT = 0x5B117


@dataclasses.dataclass
class Splits:
    """Train / validation / test datasets of one named dataset.

    input_shape: shape of one example x; num_classes: number of target classes.
    vocab: the characters of a text dataset, id i being vocab[i] (None otherwise).
    """

    name: str
    train: TensorDataset
    val: TensorDataset
    test: TensorDataset
    num_classes: int
    input_shape: tuple[int, ...]
    vocab: str | None = None


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    """A named dataset: ``load(root, seed, val_fraction, **options) -> Splits``."""

    name: str
    load: Callable[..., Splits]
    description: str


DATASETS: dict[str, DatasetSpec] = {}


def register_dataset(name: str, description: str) -> Callable[[Callable], Callable]:
    """Decorator registering a dataset loader under ``name``."""

    def register(fn: Callable[..., Splits]) -> Callable[..., Splits]:
        DATASETS[name] = DatasetSpec(name, fn, description)
        return fn

    return register


def load_dataset(
    name: str,
    *,
    root: str | os.PathLike | None = None,
    seed: int = 0,
    val_fraction: float = 0.1,
    **options,
) -> Splits:
    """Load the named dataset, offline, as normalised train / val / test splits.

    root: a directory holding the files for datasets read from the user's disk (cifar10).
    seed: seeds the choice of the validation examples. val_fraction: in [0, 1).
    options: dataset-specific settings (shakespeare: seq_len).
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose from {', '.join(sorted(DATASETS))}")
    ok = isinstance(val_fraction, (int, float)) and not isinstance(val_fraction, bool)
    if not (ok and 0 <= val_fraction < 1):
        raise ValueError(f"val_fraction must be a number in [0, 1); got {val_fraction!r}")
    return DATASETS[name].load(root=root, seed=seed, val_fraction=float(val_fraction), **options)


def cache_dir() -> Path:
    """Where parsed datasets are cached: $RANDPROP_CACHE, else ~/.cache/randprop."""
    return Path(os.environ.get("RANDPROP_CACHE") or Path.home() / ".cache" / "randprop")


def cached_arrays(name: str, build: Callable[[], dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Arrays from ``cache_dir()/name.npz``, built once by ``build()`` and written atomically."""
    path = cache_dir() / f"{name}.npz"
    if path.exists():
        try:
            with np.load(path) as data:
                return {k: data[k] for k in data.files}
        except (OSError, ValueError, EOFError):  # a damaged cache is rebuilt
            pass
    arrays = build()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, path)
    except OSError:  # a read-only home still works, just without the cache
        pass
    return arrays


def val_split(n: int, val_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded split of range(n) into (train indices, validation indices), each sorted."""
    n_val = int(round(n * val_fraction))
    perm = torch.randperm(n, generator=generator(derive_seed(seed, _SPLIT_SALT)))
    return perm[n_val:].sort().values, perm[:n_val].sort().values


def tensors(x: np.ndarray | torch.Tensor, y: np.ndarray | torch.Tensor) -> TensorDataset:
    """TensorDataset of (float32 or int64 x, int64 y)."""
    x = torch.as_tensor(x)
    x = x.long() if x.dtype in (torch.int64, torch.int32) else x.float()
    return TensorDataset(x, torch.as_tensor(y).long())


def image_splits(
    name: str,
    x_train: torch.Tensor,
    y_train: torch.Tensor,
    x_test: torch.Tensor,
    y_test: torch.Tensor,
    seed: int,
    val_fraction: float,
    num_classes: int,
    mean: torch.Tensor | float | None = None,
    std: torch.Tensor | float | None = None,
) -> Splits:
    """Split off validation and normalise x -> (x - mean) / std.

    Without given statistics, mean and std are per channel (dim 1) over the training part.
    """
    train_idx, val_idx = val_split(len(x_train), val_fraction, seed)
    x_tr = x_train[train_idx]
    if mean is None or std is None:
        dims = [d for d in range(x_tr.dim()) if d != 1]
        mean = x_tr.mean(dim=dims, keepdim=True)[0]
        std = x_tr.std(dim=dims, keepdim=True)[0].clamp_min(1e-6)

    def norm(x: torch.Tensor) -> torch.Tensor:
        return ((x - mean) / std).float()

    return Splits(
        name=name,
        train=tensors(norm(x_tr), y_train[train_idx]),
        val=tensors(norm(x_train[val_idx]), y_train[val_idx]),
        test=tensors(norm(x_test), y_test),
        num_classes=num_classes,
        input_shape=tuple(x_train.shape[1:]),
    )
