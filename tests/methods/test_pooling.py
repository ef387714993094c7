"""Compact max pooling: same values and gradients as PyTorch, one byte per output saved."""

import copy

import pytest
import torch
from torch import nn

import randprop as rp
from randprop.methods.pooling import CompactMaxPool2d

CASES = [
    (nn.MaxPool1d(3, stride=2, padding=1), (2, 3, 11)),
    (nn.MaxPool2d(2), (2, 3, 7, 7)),
    (nn.MaxPool3d(2), (2, 2, 4, 5, 7)),
    (nn.MaxPool1d(3), (2, 3, 10)),
    (nn.MaxPool2d(3, stride=2, padding=1, dilation=2, ceil_mode=True), (2, 3, 9, 8)),
    (nn.MaxPool2d((2, 3), stride=(1, 2)), (3, 6, 5)),  # unbatched
    (nn.MaxPool3d((2, 3, 2), stride=(1, 2, 2), padding=(0, 1, 1)), (1, 2, 5, 6, 7)),
]


@pytest.mark.parametrize("pool, shape", CASES, ids=[str(i) for i in range(len(CASES))])
def test_matches_pytorch(pool, shape):
    compact = copy.deepcopy(pool)
    report = rp.convert(compact, rp.Trace())
    assert report.converted == [""] and type(compact).__name__.startswith("CompactMaxPool")
    x = torch.randn(shape, dtype=torch.float64)
    x[..., 0] = x[..., 1]  # ties resolve as PyTorch resolves them
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    out, ref = compact(xa), pool(xb)
    upstream = torch.randn_like(ref)
    out.backward(upstream)
    ref.backward(upstream)
    assert torch.equal(out, ref) and torch.equal(xa.grad, xb.grad)


def test_saves_one_byte_per_output_and_only_under_memory_methods():
    pool = nn.MaxPool2d(2)
    leaf = torch.randn(4, 8, 10, 10, requires_grad=True)
    with rp.track_saved() as plain:
        pool(leaf * 1.0)  # an activation, as inside a network (input + int64 indices saved)
    rp.convert(pool, rp.Trace())
    with rp.track_saved() as compact:
        pool(leaf * 1.0).sum().backward()
    assert compact.bytes == 4 * 8 * 5 * 5 < plain.bytes / 10
    assert "keeps activations exact" in rp.convert(nn.MaxPool2d(2), "exact").skipped[""]


def test_return_indices_falls_back_to_pytorch():
    pool = CompactMaxPool2d(2, return_indices=True)
    out, idx = pool(torch.randn(1, 1, 4, 4))
    assert idx.dtype == torch.int64 and out.shape == (1, 1, 2, 2)


AVG_CASES = [
    (nn.AvgPool1d(3, stride=2, padding=1), (2, 3, 9)),
    (nn.AvgPool2d(2), (2, 3, 8, 8)),
    (nn.AvgPool2d(3, stride=2, padding=1, ceil_mode=True, count_include_pad=False), (2, 2, 7, 6)),
    (nn.AvgPool2d(2, divisor_override=3), (1, 2, 4, 4)),
    (nn.AvgPool3d((1, 2, 2)), (2, 2, 3, 4, 4)),
]


@pytest.mark.parametrize("pool, shape", AVG_CASES)
def test_shape_only_avg_pool_matches_pytorch_and_stores_nothing(pool, shape):
    import copy

    import randprop as rp

    compact = copy.deepcopy(pool)
    report = rp.convert(compact, rp.RAD())
    assert report.converted == [""]
    x = torch.randn(shape, dtype=torch.float64)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    with rp.track_saved() as saved:
        ya = compact(xa * 1.0)  # a non-leaf input: the stock pool would save it
    yb = pool(xb)
    upstream = torch.randn_like(yb)
    ya.backward(upstream)
    yb.backward(upstream)
    assert saved.bytes == 0
    torch.testing.assert_close(ya, yb, rtol=0, atol=0)
    torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-15, atol=1e-15)
