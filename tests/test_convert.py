import copy

import pytest
import torch
from torch import nn

import randprop as rp
from randprop.methods.masks import MaskedReLU
from randprop.methods.rad import RADConv2d, RADLinear


def small_model():
    return nn.Sequential(
        nn.Conv2d(1, 4, 3),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * 6 * 6, 8),
        nn.LeakyReLU(),
        nn.LayerNorm(8),
        nn.Linear(8, 3),
    )


def test_convert_swaps_classes_in_place_and_shares_parameters():
    model = small_model()
    params = {n: p for n, p in model.named_parameters()}
    keys = list(model.state_dict())
    report = rp.convert(model, rp.RAD(keep=0.1))
    assert isinstance(model[0], RADConv2d) and isinstance(model[0], nn.Conv2d)
    assert isinstance(model[3], RADLinear) and isinstance(model[1], MaskedReLU)
    assert all(p is params[n] for n, p in model.named_parameters())
    assert list(model.state_dict()) == keys
    assert report.converted == ["0", "1", "3", "4", "5", "6"]  # 5: the k-bit LayerNorm
    assert report.skipped == {}
    text = str(report)
    assert "converted: rad:keep=0.1" in text and "LayerNorm" in text and "6 converted" in text


def test_state_dict_round_trips_between_plain_and_converted():
    plain = small_model()
    converted = copy.deepcopy(plain)
    rp.convert(converted, "rad:keep=0.2")
    fresh = small_model()
    fresh.load_state_dict(converted.state_dict())
    other = small_model()
    rp.convert(other, rp.RAD())
    other.load_state_dict(plain.state_dict())
    for a, b, c in zip(plain.parameters(), fresh.parameters(), other.parameters(), strict=True):
        assert torch.equal(a, b) and torch.equal(a, c)


def test_pretrained_weights_are_kept_and_restore_gives_plain_layers():
    model = small_model()
    before = copy.deepcopy(model.state_dict())
    x = torch.randn(2, 1, 8, 8)
    expected = model(x)
    rp.convert(model, rp.RAD())
    torch.testing.assert_close(model(x), expected)
    restored = rp.restore(model)
    assert set(restored) == {"0", "1", "3", "4", "5", "6"}
    assert type(model[0]) is nn.Conv2d and type(model[1]) is nn.ReLU
    assert not hasattr(model[0], "rp_method")
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_filters_and_patterns():
    model = small_model()
    report = rp.convert(model, "rad", target_modules=["3", "6"])
    assert report.converted == ["3", "6"]
    assert report.skipped["0"] == "not matched by target_modules"

    model = small_model()
    report = rp.convert(
        model, rp.RAD(), module_filter_fn=lambda m, name: not isinstance(m, nn.Conv2d)
    )
    assert "0" not in report.converted and report.skipped["0"] == "module_filter_fn returned False"

    model = small_model()
    report = rp.convert(model, {"0": "rad:keep=0.5", "[3-4]": rp.RAD(keep=0.2)})
    assert model[0].rp_method == rp.RAD(keep=0.5) and model[3].rp_method == rp.RAD(keep=0.2)
    assert report.skipped["6"] == "no pattern in the method dict matches"


def test_exact_converts_nothing_and_masks_can_be_disabled():
    model = small_model()
    report = rp.convert(model, rp.Exact())
    assert report.converted == [] and type(model[1]) is nn.ReLU
    assert {report.skipped[n] for n in "036"} == {"exact: kept as plain PyTorch"}
    model = small_model()
    report = rp.convert(model, rp.RAD(), activation_masks=False)
    assert type(model[1]) is nn.ReLU and report.skipped["1"] == "activation_masks=False"


def test_subclasses_and_already_converted_layers_are_skipped_with_reason():
    class MyLinear(nn.Linear):
        def forward(self, x):
            return super().forward(x) * 2

    model = nn.Sequential(MyLinear(3, 3), nn.Linear(3, 3))
    report = rp.convert(model, rp.RAD())
    assert "subclass of Linear" in report.skipped["0"]
    report = rp.convert(model, rp.RAD())
    assert report.skipped["1"] == "already converted"


