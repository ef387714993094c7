"""Dropout that saves nothing for backward: only its seed, from which backward regenerates the
mask.

PyTorch's dropout saves its noise ``mask / (1 - p)``, a tensor the size of the input (feature
dropout: one value per sample and channel). Here each forward call draws one integer seed, builds
the noise from a private generator seeded with it, and backward rebuilds the same noise from the
seed: ``dX = dY * mask / (1 - p)`` exactly, with no tensor saved.

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

import torch
import torch.nn.functional as F
from torch import nn

from randprop.methods.base import ConvertedLayer
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


class _SeededDropout(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, p: float, noise_shape: tuple[int, ...], seed: int, inplace: bool):
        noise = dropout_noise(seed, p, noise_shape, x)
        ctx.p, ctx.noise_shape, ctx.seed = p, noise_shape, seed
        if inplace:
            ctx.mark_dirty(x)
            return x.mul_(noise)
        return x * noise

    @staticmethod
    def backward(ctx, grad_out):
        noise = dropout_noise(ctx.seed, ctx.p, ctx.noise_shape, grad_out)
        return grad_out * noise, None, None, None, None


def _check_p(p: float) -> float:
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"dropout probability p must be between 0 and 1; got {p}")
    return float(p)


def _apply(
    x: torch.Tensor, p: float, inplace: bool, noise_shape: tuple[int, ...], seed: int | None
) -> torch.Tensor:
    seed = draw_seed() if seed is None else int(seed)
    if torch.is_grad_enabled() and x.requires_grad:
        return _SeededDropout.apply(x, p, noise_shape, seed, inplace)
    noise = dropout_noise(seed, p, noise_shape, x)  # the same mask, nothing to save
    return x.mul_(noise) if inplace else x * noise


def dropout(
    input: torch.Tensor,
    p: float = 0.5,
    training: bool = True,
    inplace: bool = False,
    *,
    seed: int | None = None,
) -> torch.Tensor:
    """``F.dropout`` that saves no tensor for backward: zeroes each element with probability
    ``p`` and scales the rest by 1 / (1 - p); backward regenerates the mask from its seed.

    ``seed``: the mask's seed; None (the default) draws one from PyTorch's default CPU
    generator, so ``torch.manual_seed`` governs it as it does nn.Dropout. Not training, p = 0,
    p = 1 or an empty input: ``F.dropout`` itself (identity, identity, zeros), drawing nothing.
    """
    p = _check_p(p)
    if not training or p in (0.0, 1.0) or input.numel() == 0:
        return F.dropout(input, p, training, inplace)
    return _apply(input, p, inplace, tuple(input.shape), seed)


def _feature_dropout(
    input: torch.Tensor, p: float, training: bool, inplace: bool, batched: bool
) -> torch.Tensor:
    """Channel-wise dropout: one draw per (sample, channel), or per channel when not
    ``batched`` (dim 0 is the channel)."""
    if not training or p in (0.0, 1.0) or input.numel() == 0:
        return None
    lead = 2 if batched else 1
    return _apply(input, p, inplace, (*input.shape[:lead], *[1] * (input.dim() - lead)), None)


class SeededDropout(ConvertedLayer, nn.Dropout):
    """nn.Dropout saving only a seed for backward (``p``, ``inplace``, train / eval as in
    nn.Dropout)."""

    rp_storage = "exact, seed only"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dropout(x, self.p, self.training, self.inplace)


class _SeededDropoutNd(ConvertedLayer):
    """Channel-wise dropout saving only a seed. Inputs of the ranks the torch class documents
    (``rp_ranks``: rank -> batched) take the compact path; any other rank runs the torch
    class's own forward (its deprecation warnings and errors included)."""

    rp_storage = "exact, seed only"
    rp_ranks: dict[int, bool]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batched = self.rp_ranks.get(x.dim())
        out = None
        if batched is not None:
            out = _feature_dropout(x, self.p, self.training, self.inplace, batched)
        return super().forward(x) if out is None else out


class SeededDropout1d(_SeededDropoutNd, nn.Dropout1d):
    """nn.Dropout1d saving only a seed for backward."""

    rp_ranks = {3: True, 2: False}


class SeededDropout2d(_SeededDropoutNd, nn.Dropout2d):
    """nn.Dropout2d saving only a seed for backward (4-D inputs; others as nn.Dropout2d)."""

    rp_ranks = {4: True}


class SeededDropout3d(_SeededDropoutNd, nn.Dropout3d):
    """nn.Dropout3d saving only a seed for backward."""

    rp_ranks = {5: True, 4: False}


#: dropout layers with compact storage, swapped in by convert as the activation masks are
COMPACT_DROPOUT = {
    nn.Dropout: SeededDropout,
    nn.Dropout1d: SeededDropout1d,
    nn.Dropout2d: SeededDropout2d,
    nn.Dropout3d: SeededDropout3d,
}
