"""Activation checkpointing per block, and the peak saved bytes of a checkpointed step.

:func:`install_checkpointing` wraps each block of a model (:mod:`randprop.blocks`) in
non-reentrant ``torch.utils.checkpoint``; while :func:`recording_blocks` runs, each call also
measures its inputs and its recomputation, from which :func:`checkpointed_peak` gives the step's
peak.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import types
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from randprop.blocks import BLOCK_LISTS, find_block_list, sequential_blocks
from randprop.measure.saved import track_saved


@dataclasses.dataclass
class BlockRecord:
    """One call of a checkpointed block: the bytes of its inputs (kept by the forward), the
    bytes its recomputation saves for backward, and the bytes the tracker of the whole step
    held when the call returned."""

    input_bytes: int
    recompute_bytes: int
    held_after: int


class _Checkpointed:
    """Calls ``fn`` through non-reentrant checkpointing. While recorded
    (:func:`recording_blocks`), each call appends its :class:`BlockRecord`."""

    def __init__(self, fn: Callable) -> None:
        self.fn = fn
        self.log: list[BlockRecord] | None = None
        self.tracker: track_saved | None = None

    def __call__(self, *args, **kwargs):
        if self.log is None or not torch.is_grad_enabled():
            return checkpoint(self.fn, *args, use_reentrant=False, **kwargs)
        detached = [a.detach().requires_grad_() if _float(a) else a for a in args]
        with track_saved(exclude=[a for a in detached if _float(a)]) as saved:  # in input_bytes
            self.fn(*detached, **kwargs)
        storages = {a.untyped_storage().data_ptr(): a.untyped_storage().nbytes() for a in args if _float(a)}  # fmt: skip
        out = checkpoint(self.fn, *args, use_reentrant=False, **kwargs)
        held = self.tracker.current if self.tracker is not None else 0
        self.log.append(BlockRecord(sum(storages.values()), saved.bytes, held))
        return out


@contextlib.contextmanager
def recording_blocks(
    units: Sequence[_Checkpointed], tracker: track_saved
) -> Iterator[list[BlockRecord]]:
    """Record every call of the checkpointed ``units`` (install_checkpointing's) while
    ``tracker`` (a track_saved of the whole step) runs; yields the list of records."""
    records: list[BlockRecord] = []
    for unit in units:
        unit.log, unit.tracker = records, tracker
    try:
        yield records
    finally:
        for unit in units:
            unit.log = unit.tracker = None


def checkpointed_peak(forward_peak: int, records: Sequence[BlockRecord]) -> int:
    """The peak saved bytes of a step with checkpointed blocks: backward recomputes block k once
    the blocks after it are done (their inputs freed) and what the forward saved after the last
    block is freed, so the peak is max(forward peak, max_k (H - sum_{j > k} I_j + R_k)), H the
    bytes held when the last block returned, I_j the blocks' inputs, R_k block k's
    recomputation."""
    held = records[-1].held_after
    later = [sum(r.input_bytes for r in records[k + 1 :]) for k in range(len(records))]
    return max(forward_peak, *(held - after + r.recompute_bytes
                               for after, r in zip(later, records, strict=True)))  # fmt: skip


def _float(a) -> bool:
    return isinstance(a, torch.Tensor) and a.is_floating_point()


def install_checkpointing(model: nn.Module, segments: int | None = None) -> list[_Checkpointed]:
    """Checkpoint ``model`` per block in place (parameters and state_dict keys unchanged).
    Convert a model before checkpointing it: an nn.Sequential's segments hold its layers."""
    units: list[_Checkpointed] = []
    block_list = find_block_list(model)
    if block_list is not None:
        for block in block_list:
            unit = _Checkpointed(block.forward)
            block.forward = unit
            units.append(unit)
    elif isinstance(model, nn.Sequential):
        blocks = sequential_blocks(model)
        n = segments or math.ceil(math.sqrt(len(blocks)))
        size = math.ceil(len(blocks) / min(n, len(blocks)))
        for start in range(0, len(blocks), size):
            layers = [m for block in blocks[start : start + size] for m in block]
            units.append(_Checkpointed(nn.Sequential(*layers).forward))

        def forward(self, x):
            for unit in units:
                x = unit(x)
            return x

        model.forward = types.MethodType(forward, model)
    else:
        raise ValueError(
            f"checkpoint: cannot find the blocks of {type(model).__name__}; it must be an "
            f"nn.Sequential or hold its blocks in a list named one of {', '.join(BLOCK_LISTS)}"
        )
    model.rp_checkpoint_units = units
    return units


def remove_checkpointing(model: nn.Module) -> None:
    """Undo :func:`install_checkpointing` on ``model`` (its blocks' and its own forward back to
    their classes'); a model without it is left as it is."""
    units = model.__dict__.pop("rp_checkpoint_units", None)
    if units is None:
        return
    model.__dict__.pop("forward", None)
    for unit in units:
        owner = unit.fn.__self__
        if owner.__dict__.get("forward") is unit:
            del owner.__dict__["forward"]
