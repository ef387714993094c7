"""RAD's functional forms for Linear and Conv (the sketches, the autograd Functions,
rad_linear, rad_conv1d/2d/3d): randomized automatic differentiation (Oktay et al., 2020).

Forward, input gradient and bias gradient are exact. The input X is stored only as a random
sketch X_hat with E[X_hat] = X, and the weight gradient dW = D^T X_hat (Linear) or
conv_weight_grad(X_hat, D) (Conv) is unbiased because it is linear in X_hat.

X is viewed as (B, G, n): for Linear B = all leading positions, G = 1, n = in_features; for Conv
B = batch, G = channels, n = spatial positions. With keep fraction p:

- sample: each row (b, g) keeps k = ceil(p n) of its n entries, scaled by n/k (stores BGk
  values). The k entries are a cyclic window, at a uniform random shift per row, of one random
  permutation of the n positions: each row's set is a uniform k-subset, rows are pairwise
  independent given the permutation (so the variance equals that of independent per-row
  sampling), and only B*G + n random numbers are drawn instead of B*G*n.
  same_sample: one set of k = ceil(p G n) entries shared by the batch, scaled by Gn/k.
- project: X_hat = (X R) R^T with R (n x k) Rademacher / sqrt(k), k = ceil(p n), so
  E[R R^T] = I; stores X R (B x G x k). Without same_sample each row also gets its own random
  signs s (X_hat = ((X * s) R) R^T * s), which decorrelates the examples at no storage cost.
  The signs of R and s are read 8 to a random byte (:func:`row_signs`), one generator call per
  8 signs.

Only the seed of the randomness is kept; backward regenerates every draw. With bits < 32 the
stored values are kept in k bits with unbiased stochastic rounding (:mod:`randprop.methods.kbit`).
Backward rebuilds X_hat a chunk of rows at a time (see :func:`x_hat_chunks`), so that besides
the stored values it holds about as much again, not X's size. Project mode also holds R
(n x k) whole while compressing and decompressing: for a wide Linear layer at a small batch
that can exceed the stored values.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F

from randprop import random as rnd
from randprop.config import parse_method
from randprop.methods import kbit
from randprop.methods.base import (
    ConvArgs,
    autocast_inputs,
    conv_backward,
    conv_forward,
    conv_nd,
    method_config,
    saved_weight,
    weight_to_save,
)
from randprop.methods.rad.config import RAD

# --- the sketch of X, shape (B, G, n) --------------------------------------------------------
#
# Backward rebuilds X_hat a chunk of rows (along B) at a time, each chunk about as large as the
# stored values, so that its transient memory stays near what RAD saved rather than the size of
# X. The draws are made so that the chunks read off the same draw as one piece would: the window
# shifts and the permutation are drawn whole (B*G + n numbers) and each chunk's indices built from
# them; per-row signs are drawn chunk after chunk in row order, in compress and decompress alike.


#: smallest chunk of X_hat worth its own pass, in elements (64 KiB of float32): below it the
#: per-chunk overhead (a recurrent layer has small batches at every time step) costs more time
#: than the transient costs memory
MIN_CHUNK_ELEMENTS = 2**14

#: a chunk of at least 8 ROW_ALIGN rows (and fewer than B) is cut to a multiple of ROW_ALIGN,
#: losing under 1/8 of its rows: the weight gradient's matrix products over a chunk's rows run
#: slower at some odd counts (measured on Linear 768 -> 3072, 1024 rows: chunks of 205 rows
#: about 10-20% slower than chunks of 192)
ROW_ALIGN = 16


def rows_per_chunk(b: int, k: int, n: int, g: int = 1) -> int:
    """Rows of the B dimension per chunk: the most c with c*n <= B*k or c*G*n <=
    MIN_CHUNK_ELEMENTS (at least 1), so that a chunk of X_hat (c, G, n) holds no more elements
    than the stored values (B, G, k), or than a small fixed floor; cut to a multiple of
    ROW_ALIGN when c >= 8 ROW_ALIGN and c < B."""
    rows = max(1, (b * k) // n, MIN_CHUNK_ELEMENTS // (g * n))
    return rows - rows % ROW_ALIGN if 8 * ROW_ALIGN <= rows < b else rows


def _chunks(rows: int, size: int) -> list[slice]:
    return [slice(i, min(i + size, rows)) for i in range(0, rows, size)]


def _window_draw(
    shape: torch.Size, k: int, gen: torch.Generator, device
) -> tuple[torch.Tensor, torch.Tensor]:
    """The draw behind :func:`row_windows`: one permutation perm of range(n), one shift per row
    (B, G). Returned as the (n, k) table of every cyclic window of perm, row s holding
    perm[(s + j) % n], j < k (a strided view of perm extended by its first k - 1 entries, so
    that a row's indices are one copy, no per-element arithmetic), and the shifts."""
    b, g, n = shape
    perm = torch.randperm(n, generator=gen, device=device)
    shift = torch.randint(0, n, (b, g, 1), generator=gen, device=device)
    return torch.cat([perm, perm[: k - 1]]).unfold(0, k, 1), shift[..., 0]


def _windows(table: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """(c, G, k) indices: the rows of ``table`` (:func:`_window_draw`) at ``shift`` (c, G);
    index_select copies them several times faster than advanced indexing, which moreover ran
    as a parallel region that stalls when the machine's cores are busy (measured)."""
    return table.index_select(0, shift.reshape(-1)).view(*shift.shape, -1)


def row_windows(shape: torch.Size, k: int, gen: torch.Generator, device) -> torch.Tensor:
    """(B, G, k) indices: for each row a cyclic window of length k, at a uniform random shift,
    of one random permutation of range(n) shared by the rows."""
    return _windows(*_window_draw(shape, k, gen, device))


def sign_table(dtype: torch.dtype, device) -> torch.Tensor:
    """(256, 8): row v holds the signs that byte v codes, +1 where bit i of v is set, else -1."""
    bits = torch.arange(256, device=device)[:, None] >> torch.arange(8, device=device)
    return (bits & 1).to(dtype).mul_(2).sub_(1)


def row_signs(shape: torch.Size, gen: torch.Generator, table: torch.Tensor) -> torch.Tensor:
    """(B, G, n) independent uniform signs (+-1), read off ceil(n / 8) random bytes per row
    (bit i of byte j: the sign of entry 8 j + i) through ``table`` (:func:`sign_table`): one
    generator draw per 8 signs, and rows drawn in order, so consecutive chunks of rows draw what
    the whole would."""
    b, g, n = shape
    codes = torch.randint(0, 256, (b, g, -(-n // 8)), generator=gen, device=table.device,
                          dtype=torch.uint8)  # fmt: skip
    return table.index_select(0, codes.view(-1).int()).view(b, g, -1)[..., :n]


def projection(n: int, k: int, gen: torch.Generator, table: torch.Tensor) -> torch.Tensor:
    """Project mode's n x k matrix R, E[R R^T] = I: signs / sqrt(k), read off random bytes as
    :func:`row_signs` reads them."""
    return row_signs(torch.Size((1, n, k)), gen, table)[0] / math.sqrt(k)


def compress(x: torch.Tensor, cfg: RAD, seed: int) -> torch.Tensor:
    """The values RAD stores for ``x`` of shape (B, G, n)."""
    gen = rnd.generator(seed, x.device)
    b, g, n = x.shape
    if cfg.mode == "sample" and cfg.same_sample:
        idx = rnd.sample_indices(g * n, rnd.kept_count(g * n, cfg.keep), gen, x.device)
        return x.reshape(b, g * n)[:, idx]
    k = rnd.kept_count(n, cfg.keep)
    if cfg.mode == "sample":
        windows, shift = _window_draw(x.shape, k, gen, x.device)
    else:
        table = sign_table(x.dtype, x.device)
        r = projection(n, k, gen, table)
        if cfg.same_sample:
            return x @ r
    stored = x.new_empty(b, g, k)
    for rows in _chunks(b, rows_per_chunk(b, k, n, g)):
        part = x[rows]
        if cfg.mode == "sample":
            torch.gather(part, 2, _windows(windows, shift[rows]), out=stored[rows])
        else:
            torch.matmul(row_signs(part.shape, gen, table).mul_(part), r, out=stored[rows])
    return stored


def x_hat_chunks(
    stored: torch.Tensor, shape: torch.Size, cfg: RAD, seed: int
) -> Iterator[tuple[slice, torch.Tensor]]:
    """X_hat of ``shape`` (B, G, n) from the stored values, regenerating the draw from ``seed``:
    yields (rows, X_hat[rows]) for consecutive chunks of rows of B (see :func:`rows_per_chunk`)."""
    gen = rnd.generator(seed, stored.device)
    b, g, n = shape
    dtype, device = stored.dtype, stored.device
    if cfg.mode == "sample" and cfg.same_sample:
        k = rnd.kept_count(g * n, cfg.keep)
        idx = rnd.sample_indices(g * n, k, gen, device)
        for rows in _chunks(b, rows_per_chunk(b, k, g * n)):
            x_hat = torch.zeros(stored[rows].shape[0], g * n, dtype=dtype, device=device)
            x_hat[:, idx] = stored[rows] * (g * n / k)
            yield rows, x_hat.view(-1, g, n)
        return
    k = rnd.kept_count(n, cfg.keep)
    if cfg.mode == "sample":
        windows, shift = _window_draw(shape, k, gen, device)
    else:
        table = sign_table(dtype, device)
        r = projection(n, k, gen, table)
    for rows in _chunks(b, rows_per_chunk(b, k, n, g)):
        if cfg.mode == "sample":
            x_hat = torch.zeros(stored[rows].shape[:2] + (n,), dtype=dtype, device=device)
            x_hat.scatter_(2, _windows(windows, shift[rows]), stored[rows] * (n / k))
        else:
            x_hat = stored[rows] @ r.T
            if not cfg.same_sample:
                x_hat *= row_signs(x_hat.shape, gen, table)
        yield rows, x_hat


def linear_weight_grad(
    grad_out: torch.Tensor, stored: torch.Tensor, in_features: int, cfg: RAD, seed: int
) -> torch.Tensor:
    """dW = D^T X_hat for D (N x m): in closed form where the sketch is shared by the rows,
    else summed over chunks of rows, dW = sum_c D_c^T X_hat_c."""
    n_rows = grad_out.shape[0]
    if cfg.same_sample:
        stored = stored.view(n_rows, -1)
        gen = rnd.generator(seed, stored.device)
        if cfg.mode == "sample":
            k = rnd.kept_count(in_features, cfg.keep)
            idx = rnd.sample_indices(in_features, k, gen, stored.device)
            grad_w = grad_out.new_zeros(grad_out.shape[1], in_features)
            grad_w[:, idx] = (grad_out.T @ stored) * (in_features / k)
            return grad_w
        k = rnd.kept_count(in_features, cfg.keep)
        r = projection(in_features, k, gen, sign_table(stored.dtype, stored.device))
        return (grad_out.T @ stored) @ r.T
    grad_w = None
    for rows, x_hat in x_hat_chunks(stored, torch.Size((n_rows, 1, in_features)), cfg, seed):
        d, x_hat = grad_out[rows].T, x_hat.view(-1, in_features)
        grad_w = d @ x_hat if grad_w is None else grad_w.addmm_(d, x_hat)
    return grad_w


# --- Linear ---------------------------------------------------------------------------------


class _RADLinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, cfg: RAD, seed: int):
        out = F.linear(x, weight, bias)
        rows = x.reshape(-1, 1, x.shape[-1])
        stored = _compress(rows, cfg, seed) if ctx.needs_input_grad[1] else None
        stored, ctx.stored_meta = kbit.pack(stored, cfg.bits, cfg.group, seed)
        ctx.save_for_backward(*stored, weight_to_save(ctx, weight))
        ctx.cfg, ctx.seed, ctx.x_shape = cfg, seed, x.shape
        ctx.has_bias = bias is not None
        return out

    @staticmethod
    def backward(ctx, grad_out):
        *stored, weight = ctx.saved_tensors
        stored = kbit.unpack(stored, ctx.stored_meta)
        grad_rows = grad_out.reshape(-1, grad_out.shape[-1])
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = (grad_out @ weight).view(ctx.x_shape)
        if ctx.needs_input_grad[1]:
            n, cfg, seed = ctx.x_shape[-1], ctx.cfg, ctx.seed
            if isinstance(seed, torch.Tensor):  # compiled: the draw inside an opaque op
                grad_w = torch.ops.randprop.rad_linear_weight_grad(
                    grad_rows, stored, n, seed, str(cfg)
                )
            else:
                grad_w = linear_weight_grad(grad_rows, stored, n, cfg, seed)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad_rows.sum(0)
        return grad_x, grad_w, grad_b, None, None


def rad_linear(
    input: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    method: RAD | str = "rad",
    seed: int = 0,
) -> torch.Tensor:
    """F.linear whose weight gradient comes from a RAD sketch of ``input`` drawn with ``seed``
    (``method``: a RAD config or its string form)."""
    cfg = method_config(method, RAD, "rad_linear")
    x, weight, bias = autocast_inputs(input, weight, bias)
    if x.numel() == 0 or weight.numel() == 0:  # nothing to sketch: the plain op is exact
        return F.linear(x, weight, bias)
    return _RADLinearFn.apply(x, weight, bias, cfg, seed)


# --- Conv -----------------------------------------------------------------------------------


def conv_weight_grad(grad_out, stored, weight, x_shape, conv: ConvArgs, cfg: RAD, seed: int):
    """The convolution's weight gradient from X_hat: summed over chunks of the batch of each
    chunk's conv_weight_grad(X_hat_c, D_c)."""
    b, c = x_shape[:2]
    grad_w = None
    shape = torch.Size((b, c, math.prod(x_shape[2:])))
    for rows, x_hat in x_hat_chunks(stored, shape, cfg, seed):
        grad = grad_out[rows]
        x_hat = x_hat.view(grad.shape[0], *x_shape[1:])
        part = conv_backward(grad, x_hat, x_hat.shape, weight, None, conv, [False, True, False])[1]
        grad_w = part if grad_w is None else grad_w.add_(part)
    return grad_w


class _RADConvFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, cfg: RAD, seed: int, stride, padding, dilation, groups):
        out = conv_forward(ctx, x, weight, bias, stride, padding, dilation, groups)
        b, c = x.shape[:2]
        stored = _compress(x.reshape(b, c, -1), cfg, seed) if ctx.needs_input_grad[1] else None
        stored, ctx.stored_meta = kbit.pack(stored, cfg.bits, cfg.group, seed)
        ctx.save_for_backward(*stored, weight_to_save(ctx, weight))
        ctx.cfg, ctx.seed = cfg, seed
        return out

    @staticmethod
    def backward(ctx, grad_out):
        *stored, weight = ctx.saved_tensors
        stored = kbit.unpack(stored, ctx.stored_meta)
        weight = saved_weight(ctx, weight, grad_out)
        need_x, need_w = ctx.needs_input_grad[:2]
        need_b = ctx.bias_shape is not None and ctx.needs_input_grad[2]
        grad_x = grad_w = grad_b = None
        if need_w and isinstance(ctx.seed, torch.Tensor):  # compiled: one opaque op
            stride, padding, dilation, _, groups = ctx.conv
            grad_w = torch.ops.randprop.rad_conv_weight_grad(
                grad_out, stored, weight, list(ctx.x_shape), stride, padding, dilation, groups,
                ctx.seed, str(ctx.cfg),
            )  # fmt: skip
        elif need_w:
            grad_w = conv_weight_grad(grad_out, stored, weight, ctx.x_shape, ctx.conv, ctx.cfg,
                                      ctx.seed)  # fmt: skip
        if need_x or need_b:
            grad_x, _, grad_b = conv_backward(
                grad_out,
                None,
                ctx.x_shape,
                weight,
                ctx.bias_shape,
                ctx.conv,
                [need_x, False, need_b],
            )
        return grad_x, grad_w, grad_b, None, None, None, None, None, None


def _rad_conv(x, weight, bias, stride, padding, dilation, groups, *, cfg: RAD, seed: int):
    """The batched convolution with RAD weight gradients (lists of ints, zero padding)."""
    x, weight, bias = autocast_inputs(x, weight, bias)
    if x.numel() == 0 or weight.numel() == 0:  # nothing to sketch: the plain op is exact
        zeros = [0] * (x.dim() - 2)
        return torch.convolution(x, weight, bias, stride, padding, dilation, False, zeros, groups)
    return _RADConvFn.apply(x, weight, bias, cfg, seed, stride, padding, dilation, groups)


def _conv(dims: int | None, input, weight, bias, stride, padding, dilation, groups, method, seed):
    core = functools.partial(_rad_conv, cfg=method_config(method, RAD, "rad_conv"), seed=seed)
    return conv_nd(core, dims, input, weight, bias, stride, padding, dilation, groups)


def rad_conv(
    input: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    stride: int | tuple[int, ...] = 1,
    padding: str | int | tuple[int, ...] = 0,
    dilation: int | tuple[int, ...] = 1,
    groups: int = 1,
    *,
    method: RAD | str = "rad",
    seed: int = 0,
) -> torch.Tensor:
    """Convolution (1d/2d/3d by the rank of ``weight``; arguments as F.conv2d's) whose weight
    gradient comes from a RAD sketch of the input drawn with ``seed``."""
    return _conv(None, input, weight, bias, stride, padding, dilation, groups, method, seed)


def rad_conv1d(
    input: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    stride: int | tuple[int, ...] = 1,
    padding: str | int | tuple[int, ...] = 0,
    dilation: int | tuple[int, ...] = 1,
    groups: int = 1,
    *,
    method: RAD | str = "rad",
    seed: int = 0,
) -> torch.Tensor:
    """F.conv1d with RAD weight gradients (see :func:`rad_conv`)."""
    return _conv(1, input, weight, bias, stride, padding, dilation, groups, method, seed)


def rad_conv2d(
    input: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    stride: int | tuple[int, ...] = 1,
    padding: str | int | tuple[int, ...] = 0,
    dilation: int | tuple[int, ...] = 1,
    groups: int = 1,
    *,
    method: RAD | str = "rad",
    seed: int = 0,
) -> torch.Tensor:
    """F.conv2d with RAD weight gradients (see :func:`rad_conv`)."""
    return _conv(2, input, weight, bias, stride, padding, dilation, groups, method, seed)


def rad_conv3d(
    input: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    stride: int | tuple[int, ...] = 1,
    padding: str | int | tuple[int, ...] = 0,
    dilation: int | tuple[int, ...] = 1,
    groups: int = 1,
    *,
    method: RAD | str = "rad",
    seed: int = 0,
) -> torch.Tensor:
    """F.conv3d with RAD weight gradients (see :func:`rad_conv`)."""
    return _conv(3, input, weight, bias, stride, padding, dilation, groups, method, seed)


# --- the draws as custom ops, for torch.compile ----------------------------------------------
#
# While torch.compile traces, a layer's seed is a 0-dim int64 tensor computed in the graph (see
# RandomizedLayer.rp_next_seed). The seeded draws run inside these ops, opaque to the compiler: each
# reads the seed and calls the eager function above, so compiled and eager runs draw bitwise the
# same numbers for the same seed. The config travels as its string form.

_config = functools.lru_cache(maxsize=None)(parse_method)


def _compress(x: torch.Tensor, cfg: RAD, seed: int | torch.Tensor) -> torch.Tensor:
    """:func:`compress`, through the custom op when the seed is a tensor (compiled)."""
    if isinstance(seed, torch.Tensor):
        return torch.ops.randprop.rad_compress(x, seed, str(cfg))
    return compress(x, cfg, seed)


@torch.library.custom_op("randprop::rad_compress", mutates_args=())
def _compress_op(x: torch.Tensor, seed: torch.Tensor, method: str) -> torch.Tensor:
    return compress(x, _config(method), int(seed))


@_compress_op.register_fake
def _(x: torch.Tensor, seed: torch.Tensor, method: str) -> torch.Tensor:
    cfg, (b, g, n) = _config(method), x.shape
    if cfg.mode == "sample" and cfg.same_sample:
        return x.new_empty(b, rnd.kept_count(g * n, cfg.keep))
    return x.new_empty(b, g, rnd.kept_count(n, cfg.keep))


@torch.library.custom_op("randprop::rad_linear_weight_grad", mutates_args=())
def _linear_weight_grad_op(
    grad_out: torch.Tensor, stored: torch.Tensor, in_features: int, seed: torch.Tensor, method: str
) -> torch.Tensor:
    return linear_weight_grad(grad_out, stored, in_features, _config(method), int(seed))


@_linear_weight_grad_op.register_fake
def _(grad_out, stored, in_features, seed, method) -> torch.Tensor:
    return grad_out.new_empty(grad_out.shape[1], in_features)


@torch.library.custom_op("randprop::rad_conv_weight_grad", mutates_args=())
def _conv_weight_grad_op(
    grad_out: torch.Tensor,
    stored: torch.Tensor,
    weight: torch.Tensor,
    x_shape: list[int],
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    groups: int,
    seed: torch.Tensor,
    method: str,
) -> torch.Tensor:
    conv = (stride, padding, dilation, [0] * len(stride), groups)
    return conv_weight_grad(grad_out, stored, weight, x_shape, conv, _config(method), int(seed))


@_conv_weight_grad_op.register_fake
def _(grad_out, stored, weight, x_shape, stride, padding, dilation, groups, seed, method):
    return grad_out.new_empty(weight.shape)