def test_multihead_attention_projection_is_reported_not_mishandled():
    model = nn.Sequential(nn.MultiheadAttention(8, 2))
    report = rp.convert(model, rp.RAD(), target_modules="*.out_proj")
    assert "MultiheadAttention uses this Linear's weight directly" in report.skipped["0.out_proj"]


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown method"):
        rp.convert(small_model(), "bogus")
    with pytest.raises(ValueError, match="keep"):
        rp.convert(small_model(), {"*": "rad:keep=0"})
    with pytest.raises(TypeError, match="nn.Module"):
        rp.convert("model", rp.RAD())


def test_layer_ids_and_method_state_round_trip():
    model = small_model()
    rp.convert(model, rp.RAD(), seed=3)
    assert [model[i].rp_layer for i in (0, 3, 6)] == [rp.random.name_id(n) for n in "036"]
    model(torch.randn(2, 1, 8, 8))
    state = rp.method_state(model)
    assert state == {"0": 1, "3": 1, "5": 1, "6": 1}  # 5: the k-bit LayerNorm's seed stream
    other = small_model()
    rp.convert(other, rp.RAD(), seed=3)
    rp.load_method_state(other, state)
    assert rp.method_state(other) == state


class _Pair(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Sequential(nn.Linear(6, 5))
        self.b = nn.Sequential(nn.Linear(6, 5))
        with torch.no_grad():
            self.b[0].weight.copy_(self.a[0].weight)
            self.b[0].bias.copy_(self.a[0].bias)


def _weight_grad(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    layer.zero_grad()
    layer(x).square().sum().backward()
    return layer.weight.grad.clone()


def test_layer_ids_follow_qualified_names_across_separate_convert_calls():
    x, base = torch.randn(8, 6), _Pair()
    whole, parts, alone = (copy.deepcopy(base) for _ in range(3))
    rp.convert(whole, rp.RAD(keep=0.2))
    rp.convert(parts.a, rp.RAD(keep=0.2), prefix="a")
    rp.convert(parts.b, rp.RAD(keep=0.2), prefix="b")
    ids = [m.rp_layer for m in (parts.a[0], parts.b[0])]
    assert ids == [whole.a[0].rp_layer, whole.b[0].rp_layer] and ids[0] != ids[1]
    grad_a, grad_b = _weight_grad(parts.a[0], x), _weight_grad(parts.b[0], x)
    # identical layers and inputs, two separate calls: different draws
    assert not torch.equal(grad_a, grad_b)
    # the same as the whole model converted at once (same ids, same seed, same steps)
    torch.testing.assert_close(grad_a, _weight_grad(whole.a[0], x))
    torch.testing.assert_close(grad_b, _weight_grad(whole.b[0], x))
    # without a prefix, same relative names draw the same patterns: the documented pitfall
    rp.convert(alone.a, rp.RAD(keep=0.2))
    rp.convert(alone.b, rp.RAD(keep=0.2))
    assert torch.equal(_weight_grad(alone.a[0], x), _weight_grad(alone.b[0], x))
    with pytest.raises(TypeError, match="prefix must be a str"):
        rp.convert(_Pair(), rp.RAD(), prefix=3)


def test_linear_subclass_without_own_forward_converts_and_restores():
    class Tagged(nn.Linear):
        def describe(self) -> str:
            return "tagged"

    model = nn.Sequential(Tagged(6, 4), nn.Linear(4, 2))
    plain = copy.deepcopy(model)
    report = rp.convert(model, rp.RAD(keep=0.5))
    assert report.converted == ["0", "1"]
    layer = model[0]
    assert (
        isinstance(layer, Tagged) and isinstance(layer, RADLinear) and layer.describe() == "tagged"
    )
    x = torch.randn(5, 6)
    torch.testing.assert_close(model(x), plain(x))  # exact forward
    again = copy.deepcopy(model)  # pickles (same process) as the combined class
    assert type(again[0]) is type(layer)
    assert rp.restore(model) == ["0", "1"] and type(model[0]) is Tagged


def test_convert_and_fa_refuse_each_other():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    rule = rp.rules.FA(model)
    with pytest.raises(ValueError, match=r"layers 0, 2 are under the learning rule rp.rules.FA"):
        rp.convert(model, rp.RAD())
    rule.remove()
    rp.convert(model, rp.RAD())
    with pytest.raises(ValueError, match=r"layers 0, 2 were converted by rp.convert.*rp.restore"):
        rp.rules.FA(model)
    rp.restore(model)
    assert rp.rules.FA(model).layers == ["0", "2"]
