"""Exact dropout storing its mask in 1 bit per element, or only its seed.

PyTorch's dropout saves its noise ``mask / (1 - p)``, a tensor the size of the input (feature
dropout: one value per sample and channel), 4 bytes per element in float32. Here each forward
call draws one integer seed and builds the noise from a private generator seeded with it; backward
computes ``dX = dY * mask / (1 - p)`` exactly from either

- the mask packed 1 bit per element (``store_mask=True``, the default): n / 8 bytes for n
  elements (1/32 of PyTorch's float32 noise), read back through a 256-entry table of the 8
  noise values each byte stands for; or
- the seed alone (``store_mask=False``): no tensor saved, the mask drawn again in backward.

Measured (one CPU thread, 8 x 128 x 256 float32, p = 0.1, forward + backward): PyTorch's
dropout 2.4 ms, the 1-bit mask 2.8 ms, the seed alone 4.1 ms; drawing the mask (a Bernoulli per
element) costs ~10x packing and reading it back, so the default keeps the mask, and the seed
form is for when every byte counts (GPT-2's 9 dropouts of the char LM's 8 x 128 x 256
activations: 0.3 MB of masks).

The seed is drawn from PyTorch's default CPU generator (one int64 per call, on the host: no
device synchronisation), the generator nn.Dropout itself draws from on CPU. Dropout is part of the
model, not of a gradient estimator, so its randomness stays the user's: ``torch.manual_seed``
controls the masks as it does nn.Dropout's, and ``torch.utils.checkpoint`` (which restores the
CPU generator's state before recomputing, ``preserve_rng_state=True`` by default, in both modes)
replays the same seed, hence the same mask, in the recomputed forward. The mask itself is drawn
from a generator on the input's device seeded with that seed
(:func:`randprop.random.generator`): ``bernoulli_(1 - p)`` then ``div_(1 - p)``, as PyTorch's
CPU kernel does, so the masks have nn.Dropout's distribution (the masks themselves differ).
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from randprop.methods.base import ConvertedLayer
from randprop.quantize import pack
from randprop.random import generator

_SEED_HIGH = 2**63 - 1


def draw_seed() -> int | torch.Tensor:
    """One seed in [0, 2^63 - 1) from PyTorch's default CPU generator (see the module doc);
    while torch.compile traces, the draw as a 0-dim int64 tensor, not read back (a compiler
    that replaces random ops, as inductor does unless ``fallback_random``, draws other seeds)."""
    seed = torch.randint(_SEED_HIGH, (), dtype=torch.int64)
    return seed if torch.compiler.is_compiling() else int(seed.item())


def dropout_noise(
    seed: int | torch.Tensor, p: float, shape: tuple[int, ...], like: torch.Tensor
) -> torch.Tensor:
    """``mask / (1 - p)`` of ``shape`` in ``like``'s dtype and device, the mask's entries
    independent Bernoulli(1 - p) drawn from a generator seeded with ``seed`` (a 0-dim tensor
    while compiling: drawn inside the custom op ``randprop::dropout_noise``, opaque to the
    compiler, the same mask as eager for the same seed)."""
    if isinstance(seed, torch.Tensor):
        return torch.ops.randprop.dropout_noise(like, list(shape), p, seed)
    gen = generator(seed, like.device)
    noise = torch.empty(shape, dtype=like.dtype, device=like.device)
    return noise.bernoulli_(1 - p, generator=gen).div_(1 - p)


@torch.library.custom_op("randprop::dropout_noise", mutates_args=())
def _noise_op(like: torch.Tensor, shape: list[int], p: float, seed: torch.Tensor) -> torch.Tensor:
    return dropout_noise(int(seed), p, tuple(shape), like)


@_noise_op.register_fake
def _(like, shape, p, seed) -> torch.Tensor:
    return like.new_empty(shape)


def _noise_table(p: float, like: torch.Tensor) -> torch.Tensor:
    """(256, 8): row b holds the noise ``mask / (1 - p)`` of the 8 elements packed in byte b
    (element i is bit i), computed as :func:`dropout_noise` computes it (the same values)."""
    bits = torch.arange(256, device=like.device)[:, None] >> torch.arange(8, device=like.device)
    return (bits & 1).to(like.dtype).div_(1 - p)


def unpack_noise(packed: torch.Tensor, p: float, shape: tuple[int, ...], like: torch.Tensor):
    """The noise ``mask / (1 - p)`` of ``shape`` from its mask packed 1 bit per element (8 per
    byte, element i of a byte at bit i): one table lookup per byte, in ``like``'s dtype."""
    numel = math.prod(shape)
    table = _noise_table(p, like)
    return table.index_select(0, packed.to(torch.int32)).view(-1)[:numel].view(shape)


class _SeededDropout(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, p: float, noise_shape, seed: int, inplace: bool, store_mask: bool):
        noise = dropout_noise(seed, p, noise_shape, x)
        ctx.p, ctx.noise_shape, ctx.seed = p, noise_shape, seed
        if store_mask:
            ctx.save_for_backward(pack(torch.ne(noise, 0).view(torch.uint8), 1))
        ctx.store_mask = store_mask
        if inplace:
            ctx.mark_dirty(x)
            return x.mul_(noise)
        return x * noise

    @staticmethod
    def backward(ctx, grad_out):
        if ctx.store_mask:
            (packed,) = ctx.saved_tensors
            noise = unpack_noise(packed, ctx.p, ctx.noise_shape, grad_out)
        else:
            noise = dropout_noise(ctx.seed, ctx.p, ctx.noise_shape, grad_out)
        if noise.shape == grad_out.shape:  # the product in the noise's fresh buffer
            return noise.mul_(grad_out), None, None, None, None, None
        return grad_out * noise, None, None, None, None, None


