"""The k-bit quantizer: unbiased stochastic rounding, exact packing, bytes as stated."""

from __future__ import annotations

import pytest
import torch
from stat_checks import assert_unbiased, unbiasedness_pvalue

from randprop.quantize import BITS, QuantizedTensor, pack, quantize, unpack
from randprop.random import generator


def _draws(x: torch.Tensor, bits: int, group: int | None, k: int, stochastic=True):
    gen = generator(1234)
    return torch.stack(
        [
            quantize(x, bits, group, generator=gen, stochastic=stochastic).dequantize()
            for _ in range(k)
        ]
    )


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("group", [None, 5, 64])
def test_stochastic_rounding_is_unbiased(bits, group):
    x = torch.randn(6, 20, generator=torch.Generator().manual_seed(bits))
    assert_unbiased(_draws(x, bits, group, 400), x)


@pytest.mark.parametrize("bits", [1, 2, 4])
def test_round_to_nearest_is_caught_as_biased(bits):
    """Positive control: the same test rejects deterministic rounding (noise added so that it
    is not caught for having no variance) and a scale error of one tenth of the step."""
    x = torch.randn(6, 20, generator=torch.Generator().manual_seed(7))
    nearest = _draws(x, bits, None, 400, stochastic=False)
    noisy = nearest + 0.05 * torch.randn(nearest.shape, generator=torch.Generator().manual_seed(1))
    assert unbiasedness_pvalue(noisy, x) < 1e-6
    scaled = (1 + 0.1 / (1 << bits)) * _draws(x, bits, None, 400)
    assert unbiasedness_pvalue(scaled, x) < 1e-4


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("numel", [1, 7, 8, 9, 1000])
def test_pack_unpack_round_trip(bits, numel):
    codes = torch.randint(0, 1 << bits, (numel,), dtype=torch.uint8)
    packed = pack(codes, bits)
    assert packed.dtype == torch.uint8
    assert packed.numel() == -(-numel * bits // 8)
    assert torch.equal(unpack(packed, bits, numel), codes)


@pytest.mark.parametrize("bits", BITS)
def test_codes_within_a_step_and_bytes_as_stated(bits):
    x = torch.randn(4, 3, 50)
    q = quantize(x, bits, 25, generator=generator(0))
    step = q.scale.repeat_interleave(25)[: x.numel()].view_as(x)
    assert ((q.dequantize() - x).abs() <= step * (1 + 1e-5) + 1e-6).all()
    groups = x.numel() // 25
    assert q.nbytes == x.numel() * bits // 8 + 8 * groups
    again = QuantizedTensor.rebuild(q.tensors, q.meta)
    assert torch.equal(again.dequantize(), q.dequantize())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_dtype_and_shape_preserved(dtype):
    x = torch.randn(3, 5, 7).to(dtype)
    out = quantize(x, 8, generator=generator(0)).dequantize()
    assert out.dtype == dtype and out.shape == x.shape
    torch.testing.assert_close(out.double(), x.double(), atol=0.05, rtol=0.02)


def test_constant_group_is_exact_and_empty_tensor_works():
    x = torch.full((2, 9), 3.25)
    assert torch.equal(quantize(x, 1, generator=generator(0)).dequantize(), x)
    assert quantize(torch.empty(0, 4), 2, generator=generator(0)).dequantize().shape == (0, 4)


def test_bad_arguments_name_the_argument():
    x = torch.randn(4, 4)
    with pytest.raises(ValueError, match="bits must be one of 1, 2, 4, 8; got 3"):
        quantize(x, 3, generator=generator(0))
    with pytest.raises(ValueError, match="group_size must be a positive int"):
        quantize(x, 2, 0, generator=generator(0))
    with pytest.raises(ValueError, match="needs a generator"):
        quantize(x, 2, generator=None)
    with pytest.raises(TypeError, match="floating-point"):
        quantize(torch.ones(3, dtype=torch.int64), 2, generator=generator(0))


# --- the stored codes, scales and dequantized values are frozen ----------------------------------
# Published figures depend on them: a faster quantizer must reproduce, bit for bit, this copy of
# the algorithm as first written (two passes for min and max, floor, clamp, shift-and-sum packing).


def _frozen_quantize(x, bits, group_size, gen, stochastic):
    levels = (1 << bits) - 1
    work = torch.float64 if x.dtype == torch.float64 else torch.float32
    flat = x.detach().reshape(-1).to(work)
    pad = (-flat.numel()) % group_size
    if pad:
        flat = torch.cat([flat, flat[-1:].expand(pad) if flat.numel() else flat.new_zeros(pad)])
    groups = flat.view(-1, group_size)
    low = groups.amin(dim=1)
    scale = (groups.amax(dim=1) - low) / levels
    inverse = torch.where(scale > 0, scale.reciprocal(), torch.zeros_like(scale))
    codes = (groups - low[:, None]) * inverse[:, None]
    if stochastic:
        codes += torch.rand(codes.shape, generator=gen, device=codes.device)
        codes = codes.floor_()
    else:
        codes = codes.round_()
    codes = codes.clamp_(0, levels).to(torch.uint8).reshape(-1)[: x.numel()]
    per_byte = 8 // bits
    pad = (-codes.numel()) % per_byte
    if pad:
        codes = torch.cat([codes, codes.new_zeros(pad)])
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8)
    packed = (codes.view(-1, per_byte) << shifts).sum(dim=1, dtype=torch.uint8)
    unpacked = ((packed[:, None] >> shifts) & levels).reshape(-1)[: x.numel()]
    codes = unpacked.to(scale.dtype)
    pad = (-codes.numel()) % group_size
    if pad:
        codes = torch.cat([codes, codes.new_zeros(pad)])
    values = torch.addcmul(low[:, None], codes.view(-1, group_size), scale[:, None])
    values = values.reshape(-1)[: x.numel()].reshape(x.shape).to(x.dtype)
    return packed, scale, low, values


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize(
    ("shape", "group"),
    [
        ((64, 768), None),
        ((16, 96), None),
        ((5, 7), None),
        ((3, 11, 13), 8),
        ((4, 50), 25),
        ((1,), None),
        ((0, 4), 3),
    ],
)
@pytest.mark.parametrize("stochastic", [True, False])
def test_bitwise_equal_to_the_frozen_algorithm(bits, dtype, shape, group, stochastic):
    x = (torch.randn(shape, generator=torch.Generator().manual_seed(7)) * 3).to(dtype)
    if x.numel() > 2:
        x.view(-1)[:2] = 0.5  # ties and a constant pair
    gsize = group or (max(shape[-1], 1))
    gen, ref_gen = generator(99), generator(99)
    q = quantize(x, bits, group, generator=gen, stochastic=stochastic)
    packed, scale, low, values = _frozen_quantize(x, bits, gsize, ref_gen, stochastic)
    assert torch.equal(q.packed, packed) and q.packed.dtype == torch.uint8
    assert torch.equal(q.scale, scale) and q.scale.dtype == scale.dtype
    assert torch.equal(q.offset, low) and q.offset.dtype == low.dtype
    out = q.dequantize()
    assert out.dtype == values.dtype and out.shape == values.shape
    assert torch.equal(out.view(-1).view(torch.uint8), values.view(-1).view(torch.uint8))
    assert torch.equal(unpack(q.packed, bits, x.numel()), unpack(packed, bits, x.numel()))
    if stochastic:  # the generator is left where the frozen algorithm leaves it
        assert torch.equal(torch.rand(3, generator=gen), torch.rand(3, generator=ref_gen))
