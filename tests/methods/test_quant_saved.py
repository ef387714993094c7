"""quantize_saved: k-bit storage of what a model saves for backward, on saved-tensor hooks."""

from __future__ import annotations

import pytest
import torch
from stat_checks import assert_unbiased, unbiasedness_pvalue
from torch import nn

import randprop as rp
from randprop.methods.masks import MaskedReLU
from randprop.methods.quant_saved import quantize_saved


def _mlp(act: nn.Module, width: int = 24, seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(12, width), act, nn.Linear(width, 5))


def _batch(n: int = 16, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 12, generator=gen), torch.randint(0, 5, (n,), generator=gen)


def _grad(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    model.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    return torch.cat([p.grad.flatten() for p in model.parameters()])


def _draws(model: nn.Module, k: int, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """(k quantized gradients, the exact gradient) on one batch."""
    x, y = _batch()
    exact = _grad(model, x, y)
    with quantize_saved(model, min_numel=0, **kwargs):
        draws = torch.stack([_grad(model, x, y) for _ in range(k)])
    return draws, exact


def test_linear_backward_keeps_the_gradient_unbiased():
    """Linear's weight gradient is linear in its saved input: E[g^T Q(x)] = g^T x. ReLU's mask
    is the compact 1-bit one (uint8, left alone), so every float saved is a Linear input."""
    draws, exact = _draws(_mlp(MaskedReLU()), 300, bits=2)
    assert_unbiased(draws, exact)


def test_nonlinear_backward_is_biased_and_the_test_sees_it():
    """Positive control: tanh's backward (1 - Q(y)^2) g is biased at 2 bits, and denying the
    Tanh module (its saved output stays exact) makes the gradient unbiased again."""
    draws, exact = _draws(_mlp(nn.Tanh()), 200, bits=2)
    assert unbiasedness_pvalue(draws, exact) < 1e-6
    draws, exact = _draws(_mlp(nn.Tanh()), 300, bits=2, deny=nn.Tanh)
    assert_unbiased(draws, exact)


def test_forward_and_exact_parts_are_plain():
    """The forward is bitwise plain, and the input gradient of a Linear-only model (it reads
    the weight, never quantized) too."""
    model = nn.Sequential(nn.Linear(12, 32), nn.Linear(32, 5))
    x = _batch()[0].requires_grad_()
    plain = model(x)
    (gx,) = torch.autograd.grad(plain.square().sum(), x)
    with quantize_saved(model, bits=1, min_numel=0) as handle:
        out = model(x)
        (qx,) = torch.autograd.grad(out.square().sum(), x)
    assert torch.equal(out, plain)
    assert handle.quantized == {"0": 1, "1": 1}  # x and the hidden layer; weights left exact
    # dL/dx = 2 out W1 W0: out is the forward output, so the input gradient is exact
    assert torch.equal(qx, gx)


def _big() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(256, 512), MaskedReLU(), nn.Linear(512, 512), MaskedReLU())


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_saved_bytes_shrink_about_32_over_bits(bits):
    model, x = _big(), torch.randn(64, 256)
    with rp.track_saved(model) as plain:
        model(x).sum().backward()
    with quantize_saved(model, bits), rp.track_saved(model) as quant:
        model(x).sum().backward()
    masks = 2 * 64 * 512 // 8  # the two 1-bit ReLU masks, exact either way
    ratio = (plain.bytes - masks) / (quant.bytes - masks)
    assert 0.85 * 32 / bits < ratio <= 32 / bits  # per-row scale and minimum: 8 bytes a row


def test_track_saved_sees_the_codes_whichever_block_is_entered_first():
    """torch applies only the innermost saved-tensor hooks; the model's hooks are pushed when
    it runs, inside track_saved, and hand their codes on to it, so the nesting order of the two
    with-blocks does not matter."""
    model, x = _big(), torch.randn(64, 256)
    with rp.track_saved(model) as plain:
        model(x)
    with rp.track_saved(model) as outer, quantize_saved(model, 4):
        model(x)
    with quantize_saved(model, 4), rp.track_saved(model) as inner:
        model(x)
    assert outer.bytes == inner.bytes < plain.bytes / 6
    assert set(outer.by_module) == {"0", "1", "2", "3"}


def test_a_tensor_saved_three_times_is_quantized_once():
    """tanh saves its output, the next Linear and y * y save it again: one set of codes."""

    class Square(nn.Module):
        def forward(self, y: torch.Tensor) -> torch.Tensor:
            return y * y

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 256), nn.Tanh(), nn.Linear(256, 256), nn.Tanh(), Square())
    x = torch.randn(32, 64)
    with quantize_saved(model, 4, min_numel=0) as handle, rp.track_saved(model) as saved:
        model(x).sum().backward()
    assert handle.quantized == {"0": 1, "1": 1, "3": 1}
    per_row = 256 * 4 // 8 + 8
    assert saved.bytes == 32 * (64 * 4 // 8 + 8) + 2 * 32 * per_row


def test_remove_restores_plain_gradients_and_bytes():
    model = _mlp(nn.Tanh())
    x, y = _batch()
    exact = _grad(model, x, y)
    handle = quantize_saved(model, 2, min_numel=0)
    assert not torch.equal(_grad(model, x, y), exact)
    handle.remove()
    assert torch.equal(_grad(model, x, y), exact)
    with quantize_saved(model, 2, min_numel=0):  # a model takes hooks again after removal
        assert not torch.equal(_grad(model, x, y), exact)
    assert torch.equal(_grad(model, x, y), exact)


def test_a_failing_forward_leaves_no_hooks_behind():
    class Fails(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            raise RuntimeError("boom")

    model = nn.Sequential(nn.Linear(12, 24), nn.Tanh(), Fails())
    x = torch.randn(64, 64, requires_grad=True)
    (exact,) = torch.autograd.grad(torch.tanh(x).sum(), x)
    with quantize_saved(model, 1, min_numel=0) as handle:
        with pytest.raises(RuntimeError, match="boom"):
            model(_batch()[0])
        assert handle.quantized == {"0": 1, "1": 1}  # the hooks were on
        (g,) = torch.autograd.grad(torch.tanh(x).sum(), x)  # outside the model: exact
    assert torch.equal(g, exact)


def test_allow_and_deny_select_modules_by_name_or_class():
    model = nn.Sequential(nn.Linear(12, 24), nn.Tanh(), nn.Linear(24, 24), nn.Sigmoid())
    x = _batch()[0]
    cases = [
        # "2" saves tanh's output: quantized by "1" already unless "1" keeps it exact
        ({}, {"0", "1", "3"}),
        ({"allow": ["0", "2"]}, {"0", "2"}),
        ({"allow": nn.Linear, "deny": "2"}, {"0"}),
        ({"deny": [nn.Tanh, "3"]}, {"0", "2"}),
        ({"allow": ""}, {"0", "1", "3"}),  # the root covers everything inside it
    ]
    for kwargs, expected in cases:
        with quantize_saved(model, 4, min_numel=0, **kwargs) as handle:
            model(x).sum().backward()
        assert set(handle.quantized) == expected, kwargs


def test_converted_layers_are_left_alone_unless_asked():
    model = _mlp(nn.Tanh())
    rp.convert(model, rp.RAD(keep=0.5), activation_masks=False)  # Tanh stays a plain module
    x = _batch()[0]
    with quantize_saved(model, 4, min_numel=0) as handle:
        model(x).sum().backward()
    assert set(handle.quantized) == {"1"}
    with quantize_saved(model, 4, min_numel=0, converted=True) as handle:
        model(x).sum().backward()
    assert {"0", "2"} <= set(handle.quantized)


def test_small_tensors_and_those_codes_would_not_shrink_stay_exact():
    model = nn.Sequential(nn.Linear(12, 2), nn.Tanh())  # tanh's output: rows of 2 elements
    x = _batch()[0]
    with quantize_saved(model, 4) as handle:  # min_numel 1024 > 16 * 12
        model(x).sum().backward()
    assert handle.quantized == {}
    with quantize_saved(model, 4, min_numel=0) as handle:
        model(x).sum().backward()
    assert handle.quantized == {"0": 1}  # 2 floats a row cost 8 bytes, 1 byte + 8 quantized


def test_draws_are_seeded_and_leave_the_global_rng_alone():
    model = _mlp(nn.Tanh())
    x, y = _batch()
    state = torch.get_rng_state()
    runs = []
    for seed in (0, 0, 1):
        with quantize_saved(model, 2, min_numel=0, seed=seed):
            runs.append([_grad(model, x, y), _grad(model, x, y)])
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])
    assert not torch.equal(runs[0][0], runs[0][1])  # each step draws anew
    assert not torch.equal(runs[0][0], runs[2][0])


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"bits": 3}, ValueError, "bits must be one of 1, 2, 4, 8"),
        ({"group": 0}, ValueError, "group must be a positive int or None"),
        ({"allow": [3]}, TypeError, "allow must be None, or fnmatch patterns"),
        ({"deny": [nn.functional.relu]}, TypeError, "deny must be None"),
        ({"deny": "fc*"}, ValueError, "deny pattern 'fc\\*' matches no module name"),
        ({"min_numel": -1}, ValueError, "min_numel must be an int >= 0"),
        ({"converted": 1}, TypeError, "converted must be True or False"),
        ({"seed": 1.5}, TypeError, "seed must be an int"),
    ],
)
def test_bad_arguments_name_the_argument_and_allowed_values(kwargs, error, match):
    with pytest.raises(error, match=match):
        quantize_saved(_mlp(nn.Tanh()), **kwargs)


def test_a_model_takes_one_handle_and_must_be_a_module():
    model = _mlp(nn.Tanh())
    with quantize_saved(model), pytest.raises(ValueError, match="already has quantize_saved"):
        quantize_saved(model)
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        quantize_saved(lambda x: x)
    assert rp.quantize_saved is quantize_saved
