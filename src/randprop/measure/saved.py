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
    Non-reentrant activation checkpointing (torch.utils.checkpoint's default, transformers'
    gradient_checkpointing_enable) recomputes a block in backward under its own saved-tensor
    hooks, which this tracker does not see: it counts the block inputs the forward keeps, not
    the recomputed block. Reentrant checkpointing recomputes under these hooks, so it is counted;
    :class:`randprop.measure.peak.track_peak` counts every allocation either way.
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


def saved_by_op(
    output: torch.Tensor, model: nn.Module | None = None, *, exclude: Iterable[torch.Tensor] = ()
) -> dict[str, int]:
    """Bytes held for backward by the graph of ``output``, by the op that saved them: {op name:
    bytes}, the op named by its backward node (``AddmmBackward0`` -> ``Addmm``, a custom
    Function by its class, ``_RADLinearFnBackward`` -> ``_RADLinearFn``). Call it after the
    forward, before backward. Each storage counts once (for the first node that holds it, in
    graph order from ``output``); ``model``'s parameters and buffers (without a model: every
    nn.Parameter) and ``exclude`` do not count, as in :class:`track_saved`."""
    state = [*model.parameters(), *model.buffers()] if model is not None else []
    excluded = {track_saved._key(t) for t in (*state, *exclude)}
    seen: set[tuple] = set()
    by_op: dict[str, int] = defaultdict(int)
    stack, visited = [output.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or node in visited:
            continue
        visited.add(node)
        stack.extend(next_node for next_node, _ in node.next_functions)
        name = type(node).__name__
        name = name[: name.rindex("Backward")] if "Backward" in name else name
        for t in _node_saved(node):
            key = track_saved._key(t)
            base = t._base if t._base is not None else t
            parameter = model is None and isinstance(base, nn.Parameter)
            if key in seen or key in excluded or parameter or t.layout != torch.strided:
                continue
            seen.add(key)
            by_op[name] += key[3]
    return dict(sorted(by_op.items(), key=lambda item: -item[1]))


def _node_saved(node) -> list[torch.Tensor]:
    """The tensors an autograd node holds: ``_saved_*`` attributes of a built-in node, the
    saved_tensors of a custom Function's."""
    if hasattr(node, "saved_tensors"):
        try:
            return [t for t in node.saved_tensors if isinstance(t, torch.Tensor)]
        except RuntimeError:  # already freed, or not unpackable twice (checkpoint)
            return []
    found = []
    for attr in dir(node):
        if not attr.startswith("_saved_"):
            continue
        try:
            value = getattr(node, attr)
        except RuntimeError:
            continue
        values = value if isinstance(value, (tuple, list)) else (value,)
        found.extend(v for v in values if isinstance(v, torch.Tensor))
    return found