def _check_store_mask(store_mask: object) -> bool:
    if not isinstance(store_mask, bool):
        raise TypeError(f"store_mask must be True or False; got {store_mask!r}")
    return store_mask


def _check_p(p: float) -> float:
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"dropout probability p must be between 0 and 1; got {p}")
    return float(p)


def _apply(
    x: torch.Tensor,
    p: float,
    inplace: bool,
    noise_shape: tuple[int, ...],
    seed: int | None,
    store_mask: bool,
) -> torch.Tensor:
    seed = draw_seed() if seed is None else int(seed)
    if torch.is_grad_enabled() and x.requires_grad:
        return _SeededDropout.apply(x, p, noise_shape, seed, inplace, store_mask)
    noise = dropout_noise(seed, p, noise_shape, x)  # the same mask, nothing to save
    return x.mul_(noise) if inplace else x * noise


def dropout(
    input: torch.Tensor,
    p: float = 0.5,
    training: bool = True,
    inplace: bool = False,
    *,
    seed: int | None = None,
    store_mask: bool = True,
) -> torch.Tensor:
    """``F.dropout`` saving its mask in 1 bit per element for backward (``store_mask=False``:
    nothing, backward regenerates the mask from its seed): zeroes each element with probability
    ``p`` and scales the rest by 1 / (1 - p).

    ``seed``: the mask's seed; None (the default) draws one from PyTorch's default CPU
    generator, so ``torch.manual_seed`` governs it as it does nn.Dropout. Not training, p = 0,
    p = 1 or an empty input: ``F.dropout`` itself (identity, identity, zeros), drawing nothing.
    """
    p = _check_p(p)
    _check_store_mask(store_mask)
    if not training or p in (0.0, 1.0) or input.numel() == 0:
        return F.dropout(input, p, training, inplace)
    return _apply(input, p, inplace, tuple(input.shape), seed, store_mask)


def _feature_dropout(
    input: torch.Tensor, p: float, training: bool, inplace: bool, batched: bool, store_mask: bool
) -> torch.Tensor:
    """Channel-wise dropout: one draw per (sample, channel), or per channel when not
    ``batched`` (dim 0 is the channel)."""
    if not training or p in (0.0, 1.0) or input.numel() == 0:
        return None
    lead = 2 if batched else 1
    shape = (*input.shape[:lead], *[1] * (input.dim() - lead))
    return _apply(input, p, inplace, shape, None, store_mask)


class _CompactDropout(ConvertedLayer):
    """What the compact dropout layers share: ``store_mask`` (keyword, default True) keeps the
    mask in 1 bit per element for backward; False keeps only the seed (see the module doc)."""

    #: the default of every layer not given ``store_mask`` (rp.convert gives none)
    rp_store_mask: ClassVar[bool] = True

    def __init__(self, *args: Any, store_mask: bool = True, **kwargs: Any) -> None:
        """The torch class's own arguments, then ``store_mask``."""
        super().__init__(*args, **kwargs)
        self.rp_store_mask = _check_store_mask(store_mask)

    @classmethod
    def from_module(cls, module: nn.Module, store_mask: bool = True):
        """A layer of this class sharing ``module``'s state (``module`` is left as it is)."""
        layer = super().from_module(module)
        layer.rp_store_mask = _check_store_mask(store_mask)
        return layer

    @property
    def rp_storage(self) -> str:
        return "exact, 1-bit mask" if self.rp_store_mask else "exact, seed only"

    def rp_release(self) -> None:
        self.__dict__.pop("rp_store_mask", None)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, store_mask={self.rp_store_mask}"


class SeededDropout(_CompactDropout, nn.Dropout):
    """nn.Dropout saving a 1-bit mask, or only a seed, for backward (``p``, ``inplace``,
    train / eval as in nn.Dropout)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dropout(x, self.p, self.training, self.inplace, store_mask=self.rp_store_mask)


class _SeededDropoutNd(_CompactDropout):
    """Channel-wise dropout saving a 1-bit mask per (sample, channel), or only a seed. Inputs
    of the ranks the torch class documents (``rp_ranks``: rank -> batched) take the compact
    path; any other rank runs the torch class's own forward (its deprecation warnings and
    errors included)."""

    rp_ranks: dict[int, bool]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batched = self.rp_ranks.get(x.dim())
        out = None
        if batched is not None:
            out = _feature_dropout(
                x, self.p, self.training, self.inplace, batched, self.rp_store_mask
            )
        return super().forward(x) if out is None else out


class SeededDropout1d(_SeededDropoutNd, nn.Dropout1d):
    """nn.Dropout1d saving a 1-bit mask (or only a seed) for backward."""

    rp_ranks = {3: True, 2: False}


class SeededDropout2d(_SeededDropoutNd, nn.Dropout2d):
    """nn.Dropout2d saving a 1-bit mask (or only a seed) for backward (4-D inputs; others as
    nn.Dropout2d)."""

    rp_ranks = {4: True}


class SeededDropout3d(_SeededDropoutNd, nn.Dropout3d):
    """nn.Dropout3d saving a 1-bit mask (or only a seed) for backward."""

    rp_ranks = {5: True, 4: False}


#: dropout layers with compact storage, swapped in by convert as the activation masks are
COMPACT_DROPOUT = {
    nn.Dropout: SeededDropout,
    nn.Dropout1d: SeededDropout1d,
    nn.Dropout2d: SeededDropout2d,
    nn.Dropout3d: SeededDropout3d,
}
