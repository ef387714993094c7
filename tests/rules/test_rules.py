"""FA, DFA and MEM-DFA: exact parts against PyTorch, the DFA formula, MEM-DFA == DFA, memory."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import randprop as rp
from randprop.models.feedforward import mlp
from randprop.rules import DFA, FA, LEARNING_RULES, BlockOutput, MemDFA


def _data(n: int = 8, shape=(1, 28, 28), seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, *shape, generator=gen), torch.randint(0, 10, (n,), generator=gen)


def _grads(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def _assert_close(a: dict, b: dict, **tol) -> None:
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], **tol, msg=name)


def _conv_net() -> nn.Sequential:
    """Conv blocks with batch norm, pooling, grouped / strided / reflect-padded convs, dropout."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=2, padding_mode="reflect"),
        nn.ReLU(),
        nn.Conv2d(8, 6, 3, padding=1, dilation=1, bias=False),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(6 * 7 * 7, 20),
        nn.ReLU(),
        nn.Dropout(0.3),
        nn.Linear(20, 10),
    )


# --- FA ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("make", [lambda: mlp(hidden=24, depth=3), _conv_net])
def test_fa_with_b_equal_w_is_backprop(make):
    model = make().eval()  # eval: no dropout, so both runs see the same function
    x, y = _data()
    ref = copy.deepcopy(model)
    F.cross_entropy(ref(x), y).backward()
    fa = FA(model, loss_fn=F.cross_entropy, seed=1)
    modules = dict(model.named_modules())
    for name, b in fa.feedback.items():
        assert not torch.equal(b, modules[name].weight)  # a real random matrix by default
        b.copy_(modules[name].weight)
    fa.backward(x, y)
    _assert_close(_grads(model), _grads(ref), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "layer",
    [
        nn.Linear(12, 7),
        nn.Linear(12, 7, bias=False),
        nn.Conv1d(4, 6, 3, stride=2, padding=1),
        nn.Conv2d(4, 6, 3, stride=2, padding=2, dilation=2, groups=2),
        nn.Conv2d(4, 6, 3, padding=1, padding_mode="circular", bias=False),
        nn.Conv3d(4, 2, 2),
        nn.Conv2d(4, 6, 4, padding="same", dilation=2),
        nn.Conv2d(4, 6, 3, padding="same", padding_mode="reflect"),
        nn.Conv1d(4, 6, 3, padding="valid"),
    ],
    ids=lambda m: repr(m),
)
def test_fa_layer_exact_parts_and_feedback_input_grad(layer):
    """Forward, dW and db are backprop's; dx is backprop's through a layer whose weight is B."""
    torch.manual_seed(0)
    shape = (3, 5, 12) if isinstance(layer, nn.Linear) else (3, 4, *(9,) * (layer.weight.dim() - 2))
    x = torch.randn(shape, requires_grad=True)
    ref, ref_b = copy.deepcopy(layer), copy.deepcopy(layer)
    fa = FA(layer, seed=3)
    out = layer(x)
    g = torch.randn_like(out)
    (gx,) = torch.autograd.grad(out, x, g, retain_graph=True)
    out.backward(g)
    xr = x.detach().requires_grad_()
    ref_out = ref(xr)
    torch.testing.assert_close(out, ref_out)
    ref_out.backward(g)
    _assert_close(_grads(layer), _grads(ref))
    with torch.no_grad():
        ref_b.weight.copy_(fa.feedback[""])
    (gx_ref,) = torch.autograd.grad(ref_b(x), x, g)
    torch.testing.assert_close(gx, gx_ref)


def test_fa_regenerated_equals_stored_and_remove_restores():
    x, y = _data()
    stored, regen = mlp(hidden=16, depth=2), mlp(hidden=16, depth=2)
    regen.load_state_dict(stored.state_dict())
    keys = list(stored.state_dict())
    fa = FA(stored, loss_fn=F.cross_entropy, seed=5)
    fb = FA(regen, loss_fn=F.cross_entropy, seed=5, store=False)
    assert fb.feedback == {} and fa.layers == fb.layers == ["1", "3", "5"]
    assert list(stored.state_dict()) == keys
    fa.backward(x, y)
    fb.backward(x, y)
    _assert_close(_grads(stored), _grads(regen), rtol=0, atol=0)
    fa.remove()
    assert type(stored[1]) is nn.Linear and not hasattr(stored[1], "rp_fa_seed")


