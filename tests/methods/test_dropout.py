import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

import randprop as rp
from randprop.methods.dropout import (
    SeededDropout,
    SeededDropout1d,
    SeededDropout2d,
    SeededDropout3d,
    dropout_noise,
)


def _scale(p: float, dtype: torch.dtype) -> torch.Tensor:
    """1 / (1 - p) rounded as PyTorch's dropout kernel rounds it: a one divided in ``dtype``."""
    return torch.ones((), dtype=dtype).div_(1 - p)


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_forward_keeps_with_probability_1_minus_p_and_scales_by_its_inverse(p):
    n = 200_000
    y = rp.functional.dropout(torch.ones(n), p)
    kept = y != 0
    assert torch.equal(y[kept], _scale(p, y.dtype).expand(int(kept.sum())))
    # binomial count of kept elements within 5 standard deviations (fails for a wrong p:
    # p +- 0.01 is > 7 standard deviations away at this n)
    sd = math.sqrt(n * p * (1 - p))
    assert abs(kept.sum().item() - n * (1 - p)) < 5 * sd
    # and independent: pairs of neighbours are both kept with probability (1 - p)^2
    both = (kept[:-1] & kept[1:]).sum().item()
    q = (1 - p) ** 2
    assert abs(both - (n - 1) * q) < 5 * math.sqrt(n * q * (1 - q) * 3)


def test_mean_is_the_input_as_for_nn_dropout():
    torch.manual_seed(0)
    x = torch.randn(50)
    draws = torch.stack([rp.functional.dropout(x, 0.3) for _ in range(4000)])
    se = draws.std(0) / math.sqrt(len(draws))
    assert ((draws.mean(0) - x).abs() < 5 * se).all()


