"""Peak memory of a block: the most bytes of tensor storage held at once while it runs.

On CUDA the caching allocator knows: ``torch.cuda.max_memory_allocated`` after a reset at entry
(every tensor on the device counts, the model's and anyone else's). Elsewhere :class:`track_peak`
counts it itself: every aten call inside the block passes through a TorchDispatchMode, which
registers the storages of the call's outputs (each storage once, a view shares its base's); a
storage stops counting when its last reference dies (autograd's saved copies included), which a
weak reference to the storage tells. Storages alive at entry count only where passed as ``held``
(the model's parameters, buffers and gradients, the optimizer state and the batch), so a dataset
or anything else the process holds is left out. Then

    peak = max over every allocation in the block of (bytes of ``held`` and block storages alive).

Allocations below aten (kernel workspaces, allocator slack, the Python heap) are not seen.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode


def state_tensors(
    model: nn.Module | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    extra: object = None,
) -> list[torch.Tensor]:
    """What a training step holds besides the batch: the model's parameters, their gradients,
    its buffers and the tensors its modules keep as plain attributes (a method's state), the
    optimizer's state tensors, and the tensors in ``extra``'s attributes (e.g. a learning rule)."""
    tensors: list[torch.Tensor] = []
    if model is not None:
        for p in model.parameters():
            tensors.append(p)
            if p.grad is not None:
                tensors.append(p.grad)
        tensors.extend(model.buffers())
        for module in model.modules():
            tensors.extend(_tensors(vars(module)))
    if optimizer is not None:
        tensors.extend(_tensors(dict(optimizer.state)))
    if extra is not None:
        tensors.extend(_tensors(getattr(extra, "__dict__", {})))
    return tensors


def _tensors(obj) -> list[torch.Tensor]:
    """The tensors in ``obj``: a tensor, or lists, tuples and dicts of them (nested)."""
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, dict):
        obj = list(obj.values())
    if isinstance(obj, (list, tuple)):
        return [t for item in obj for t in _tensors(item)]
    return []


class _Allocations(TorchDispatchMode):
    def __init__(self, tracker: track_peak) -> None:
        super().__init__()
        self.tracker = tracker

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in _tensors(out):
            self.tracker._add(t, allocation=True)
        return out


class track_peak:  # noqa: N801 (a context manager used like a function, as torch.no_grad)
    """Context manager measuring the peak bytes of tensor storage held at once in the block.

    held: tensors alive at entry that count (see :func:`state_tensors`; add the batch).
    device: count only storages on this device (default: any device).
    .bytes: the peak; .current: bytes of the counted storages alive now.
    On CUDA prefer the allocator's figure (:class:`peak_memory`).
    """

    def __init__(
        self, held: Iterable[torch.Tensor] = (), device: torch.device | str | None = None
    ) -> None:
        self.device = torch.device(device) if device is not None else None
        self.bytes = 0
        self._counted = 0  # bytes of the storages in _live, freed ones included until a prune
        self._held = list(held)
        self._live: dict[int, tuple[StorageWeakRef, int]] = {}
        self._mode = _Allocations(self)

    def _add(self, t: torch.Tensor, allocation: bool = False) -> None:
        if t.layout != torch.strided or (self.device is not None and t.device != self.device):
            return
        try:
            storage = t.untyped_storage()
        except (NotImplementedError, RuntimeError):  # tensors without a storage of their own
            return
        ref = StorageWeakRef(storage)
        if ref.cdata in self._live:  # a view, an in-place result or a tensor already counted
            return
        nbytes = storage.nbytes()
        if allocation and self._counted + nbytes > self.bytes:
            # frees since the last prune lower the count before it rises; while the count with
            # freed storages still in it stays within the peak, the true count does too, so
            # pruning is needed only where a new peak may be reached
            self._prune()
        self._live[ref.cdata] = (ref, nbytes)
        self._counted += nbytes
        self.bytes = max(self.bytes, self._counted)

    @property
    def current(self) -> int:
        self._prune()
        return self._counted

    def _prune(self) -> None:
        for key in [k for k, (ref, _) in self._live.items() if ref.expired()]:
            self._counted -= self._live.pop(key)[1]

    def __enter__(self) -> track_peak:
        for t in self._held:
            self._add(t)
        self._held = []  # the tracker itself must not keep them alive
        self._mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._mode.__exit__(*exc)
        self._prune()
        self._live.clear()


class peak_memory:  # noqa: N801
    """Peak bytes held at once in the block on ``device``: on CUDA the allocator's peak after a
    reset at entry (everything on the device counts); elsewhere :class:`track_peak` with ``held``.

    .bytes: the peak, or None for a block that has not finished.
    """

    def __init__(self, device: torch.device | str, held: Iterable[torch.Tensor] = ()) -> None:
        self.device = torch.device(device)
        self.bytes: int | None = None
        self._tracker = None if self.device.type == "cuda" else track_peak(held, self.device)

    def __enter__(self) -> peak_memory:
        if self._tracker is None:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self._tracker.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self._tracker is None:
            torch.cuda.synchronize(self.device)
            self.bytes = torch.cuda.max_memory_allocated(self.device)
        else:
            self._tracker.__exit__(*exc)
            self.bytes = self._tracker.bytes
