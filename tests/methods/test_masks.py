import pytest
import torch
from torch import nn

import randprop as rp
from randprop.methods.masks import MaskedLeakyReLU, MaskedReLU, pack_bits, unpack_bits


@pytest.mark.parametrize("shape", [(1,), (7,), (8,), (3, 5, 11), (2, 0)])
def test_pack_unpack_round_trip(shape):
    mask = torch.rand(shape) > 0.5
    packed = pack_bits(mask)
    assert packed.dtype == torch.uint8 and packed.numel() == (mask.numel() + 7) // 8
    assert torch.equal(unpack_bits(packed, mask.shape), mask)


@pytest.mark.parametrize(
    "ours, ref",
    [
        (rp.functional.relu, torch.relu),
        (lambda x: rp.functional.leaky_relu(x, 0.2), lambda x: nn.functional.leaky_relu(x, 0.2)),
        (MaskedReLU(), nn.ReLU()),
        (MaskedLeakyReLU(0.05), nn.LeakyReLU(0.05)),
    ],
)
def test_values_and_gradients_match_pytorch(ours, ref):
    x = torch.randn(4, 9, dtype=torch.float64)
    x[0, :3] = 0.0  # the kink: both use derivative 0 (ReLU) / slope (LeakyReLU) at 0
    upstream = torch.randn(4, 9, dtype=torch.float64)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = ours(xa), ref(xb)
    ya.backward(upstream)
    yb.backward(upstream)
    assert torch.equal(ya, yb)
    assert torch.equal(xa.grad, xb.grad)


def test_mask_saves_one_bit_per_element():
    x = torch.randn(64, 100, requires_grad=True)
    with rp.track_saved() as saved:
        rp.functional.relu(x * 1.0)
    assert saved.bytes == 64 * 100 // 8


def test_masked_relu_works_under_autocast_and_keeps_dtype():
    x = torch.randn(3, 5, dtype=torch.bfloat16, requires_grad=True)
    y = rp.functional.relu(x)
    y.sum().backward()
    assert y.dtype == x.grad.dtype == torch.bfloat16


def test_pack_bits_of_an_unaligned_view_and_bit_order():
    base = torch.zeros(19, dtype=torch.bool)
    base[[3, 5, 12, 17]] = True
    view = base[3:]  # storage offset 3
    assert pack_bits(view).tolist() == [0b0000_0101, 0b0100_0010]
    assert torch.equal(unpack_bits(pack_bits(view), view.shape), view)


@pytest.mark.parametrize(
    "ours, ref",
    [
        (MaskedReLU(inplace=True), nn.ReLU(inplace=True)),
        (MaskedLeakyReLU(0.05, inplace=True), nn.LeakyReLU(0.05, inplace=True)),
        (lambda x: rp.functional.relu(x, inplace=True), lambda x: torch.relu_(x)),
    ],
)
def test_inplace_matches_pytorch(ours, ref):
    """inplace=True: the input itself is changed and returned, gradients as PyTorch's."""
    x = torch.randn(4, 9, dtype=torch.float64)
    upstream = torch.randn(4, 9, dtype=torch.float64)
    grads, outs = [], []
    for fn in (ours, ref):
        leaf = x.clone().requires_grad_()
        inp = leaf * 1.0  # a non-leaf, as in-place activations need
        out = fn(inp)
        assert out is inp and torch.equal(inp, out)
        out.backward(upstream)
        grads.append(leaf.grad)
        outs.append(out.detach())
    assert torch.equal(outs[0], outs[1])
    assert torch.equal(grads[0], grads[1])
    with torch.no_grad():  # and without autograd: the same in-place change
        y = x.clone()
        assert ours(y) is y and torch.equal(y, outs[1])


def test_inplace_on_a_leaf_is_refused_as_pytorch_does():
    leaf = torch.randn(3, requires_grad=True)
    with pytest.raises(RuntimeError, match="leaf"):
        nn.ReLU(inplace=True)(leaf)
    with pytest.raises(RuntimeError, match="leaf"):
        MaskedReLU(inplace=True)(leaf)


@pytest.mark.parametrize("layer", [MaskedReLU(), MaskedLeakyReLU(0.1)])
def test_no_mask_packed_when_no_gradient_is_needed(layer, monkeypatch):
    """Under no_grad, or for an input that needs no gradient, the plain kernel runs: no mask is
    packed (nothing saved, no packing work)."""
    from randprop.methods import masks

    calls = []
    monkeypatch.setattr(masks, "pack_bits", lambda m: calls.append(m) or pack_bits(m))
    x = torch.randn(64, 100, requires_grad=True)
    with torch.no_grad(), rp.track_saved() as saved:
        out = layer(x)
    assert saved.total == 0 and not calls and not out.requires_grad
    with rp.track_saved() as saved:
        layer(torch.randn(64, 100))
    assert saved.total == 0 and not calls
    layer(x * 1.0)  # positive control: a gradient is needed, the mask is packed
    assert len(calls) == 1
