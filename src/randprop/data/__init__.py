"""Offline datasets by name: ``load_dataset(name, root=None, seed=0, val_fraction=0.1)``.

``DATASETS`` maps each name to a spec with a ``description``; ``randprop list`` shows them.
"""

from randprop.data import sources  # noqa: F401 (registers the datasets)
from randprop.data.registry import DATASETS, DatasetSpec, Splits, cache_dir, load_dataset

__all__ = ["DATASETS", "DatasetSpec", "Splits", "cache_dir", "load_dataset"]
