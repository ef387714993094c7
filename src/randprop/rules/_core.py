"""What FA, DFA and MEM-DFA share: seeded feedback matrices, block boundaries, forward hooks,
and the training-loop interface of the rules installed on a model (:class:`InstalledRule`).

A *boundary* is a module whose output ends a block. DFA and MEM-DFA cut the gradient there and
inject B_l e instead, where e = dL/d(output) is the error at the network output and B_l a fixed
random matrix. Boundaries are numbered by the order in which they fire during one forward pass,
and B_l depends only on (seed, l, shapes), so DFA and MEM-DFA built with the same seed on the same
model use the same matrices.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import nn

from randprop import random as rnd
from randprop.blocks import sequential_blocks
from randprop.rules.registry import LossFn


def he_normal(
    shape: tuple[int, ...], fan_in: int, seed: int, device: torch.device, dtype: torch.dtype
) -> torch.Tensor:
    """N(0, 2 / fan_in) entries drawn on ``device`` from ``seed`` (the same on every device of
    one kind; drawn there, so regenerating it in backward copies nothing from the host)."""
    gen = rnd.generator(seed, device)
    b = rnd.gaussian(shape, gen, torch.device(device), torch.float32) * math.sqrt(2.0 / fan_in)
    return b.to(dtype)


class InstalledRule:
    """What FA and DFA share: installed on ``model``, they leave training to an ordinary loop
    (``loss.backward()``); with ``loss_fn`` they also serve the training loop's
    ``.backward(x, y)`` (:class:`randprop.rules.registry.LearningRule`)."""

    def __init__(self, model: nn.Module, loss_fn: LossFn | None) -> None:
        name = type(self).__name__
        if not isinstance(model, nn.Module):
            raise TypeError(f"{name}: model must be an nn.Module; got {type(model).__name__}")
        if loss_fn is not None and not callable(loss_fn):
            raise TypeError(
                f"{name}: loss_fn must be callable or None; got {type(loss_fn).__name__}"
            )
        self.model, self.loss_fn = model, loss_fn

    def backward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """loss_fn(model(x), y).backward(); returns the (detached) loss."""
        if self.loss_fn is None:
            raise ValueError(
                f"{type(self).__name__}.backward needs loss_fn=...; or call loss.backward() "
                "yourself"
            )
        loss = self.loss_fn(self.model(x), y)
        loss.backward()
        return loss.detach()


class FeedbackMatrices:
    """DFA's B_l: (m_l x k) He-normal (std sqrt(2/k)), m_l = block output size, k = error size.

    As in the MEM-DFA authors' code (B of shape [n_out, fan_in], Keras He-normal), the variance
    is 2/k, so E|B_l e|^2 = 2 m_l / k |e|^2. Drawn once per (l, shape) and kept.
    """

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self._cache: dict[tuple, torch.Tensor] = {}

    def get(self, index: int, m: int, k: int, device: torch.device) -> torch.Tensor:
        key = (index, m, k, device)
        if key not in self._cache:
            # rank 0: the feedback matrices are identical on every data-parallel worker
            seed = rnd.derive_seed(self.seed, index, stream=rnd.STREAM_DFA)
            self._cache[key] = he_normal((m, k), k, seed, device, torch.float32)
        return self._cache[key]

    def project(
        self, index: int, e: torch.Tensor, shape: torch.Size, dtype: torch.dtype
    ) -> torch.Tensor:
        """B_l e for each example (dimension 0), reshaped to the block output's shape and dtype."""
        n = e.shape[0]
        if shape[0] != n:
            raise ValueError(
                f"block output {index} has batch size {shape[0]}, the network output {n}; "
                "DFA needs the batch in dimension 0 of every block output"
            )
        flat = e.reshape(n, -1)
        b = self.get(index, math.prod(shape[1:]), flat.shape[1], e.device)
        return (flat @ b.to(flat.dtype).T).reshape(shape).to(dtype)


class BlockOutput(nn.Identity):
    """Marker layer: the output of a DFA / MEM-DFA block (identity in the forward pass).

    Put one after each hidden block of a model that is not an nn.Sequential; rules built with
    ``blocks=None`` then cut the gradient here and inject B_l e.
    """


def boundaries(model: nn.Module, blocks: Sequence[nn.Module] | None) -> list[nn.Module]:
    """The modules whose outputs are block outputs.

    ``blocks``: submodules of ``model`` (their outputs end blocks; if the last one produces the
    network output it is the output block and gets the true error). None: the BlockOutput
    markers in the model if there are any, else the blocks of an nn.Sequential (the last block,
    which produces the output, excluded).
    """
    if blocks is not None:
        blocks = list(blocks)
        owned = {id(m) for m in model.modules()}
        for i, b in enumerate(blocks):
            if not isinstance(b, nn.Module) or id(b) not in owned:
                raise ValueError(f"blocks[{i}] must be a submodule of the model, got {type(b)}")
        if not blocks:
            raise ValueError("blocks must name at least one submodule")
        return blocks
    markers = [m for m in model.modules() if isinstance(m, BlockOutput)]
    if markers:
        return markers
    if not isinstance(model, nn.Sequential):
        raise ValueError(
            "blocks=None needs an nn.Sequential or BlockOutput markers in the model; "
            f"got {type(model).__name__}: pass blocks=[submodules ending each block]"
        )
    groups = sequential_blocks(model)
    if len(groups) < 2:
        raise ValueError("the Sequential has fewer than two blocks (Linear / conv layers)")
    return [group[-1] for group in groups[:-1]]


BoundaryFn = Callable[[int, torch.Tensor], torch.Tensor]


class BoundaryHooks:
    """Forward hooks calling ``on_boundary(l, h)`` on the output h of the l-th boundary to fire
    in the current forward pass of ``model``, and ``on_output(out)`` on the model output; each
    returns the tensor that replaces the one it was given."""

    def __init__(
        self,
        model: nn.Module,
        modules: Sequence[nn.Module],
        on_boundary: BoundaryFn,
        on_output: Callable[[torch.Tensor], torch.Tensor],
    ) -> None:
        self.count = 0
        self._handles = [model.register_forward_pre_hook(self._reset)]
        for module in dict.fromkeys(modules):  # a module listed twice is hooked once
            self._handles.append(module.register_forward_hook(self._boundary(on_boundary)))
        self._handles.append(model.register_forward_hook(lambda m, a, out: on_output(out)))

    def _reset(self, module: nn.Module, args: tuple) -> None:
        self.count = 0

    def _boundary(self, fn: BoundaryFn):
        def hook(module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
            if not isinstance(out, torch.Tensor):
                raise TypeError(f"a block must return a tensor, {type(module).__name__} did not")
            index, self.count = self.count, self.count + 1
            return fn(index, out)

        return hook

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
