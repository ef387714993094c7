"""Atomic checkpoints (write a temporary file, then rename) and the RNG state they carry."""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import torch

CHECKPOINT = "checkpoint.pt"


def rng_state() -> dict:
    """Every global RNG a training step could touch (user models' dropout, numpy, random)."""
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": None}
    state["python"] = random.getstate()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: str | os.PathLike, state: dict) -> Path:
    """Write ``state`` with torch.save to a temporary file beside ``path``, then rename it over
    ``path`` (os.replace is atomic): an interrupted write leaves the previous checkpoint intact."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def load_checkpoint(path: str | os.PathLike) -> dict:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint at {path}; run without --resume first")
    # RNG states hold numpy arrays and tuples: not loadable with weights_only=True.
    return torch.load(path, map_location="cpu", weights_only=False)