@pytest.mark.parametrize("store_mask", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_backward_is_grad_times_the_forward_mask_exactly(dtype, store_mask):
    p = 0.4
    x = torch.randn(8, 33, dtype=dtype).requires_grad_()
    y = rp.functional.dropout(x, p, store_mask=store_mask)
    upstream = torch.randn_like(y)
    y.backward(upstream)
    noise = (y != 0).to(dtype) * _scale(p, dtype)  # the mask forward used, read off its output
    assert torch.equal(y, x.detach() * noise)
    assert torch.equal(x.grad, upstream * noise)
    assert y.dtype == x.grad.dtype == dtype


def test_a_given_seed_fixes_the_mask_with_and_without_grad():
    x = torch.randn(6, 7)
    noise = dropout_noise(11, 0.5, (6, 7), x)
    assert torch.equal(rp.functional.dropout(x, seed=11), x * noise)
    leaf = x.clone().requires_grad_()
    assert torch.equal(rp.functional.dropout(leaf, seed=11), x * noise)
    assert not torch.equal(rp.functional.dropout(x, seed=12), x * noise)


def test_global_seeding_controls_the_masks_as_for_nn_dropout():
    x = torch.randn(100)
    torch.manual_seed(5)
    a, b = rp.functional.dropout(x), rp.functional.dropout(x)
    torch.manual_seed(5)
    c = rp.functional.dropout(x)
    assert torch.equal(a, c) and not torch.equal(a, b)


@pytest.mark.parametrize(
    ("p", "training"), [(0.0, True), (1.0, True), (0.5, False), (1.0, False), (0.0, False)]
)
@pytest.mark.parametrize("inplace", [False, True])
def test_edge_cases_are_pytorchs(p, training, inplace):
    x = torch.randn(5, 4)
    x[0, 0] = float("inf")  # p = 1 multiplies by zero: nan, as PyTorch
    outs, grads = [], []
    for fn in (rp.functional.dropout, F.dropout):
        leaf = x.clone().requires_grad_()
        inp = leaf * 1.0
        state = torch.get_rng_state()
        out = fn(inp, p, training, inplace)
        assert torch.equal(torch.get_rng_state(), state)  # nothing drawn
        out.backward(torch.ones_like(out))
        outs.append(out.detach())
        grads.append(leaf.grad)
    torch.testing.assert_close(outs[0], outs[1], equal_nan=True, rtol=0, atol=0)
    torch.testing.assert_close(grads[0], grads[1], equal_nan=True, rtol=0, atol=0)


def test_bad_p_is_refused():
    with pytest.raises(ValueError, match="p must be between 0 and 1; got 1.5"):
        rp.functional.dropout(torch.ones(3), 1.5)


def test_inplace_changes_and_returns_the_input():
    leaf = torch.randn(4, 9, requires_grad=True)
    inp = leaf * 1.0
    out = rp.functional.dropout(inp, 0.5, inplace=True)
    assert out is inp
    out.backward(torch.ones_like(out))
    assert torch.equal(leaf.grad, (out != 0).float() * 2)
    with pytest.raises(RuntimeError, match="leaf"):
        SeededDropout(0.5, inplace=True)(torch.randn(3, requires_grad=True))
    with torch.no_grad():
        y = torch.ones(10)
        assert rp.functional.dropout(y, 0.5, inplace=True) is y and set(y.tolist()) <= {0, 2}


def test_saves_a_1_bit_mask_or_nothing_where_nn_dropout_saves_an_input_sized_mask():
    x = torch.randn(64, 100, requires_grad=True)
    with rp.track_saved() as plain:
        nn.Dropout(0.5)(x * 1.0)
    with rp.track_saved() as packed:
        out = SeededDropout(0.5)(x * 1.0)
    with rp.track_saved() as seed_only:
        out2 = SeededDropout(0.5, store_mask=False)(x * 1.0)
    assert plain.bytes >= 64 * 100  # positive control: PyTorch's mask is measured
    assert packed.total == 64 * 100 // 8  # 1 bit per element
    assert seed_only.total == 0
    (out.sum() + out2.sum()).backward()
    assert x.grad is not None


def test_mask_and_seed_storage_give_the_same_values_and_gradients():
    """For one seed both storages compute the same output and bitwise the same gradient (the
    same noise values); the option round-trips through from_module, repr and restore."""
    x = torch.randn(3, 50, 17, dtype=torch.float64)
    upstream = torch.randn_like(x)
    outs, grads = [], []
    for store_mask in (True, False):
        leaf = x.clone().requires_grad_()
        out = rp.functional.dropout(leaf, 0.3, seed=5, store_mask=store_mask)
        out.backward(upstream)
        outs.append(out.detach())
        grads.append(leaf.grad)
    assert torch.equal(outs[0], outs[1]) and torch.equal(grads[0], grads[1])
    assert torch.equal(grads[0], upstream * dropout_noise(5, 0.3, x.shape, x))
    layer = SeededDropout2d.from_module(nn.Dropout2d(0.3), store_mask=False)
    assert not layer.rp_store_mask and layer.rp_storage == "exact, seed only"
    assert "store_mask=False" in repr(layer)
    model = nn.Sequential(nn.Linear(3, 3), nn.Dropout(0.1))
    rp.convert(model, "rad:keep=0.5")
    assert model[1].rp_store_mask and model[1].rp_storage == "exact, 1-bit mask"
    rp.restore(model)
    assert not hasattr(model[1], "rp_store_mask")
    with pytest.raises(TypeError, match="store_mask must be True or False; got 1"):
        rp.functional.dropout(x, 0.3, store_mask=1)
    with pytest.raises(TypeError, match="store_mask must be True or False"):
        SeededDropout(0.3, store_mask="yes")


@pytest.mark.parametrize(
    ("cls", "plain", "shape", "channels"),
    [
        (SeededDropout1d, nn.Dropout1d, (4, 6, 9), (4, 6, 1)),
        (SeededDropout1d, nn.Dropout1d, (6, 9), (6, 1)),
        (SeededDropout2d, nn.Dropout2d, (4, 6, 3, 3), (4, 6, 1, 1)),
        (SeededDropout3d, nn.Dropout3d, (2, 6, 2, 3, 3), (2, 6, 1, 1, 1)),
        (SeededDropout3d, nn.Dropout3d, (6, 2, 3, 3), (6, 1, 1, 1)),
    ],
)
@pytest.mark.parametrize("store_mask", [True, False])
def test_channel_dropout_drops_whole_channels_and_saves_a_bit_each(
    cls, plain, shape, channels, store_mask
):
    p = 0.5
    x = torch.randn(shape).requires_grad_()
    layer = cls(p, store_mask=store_mask)
    with rp.track_saved() as saved:
        y = layer(x)
    assert saved.total == (-(-math.prod(channels) // 8) if store_mask else 0)
    noise = (y != 0).to(x.dtype) * _scale(p, x.dtype)
    per_channel = noise.amax(dim=[i for i, c in enumerate(channels) if c == 1], keepdim=True)
    assert per_channel.shape == channels
    assert torch.equal(noise, per_channel.expand(shape))  # one draw per channel
    upstream = torch.randn(shape)
    y.backward(upstream)
    assert torch.equal(x.grad, upstream * noise)
    layer.eval()
    assert torch.equal(layer(x), plain(p).eval()(x))


def test_channel_dropout_of_other_ranks_is_pytorchs():
    with pytest.warns(UserWarning, match="3D input to dropout2d"):
        SeededDropout2d(0.5)(torch.randn(2, 3, 4))
    with pytest.raises(RuntimeError, match="Expected 2D or 3D input"):
        SeededDropout1d(0.5)(torch.randn(2, 3, 4, 5))


def test_convert_swaps_dropout_and_restore_gives_it_back():
    model = nn.Sequential(
        nn.Linear(4, 4), nn.Dropout(0.2), nn.Conv1d(4, 4, 1), nn.Dropout1d(), nn.Dropout2d(),
        nn.Dropout3d(),
    )  # fmt: skip
    report = rp.convert(model, "rad:keep=0.5")
    assert report.converted == ["0", "1", "2", "3", "4", "5"]
    assert report.methods["1"] == "exact, 1-bit mask" and "Dropout" in str(report)
    assert [type(m) for m in model][1::2] == [SeededDropout, SeededDropout1d, SeededDropout3d]
    assert model[1].p == 0.2
    rp.restore(model)
    assert type(model[1]) is nn.Dropout and type(model[4]) is nn.Dropout2d
    report = rp.convert(model, "exact")
    assert "1" in report.skipped


def _block() -> nn.Module:
    return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Dropout(0.5), nn.Linear(16, 6))


@pytest.mark.parametrize("use_reentrant", [False, True])
@pytest.mark.parametrize("method", [None, "seed only", "rad:keep=0.5"])
def test_activation_checkpointing_recomputes_the_same_mask(use_reentrant, method):
    """A checkpointed block (restored CPU generator state, as torch.utils.checkpoint does by
    default) gives the gradients of the plain forward for the same global seed; without the
    state restored (positive control) the recomputed masks differ and so do the gradients."""
    torch.manual_seed(0)
    plain = nn.Sequential(_block(), _block())
    if method in (None, "seed only"):
        for block in plain:
            block[2].__class__ = SeededDropout
            block[2].rp_store_mask = method is None
    else:
        rp.convert(plain, method, seed=3)
    ckpt, control = copy.deepcopy(plain), copy.deepcopy(plain)
    x = torch.randn(5, 6)

    def grads(model, preserve=True, use=None):
        torch.manual_seed(7)
        out = x.clone().requires_grad_(use is True)  # reentrant needs an input needing grad
        for block in model:
            if use is None:
                out = block(out)
            else:
                out = checkpoint(block, out, use_reentrant=use, preserve_rng_state=preserve)
        out.square().sum().backward()
        return [p.grad for p in model.parameters()]

    expected = grads(plain)
    got = grads(ckpt, use=use_reentrant)
    for a, b in zip(got, expected, strict=True):
        assert torch.equal(a, b)
    other = grads(control, preserve=False, use=use_reentrant)
    assert not all(torch.equal(a, b) for a, b in zip(other, expected, strict=True))
