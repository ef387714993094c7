"""The one k-bit quantizer: per-group affine codes, stochastic rounding, packed storage.

A tensor is cut into groups of ``group_size`` consecutive elements (row-major order). Each group
stores its minimum m and step s = (max - m) / (2^k - 1), and each element x the code

    q = floor((x - m) / s + u),  u ~ U[0, 1) drawn from a seeded generator,

so that E[q] = (x - m) / s and the dequantized value m + q s is an unbiased estimate of x
(stochastic rounding). Codes of k in {1, 2, 4, 8} bits are packed 8 / k per byte, element i of a
byte at bits [k i, k (i + 1)). A group whose values are all equal stores s = 0 and codes 0, and is
then exact. Scale and minimum are float32 (float64 for a float64 input, read back to float64
precision), so a group of g elements costs g k / 8 + 8 bytes (g k / 8 + 16 for float64).

Every method that stores something compactly (a sketch, an activation derivative, a normalised
input) quantizes through :func:`quantize` and reads back through :meth:`QuantizedTensor.dequantize`.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from randprop import random as rnd

#: the allowed code widths
BITS = (1, 2, 4, 8)


def check_bits(bits: object, name: str = "bits") -> int:
    """``bits`` as an int of :data:`BITS`, or a ValueError naming ``name`` and the allowed values."""
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in BITS:
        raise ValueError(f"{name} must be one of {', '.join(map(str, BITS))}; got {bits!r}")
    return bits


@dataclass
class QuantizedTensor:
    """k-bit codes of a tensor and the per-group affine map that reads them back.

    packed: uint8 codes, 8 / bits per byte; scale, offset: float32 per group (s and m above;
    float64 for a float64 input);
    shape, dtype: those of the quantized tensor; bits: k; group_size: elements per group.
    """

    packed: torch.Tensor
    scale: torch.Tensor
    offset: torch.Tensor
    shape: torch.Size
    dtype: torch.dtype
    bits: int
    group_size: int

    @property
    def tensors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The tensors to hand to ``ctx.save_for_backward`` (so saved-tensor hooks see them)."""
        return self.packed, self.scale, self.offset

    @property
    def meta(self) -> tuple[torch.Size, torch.dtype, int, int]:
        """Everything but the tensors, for a ctx attribute; :meth:`rebuild` joins both."""
        return self.shape, self.dtype, self.bits, self.group_size

    @classmethod
    def rebuild(
        cls, tensors: tuple[torch.Tensor, ...], meta: tuple[torch.Size, torch.dtype, int, int]
    ) -> QuantizedTensor:
        """The inverse of splitting into :attr:`tensors` and :attr:`meta`."""
        return cls(*tensors, *meta)

    @property
    def nbytes(self) -> int:
        """Bytes held: the packed codes plus two float32 (float64) per group."""
        return sum(t.numel() * t.element_size() for t in self.tensors)

    def dequantize(self) -> torch.Tensor:
        """m + q s per element, in the original shape and dtype."""
        numel = math.prod(self.shape)
        per_byte = 8 // self.bits
        codes = unpack(self.packed, self.bits, self.packed.numel() * per_byte).to(self.scale.dtype)
        rows = -(-numel // self.group_size)
        if codes.numel() >= rows * self.group_size:  # the packing's tail covers the last group
            groups = codes[: rows * self.group_size].view(rows, self.group_size)
        else:
            groups = _grouped(codes[:numel], self.group_size)
        # in place on a dense copy of the offsets: the same fused m + q s as
        # torch.addcmul(offset[:, None], groups, scale[:, None]), which is many times slower
        values = self.offset[:, None].expand(groups.shape).contiguous()
        values.addcmul_(groups, self.scale[:, None])
        return values.reshape(-1)[:numel].reshape(self.shape).to(self.dtype)


def quantize(
    x: torch.Tensor,
    bits: int,
    group_size: int | None = None,
    *,
    generator: torch.Generator | None,
    stochastic: bool = True,
) -> QuantizedTensor:
    """``x`` in ``bits``-bit codes with one scale and minimum per ``group_size`` consecutive
    elements (default: per row, the last dimension). Stochastic rounding draws from
    ``generator`` (unbiased: E[dequantize] = x); ``stochastic=False`` rounds to nearest (biased,
    no draw, ``generator`` may be None)."""
    check_bits(bits)
    if not x.is_floating_point():
        raise TypeError(f"quantize needs a floating-point tensor; got {x.dtype}")
    if group_size is None:
        group_size = max(x.shape[-1], 1) if x.dim() else 1
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size must be a positive int or None (per row); got {group_size!r}")
    if stochastic and generator is None:
        raise ValueError("stochastic rounding needs a generator (randprop.random.generator)")
    levels = (1 << bits) - 1
    work = torch.float64 if x.dtype == torch.float64 else torch.float32
    groups = _grouped(x.detach().reshape(-1).to(work), group_size, pad_last=True)
    low = groups.amin(dim=1)
    scale = (groups.amax(dim=1) - low) / levels
    inverse = torch.where(scale > 0, scale.reciprocal(), torch.zeros_like(scale))
    codes = torch.sub(groups, low[:, None]).mul_(inverse[:, None])
    if stochastic:
        codes += torch.rand(codes.shape, generator=generator, device=codes.device)
    else:
        codes = codes.round_()
    # codes >= 0 (x >= the group's minimum), so the cast's truncation is the floor of
    # stochastic rounding, and floor(min(c, levels)) = min(floor(c), levels)
    codes = codes.clamp_(0, levels).to(torch.uint8).reshape(-1)
    if codes.numel() > x.numel():  # the padded tail
        codes = codes[: x.numel()].clone() if bits == 8 else codes[: x.numel()]
    packed = codes if bits == 8 else pack(codes, bits)
    return QuantizedTensor(packed, scale, low, x.shape, x.dtype, bits, group_size)


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes below 2^bits, flattened and packed 8 / bits per byte (zero padded).

    Each 8 / bits codes (one per byte) are read as one little-endian word, code i at bit 8 i;
    multiplying by sum_i 2^(P - (8 - bits) i) puts code i at bit P + bits i with every partial
    product on bits of its own (no carries), so the word's bits [P, P + 8) are the packed byte."""
    check_bits(bits)
    per_byte = 8 // bits
    flat = codes.reshape(-1).to(torch.uint8)
    pad = (-flat.numel()) % per_byte
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    if per_byte == 1:
        return flat.clone()
    if torch.compiler.is_compiling() or sys.byteorder != "little":
        return (flat.view(-1, per_byte) << _shifts(bits, flat.device)).sum(1, dtype=torch.uint8)
    word, spread, top = _SPREAD[bits]
    if flat.storage_offset() % per_byte:  # a word view needs aligned storage
        flat = flat.clone()
    return ((flat.view(word) * spread) >> top).to(torch.uint8)


def unpack(packed: torch.Tensor, bits: int, numel: int) -> torch.Tensor:
    """The first ``numel`` uint8 codes of :func:`pack`'s output, flattened: each byte's
    8 / bits codes gathered, as one word, from a table of all 256 bytes' codes."""
    check_bits(bits)
    if bits == 8:
        return packed[:numel]
    shifts = _shifts(bits, packed.device)
    if torch.compiler.is_compiling():  # the same codes by shifts, which fuse
        return ((packed[:, None] >> shifts) & ((1 << bits) - 1)).reshape(-1)[:numel]
    table = (torch.arange(256, dtype=torch.uint8, device=packed.device)[:, None] >> shifts) & (
        (1 << bits) - 1
    )
    words = table.view(_SPREAD[bits][0]).view(-1).index_select(0, packed.to(torch.int32))
    return words.view(torch.uint8)[:numel]


#: bits -> (the word of 8 / bits codes, its multiplier, the packed byte's lowest bit)
_SPREAD = {
    1: (torch.int64, 0x0102040810204080, 56),
    2: (torch.int32, (1 << 18) + (1 << 12) + (1 << 6) + 1, 18),
    4: (torch.int16, (1 << 4) + 1, 4),
}


def _shifts(bits: int, device: torch.device) -> torch.Tensor:
    return torch.arange(0, 8, bits, dtype=torch.uint8, device=device)


def _grouped(flat: torch.Tensor, group_size: int, pad_last: bool = False) -> torch.Tensor:
    """``flat`` as rows of ``group_size`` (the last row padded: with its own last value when
    ``pad_last``, so padding never widens a group's range; with zeros otherwise)."""
    pad = (-flat.numel()) % group_size
    if pad:
        fill = flat[-1:].expand(pad) if pad_last and flat.numel() else flat.new_zeros(pad)
        flat = torch.cat([flat, fill])
    return flat.view(-1, group_size)


# --- seeded quantization, also under torch.compile -------------------------------------------


def quantize_seeded(
    xs: Sequence[torch.Tensor],
    bits: int,
    group_size: int | None = None,
    *,
    seed: int | torch.Tensor,
    tag: int | None = None,
    stochastic: bool = True,
) -> list[QuantizedTensor]:
    """:func:`quantize` of each of ``xs`` in turn, the rounding of all drawn from one generator
    seeded with ``seed`` (with ``tag``: ``subseed(seed, tag)``) on the first one's device.

    ``seed`` may be the 0-dim int64 tensor a compiled layer draws: then the draws run inside the
    custom op ``randprop::quantize``, opaque to torch.compile, which calls this function with the
    seed as an int, so compiled and eager codes are bitwise equal."""
    if stochastic and isinstance(seed, torch.Tensor):
        check_bits(bits)
        flat = torch.ops.randprop.quantize(list(xs), seed, -1 if tag is None else tag, bits,
                                           group_size or 0)  # fmt: skip
        return [
            QuantizedTensor(
                *flat[3 * i : 3 * i + 3], x.shape, x.dtype, bits, _resolved_group(x, group_size)
            )  # fmt: skip
            for i, x in enumerate(xs)
        ]
    gen = None
    if stochastic:
        seed = int(seed) if tag is None else rnd.subseed(int(seed), tag)
        gen = rnd.generator(seed, xs[0].device)
    return [quantize(x, bits, group_size, generator=gen, stochastic=stochastic) for x in xs]


def _resolved_group(x: torch.Tensor, group_size: int | None) -> int:
    """The group size :func:`quantize` uses for ``x`` (None: per row)."""
    if group_size is None:
        return max(x.shape[-1], 1) if x.dim() else 1
    return group_size


@torch.library.custom_op("randprop::quantize", mutates_args=())
def _quantize_op(
    xs: list[torch.Tensor], seed: torch.Tensor, tag: int, bits: int, group_size: int
) -> list[torch.Tensor]:
    """The flat (packed, scale, offset) triples of :func:`quantize_seeded` (tag -1: none,
    group_size 0: per row)."""
    codes = quantize_seeded(xs, bits, group_size or None, seed=int(seed),
                            tag=None if tag < 0 else tag)  # fmt: skip
    return [t for q in codes for t in q.tensors]


@_quantize_op.register_fake
def _(xs, seed, tag, bits, group_size) -> list[torch.Tensor]:
    out = []
    for x in xs:
        n, group = x.numel(), _resolved_group(x, group_size or None)
        work = torch.float64 if x.dtype == torch.float64 else torch.float32
        groups = (n + group - 1) // group
        per_byte = 8 // bits
        out.append(x.new_empty((n + per_byte - 1) // per_byte, dtype=torch.uint8))
        out += [x.new_empty(groups, dtype=work), x.new_empty(groups, dtype=work)]
    return out
