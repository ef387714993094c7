"""Bytes saved for backward, measured through autograd's saved-tensor hooks.

Every tensor autograd saves passes through the pack hook. We count each storage once (a tensor
and its views share one), drop it when autograd releases its last saved reference (after
backward, or when the graph is freed), and keep the running peak. The model's parameters and
buffers are excluded (they are held anyway), so what remains is activation memory; everything
else counts, inputs that require grad included (adversarial training, PINNs, saliency maps).
"""

from __future__ import annotations

import weakref
from collections import defaultdict
from collections.abc import Iterable

import torch
from torch import nn


class _Saved:
    """The packed form of a saved tensor; its finaliser releases the storage count.

    It holds a detached alias (same storage and version counter): holding the tensor itself
    would tie a saved output to its own grad_fn in a cycle that outlives an unused graph.
    Double backward (create_graph=True) through a tracked block is therefore not supported.
    """

    __slots__ = ("tensor", "__weakref__")

    def __init__(self, tensor: torch.Tensor) -> None:
        self.tensor = tensor


class track_saved:  # noqa: N801 (a context manager used like a function, as torch.no_grad)
    """Context manager measuring activation memory saved for backward inside the block.

    Not counted: the storages of ``model``'s parameters and buffers (without a model: every
    nn.Parameter) and of the tensors in ``exclude``.
    .bytes: the peak of bytes held for backward at once; .total: all bytes ever saved;
    .by_module: {module name: bytes first saved while that module (innermost) was running},
    when ``model`` is given. Tensors saved outside any submodule count under "".
    """

    def __init__(
        self, model: nn.Module | None = None, *, exclude: Iterable[torch.Tensor] = ()
    ) -> None:
        self.model = model
        self.bytes = 0
        self.total = 0
        self.current = 0
        self.by_module: dict[str, int] = defaultdict(int)
        self._refs: dict[tuple, int] = {}
        self._sizes: dict[tuple, int] = {}
        self._stack: list[str] = []
        self._handles: list = []
        self._excluded: set[tuple] = {self._key(t) for t in exclude}

    # -- storage bookkeeping
    @staticmethod
    def _key(t: torch.Tensor) -> tuple:
        storage = t.untyped_storage()
        return (t.device.type, t.device.index, storage.data_ptr(), storage.nbytes())

    def _is_state(self, t: torch.Tensor) -> bool:
        """A parameter or buffer of the model (without a model: an nn.Parameter), or excluded."""
        if self._key(t) in self._excluded:
            return True
        base = t._base if t._base is not None else t
        return self.model is None and isinstance(base, nn.Parameter)

    def _pack(self, t: torch.Tensor):
        if self._is_state(t) or t.layout != torch.strided:
            return t
        key = self._key(t)
        if key not in self._refs:
            self._refs[key] = 0
            size = key[3]
            self._sizes[key] = size
            self.current += size
            self.total += size
            self.bytes = max(self.bytes, self.current)
            self.by_module[self._stack[-1] if self._stack else ""] += size
        self._refs[key] += 1
        packed = _Saved(t.detach())
        weakref.finalize(packed, self._release, key)
        return packed

    def _unpack(self, packed):
        return packed.tensor if isinstance(packed, _Saved) else packed

    def _release(self, key: tuple) -> None:
        self._refs[key] -= 1
        if self._refs[key] == 0:
            del self._refs[key]
            self.current -= self._sizes.pop(key)

    # -- module attribution
    def _enter(self, name: str):
        def hook(module, args):
            self._stack.append(name)

        return hook

    def _leave(self, module, args, output):
        if self._stack:
            self._stack.pop()

    def __enter__(self) -> track_saved:
        if self.model is not None:
            for t in [*self.model.parameters(), *self.model.buffers()]:
                self._excluded.add(self._key(t))
            for name, module in self.model.named_modules():
                self._handles.append(module.register_forward_pre_hook(self._enter(name)))
                self._handles.append(module.register_forward_hook(self._leave))
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.by_module = dict(self.by_module)