def test_rp_restore_removes_fa():
    """FA's layers are swapped by convert's mechanism: rp.restore gives them back too."""
    model = nn.Sequential(nn.Conv2d(1, 2, 3, padding="same"), nn.Flatten(), nn.Linear(32, 2))
    plain = copy.deepcopy(model)
    fa = FA(model)
    assert fa.layers == ["0", "2"] and type(model[0]).__name__ == "FAConv2d"
    assert rp.restore(model) == ["0", "2"]
    assert [type(m) for m in model] == [type(m) for m in plain]
    assert not any(k.startswith("rp_") for m in model for k in vars(m))
    fa.remove()  # already restored: nothing left to do
    assert [type(m) for m in model] == [type(m) for m in plain]
    rp.convert(model, rp.RAD())  # a plain model again


def test_fa_rejects_bad_input():
    with pytest.raises(ValueError, match="store must be"):
        FA(mlp(), store="yes")
    with pytest.raises(ValueError, match="no nn.Linear"):
        FA(nn.Sequential(nn.ReLU()))
    with pytest.raises(ValueError, match="loss_fn"):
        FA(mlp()).backward(*_data())


# --- DFA --------------------------------------------------------------------------------------


def test_dfa_matches_the_formula():
    """delta_l = (B_l e) * f'(a_l), dW_l = delta_l^T h_{l-1}; the output layer gets e exactly."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3), nn.Flatten()
    )
    x, y = torch.randn(7, 6), torch.randint(0, 3, (7,))
    dfa = DFA(model, loss_fn=F.cross_entropy, seed=2)
    assert dfa.boundaries == [model[1], model[3]]
    dfa.backward(x, y)
    w1, w2, w3 = model[0].weight, model[2].weight, model[4].weight
    with torch.no_grad():
        a1 = x @ w1.T + model[0].bias
        h1 = a1.relu()
        a2 = h1 @ w2.T + model[2].bias
        h2 = a2.tanh()
        out = h2 @ w3.T + model[4].bias
        e = (out.softmax(1) - F.one_hot(y, 3)) / len(y)
        d1 = (e @ dfa.feedback.get(0, 5, 3, x.device).T) * (a1 > 0)
        d2 = (e @ dfa.feedback.get(1, 4, 3, x.device).T) * (1 - h2**2)
    expected = {"0.weight": d1.T @ x, "0.bias": d1.sum(0), "2.weight": d2.T @ h1}
    expected |= {"2.bias": d2.sum(0), "4.weight": e.T @ h2, "4.bias": e.sum(0)}
    _assert_close(_grads(model), expected, rtol=1e-5, atol=1e-6)


def test_dfa_is_inactive_without_grad_and_removable():
    model = mlp(hidden=16, depth=2)
    x, y = _data()
    ref = copy.deepcopy(model)
    dfa = DFA(model, seed=0)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x))
    out = model(x)
    torch.testing.assert_close(out, ref(x))  # the forward pass is exact
    assert out.grad_fn is not None
    dfa.remove()
    F.cross_entropy(model(x), y).backward()
    F.cross_entropy(ref(x), y).backward()
    _assert_close(_grads(model), _grads(ref), rtol=0, atol=0)


def test_block_errors():
    with pytest.raises(ValueError, match="BlockOutput"):
        DFA(nn.Linear(3, 3))
    with pytest.raises(ValueError, match="submodule"):
        DFA(mlp(), blocks=[nn.Linear(2, 2)])
    with pytest.raises(ValueError, match="fewer than two"):
        MemDFA(nn.Sequential(nn.Flatten(), nn.Linear(784, 10)), F.cross_entropy)


# --- MEM-DFA ----------------------------------------------------------------------------------


@pytest.mark.parametrize("make", [lambda: mlp(hidden=32, depth=4), _conv_net])
def test_memdfa_step_equals_dfa_step(make):
    """Same seed, state and batch: equal gradients, equal updated parameters and batch-norm
    statistics (updated once), same dropout masks, and the global RNG left where DFA leaves it."""
    model = make().train()
    twin = copy.deepcopy(model)
    x, y = _data(16)
    dfa, mem = DFA(model, loss_fn=F.cross_entropy, seed=7), MemDFA(twin, F.cross_entropy, seed=7)
    opts = [torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9) for m in (model, twin)]
    for step in range(2):
        for opt in opts:
            opt.zero_grad()
        torch.manual_seed(step)
        loss_dfa = dfa.backward(x, y)
        rng_dfa = torch.get_rng_state()
        torch.manual_seed(step)
        loss_mem = mem.backward(x, y)
        assert torch.equal(torch.get_rng_state(), rng_dfa)
        torch.testing.assert_close(loss_mem, loss_dfa)
        _assert_close(_grads(twin), _grads(model), rtol=1e-5, atol=1e-6)
        for opt in opts:
            opt.step()
    _assert_close(dict(twin.state_dict()), dict(model.state_dict()), rtol=1e-5, atol=1e-6)


class _Marked(nn.Module):
    """Not a Sequential: blocks are marked with BlockOutput, with a residual inside a block."""

    def __init__(self) -> None:
        super().__init__()
        self.inp, self.mid, self.out = nn.Linear(10, 12), nn.Linear(12, 12), nn.Linear(12, 3)
        self.mark1, self.mark2 = BlockOutput(), BlockOutput()

    def forward(self, x):
        h = self.mark1(torch.relu(self.inp(x)))
        h = self.mark2(h + torch.relu(self.mid(h)))
        return self.out(h)


def test_markers_and_block_lists_agree_between_dfa_and_memdfa():
    torch.manual_seed(0)
    x, y = torch.randn(9, 10), torch.randint(0, 3, (9,))
    base = _Marked()
    grads = []
    for rule in ("dfa-markers", "mem-markers", "dfa-list", "mem-list"):
        model = copy.deepcopy(base)
        blocks = None if rule.endswith("markers") else [model.mark1, model.mark2, model.out]
        if rule.startswith("dfa"):
            DFA(model, blocks, loss_fn=F.cross_entropy, seed=4).backward(x, y)
        else:
            MemDFA(model, F.cross_entropy, blocks, seed=4).backward(x, y)
        grads.append(_grads(model))
    for g in grads[1:]:
        _assert_close(g, grads[0], rtol=1e-5, atol=1e-6)
    ref = copy.deepcopy(base)
    F.cross_entropy(ref(x), y).backward()  # the output layer's gradient is exact, the rest not
    torch.testing.assert_close(grads[0]["out.weight"], ref.out.weight.grad)
    assert not torch.allclose(grads[0]["inp.weight"], ref.inp.weight.grad)


def _peak_saved(depth: int, rule: str, width: int = 256, batch: int = 16) -> int:
    torch.manual_seed(0)
    model = mlp(hidden=width, depth=depth)
    x, y = _data(batch)
    with rp.track_saved(model) as saved:
        if rule == "memdfa":
            MemDFA(model, F.cross_entropy).backward(x, y)
        else:
            F.cross_entropy(model(x), y).backward()
    assert saved.current == 0  # everything saved was released again
    return saved.bytes


def test_memdfa_memory_is_constant_in_depth_backprop_linear():
    mem2, mem32 = _peak_saved(2, "memdfa"), _peak_saved(32, "memdfa")
    bp2, bp32 = _peak_saved(2, "bp"), _peak_saved(32, "bp")
    assert mem32 <= 1.25 * mem2
    assert bp32 >= 5 * bp2
    assert mem2 < bp2


@pytest.mark.parametrize("name", ["fa", "dfa", "memdfa"])
def test_registered_rules_train(name):
    """Every registered rule lowers the training loss of an MLP on a fixed random batch."""
    torch.manual_seed(0)
    model = mlp(hidden=32, depth=2)
    x, y = _data(64)
    rule = LEARNING_RULES[name](model, F.cross_entropy, 0)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(30):
        opt.zero_grad()
        losses.append(rule.backward(x, y).item())
        opt.step()
    rule.remove()
    assert losses[-1] < 0.5 * losses[0]
