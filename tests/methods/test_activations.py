"""Smooth activations and GLU gates storing k-bit derivatives (randprop.methods.activations)."""

from __future__ import annotations

import copy
import functools
import math

import pytest
import torch
import torch.nn.functional as F
from stat_checks import assert_unbiased, unbiasedness_pvalue
from torch import nn
from torch.utils.checkpoint import checkpoint

import randprop as rp
from randprop.methods import activations as act
from randprop.methods.activations import (
    DEFAULT_BITS,
    QuantGELU,
    QuantSigmoid,
    QuantSiLU,
    QuantTanh,
    quantized_derivative,
    quantized_gate,
)

rpf = rp.functional


def _tanh_gelu_written_out(x: torch.Tensor) -> torch.Tensor:
    """transformers' NewGELUActivation (GPT-2's gelu_new), written out as it is there."""
    return (
        0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))
    )


OPS = {  # name: (ours(x, bits, seed), PyTorch's, derivative)
    "gelu": (rpf.gelu, F.gelu, act.gelu_grad),
    "gelu_tanh": (
        lambda x, **k: rpf.gelu(x, "tanh", **k),
        functools.partial(F.gelu, approximate="tanh"),
        act.gelu_tanh_grad,
    ),
    "silu": (rpf.silu, F.silu, act.silu_grad),
    "tanh": (rpf.tanh, torch.tanh, act.tanh_grad),
    "sigmoid": (rpf.sigmoid, torch.sigmoid, act.sigmoid_grad),
}
GATES = {
    "swiglu": (rpf.swiglu, F.silu, act.silu_grad),
    "geglu": (rpf.geglu, F.gelu, act.gelu_grad),
    "geglu_tanh": (
        lambda a, b, **k: rpf.geglu(a, b, "tanh", **k),
        functools.partial(F.gelu, approximate="tanh"),
        act.gelu_tanh_grad,
    ),
}
MODULES = [
    (QuantGELU(), nn.GELU()),
    (QuantGELU(approximate="tanh", bits=8), nn.GELU(approximate="tanh")),
    (QuantSiLU(bits=2), nn.SiLU()),
    (QuantTanh(), nn.Tanh()),
    (QuantSigmoid(), nn.Sigmoid()),
]


def _exact_grad(fn, *inputs, upstream):
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    return torch.autograd.grad(fn(*leaves), leaves, upstream)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("name", OPS)
def test_forward_is_pytorchs_bitwise_and_gradient_close_at_8_bits(name, dtype):
    ours, ref, _ = OPS[name]
    x = (3 * torch.randn(5, 7, 33)).to(dtype).requires_grad_()
    upstream = torch.randn(5, 7, 33, dtype=dtype)
    y = ours(x, bits=8, seed=3)
    assert torch.equal(y, ref(x)) and y.dtype == dtype
    (grad,) = torch.autograd.grad(y, x, upstream)
    (exact,) = _exact_grad(ref, x, upstream=upstream)
    assert grad.dtype == dtype
    rel = ((grad.double() - exact.double()).norm() / exact.double().norm()).item()
    assert rel < (0.02 if dtype == torch.bfloat16 else 5e-3)


@pytest.mark.parametrize("ours, ref", MODULES, ids=lambda m: type(m).__name__)
def test_modules_forward_bitwise_and_repr(ours, ref):
    x = torch.randn(4, 3, 10, requires_grad=True)
    assert torch.equal(ours(x), ref(x))
    with torch.no_grad():  # no gradient: the plain module, no draw
        assert torch.equal(ours(x), ref(x))
    assert ours.rp_step == 1 and f"bits={ours.rp_bits()}" in repr(ours)


@pytest.mark.parametrize("name", OPS)
def test_backward_is_unbiased_with_positive_controls(name):
    ours, ref, derivative = OPS[name]
    x = 2 * torch.randn(6, 24, dtype=torch.float64)
    upstream = torch.randn(6, 24, dtype=torch.float64)
    (exact,) = _exact_grad(ref, x, upstream=upstream)
    samples = []
    for seed in range(300):
        xs = x.clone().requires_grad_()
        samples.append(torch.autograd.grad(ours(xs, bits=2, seed=seed), xs, upstream)[0])
    samples = torch.stack(samples)
    assert_unbiased(samples, exact)
    assert unbiasedness_pvalue(1.03 * samples, exact) < 1e-4  # a 3% scale error is caught
    xs = x.clone().requires_grad_()
    nearest = quantized_derivative(xs, ref, derivative, bits=2, stochastic=False)
    (biased,) = torch.autograd.grad(nearest, xs, upstream)
    noise = samples - samples.mean(0)  # round to nearest with the same spread: caught
    assert unbiasedness_pvalue(biased + noise, exact) < 1e-4


@pytest.mark.parametrize("name", GATES)
def test_gates_forward_bitwise_and_both_gradients_unbiased(name):
    ours, f, derivative = GATES[name]
    a = 2 * torch.randn(4, 20, dtype=torch.float64)
    b = torch.randn(4, 20, dtype=torch.float64)
    upstream = torch.randn(4, 20, dtype=torch.float64)
    a32, b32 = a.float().requires_grad_(), b.float().requires_grad_()
    assert torch.equal(ours(a32, b32, bits=4, seed=0), f(a32) * b32)
    exact = torch.cat(_exact_grad(lambda s, t: f(s) * t, a, b, upstream=upstream), dim=1)
    samples = []
    for seed in range(300):
        sa, sb = a.clone().requires_grad_(), b.clone().requires_grad_()
        grads = torch.autograd.grad(ours(sa, sb, bits=2, seed=seed), (sa, sb), upstream)
        samples.append(torch.cat(grads, dim=1))
    samples = torch.stack(samples)
    assert_unbiased(samples, exact)
    assert unbiasedness_pvalue(1.03 * samples, exact) < 1e-4
    sa, sb = a.clone().requires_grad_(), b.clone().requires_grad_()
    near = quantized_gate(sa, sb, f, derivative, bits=2, stochastic=False)
    biased = torch.cat(torch.autograd.grad(near, (sa, sb), upstream), dim=1)
    assert unbiasedness_pvalue(biased + samples - samples.mean(0), exact) < 1e-4
    sa, sb = a.clone().requires_grad_(), b.clone().requires_grad_()
    close = torch.cat(torch.autograd.grad(ours(sa, sb, bits=8, seed=1), (sa, sb), upstream), 1)
    assert (close - exact).norm() < 2e-2 * exact.norm()


def test_saved_bytes_are_k_bits_of_one_tensor():
    rows, cols = 64, 1024
    x = torch.randn(rows, cols, requires_grad=True)
    with rp.track_saved() as written_out:
        _tanh_gelu_written_out(x * 1.0)
    with rp.track_saved() as fused:
        F.gelu(x * 1.0, approximate="tanh")
    with rp.track_saved() as ours:
        rpf.gelu(x * 1.0, "tanh", bits=4, seed=0)
    with rp.track_saved() as gate_ref:
        F.silu(x * 1.0) * (x * 2.0)
    with rp.track_saved() as gate:
        rpf.swiglu(x * 1.0, x * 2.0, bits=4, seed=0)
    one = rows * cols * 4
    assert ours.bytes == rows * cols // 2 + rows * 8  # 4 bits per element, scale + min per row
    assert fused.bytes == one and written_out.bytes >= 4 * one
    assert written_out.bytes / ours.bytes > 30 and fused.bytes / ours.bytes > 7.8
    assert gate_ref.bytes == 3 * one and gate.bytes == 2 * ours.bytes


def test_checkpointing_replays_the_quantization():
    torch.manual_seed(0)
    block = nn.Sequential(nn.Linear(6, 16), nn.GELU(), nn.Linear(16, 16), nn.SiLU())
    head = nn.Sequential(nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 3), nn.Sigmoid())
    plain = nn.Sequential(block, head)
    report = rp.convert(plain, "rad:keep=0.5", seed=7)
    assert {"0.1", "0.3", "1.1", "1.3"} <= set(report.converted)
    ckpt = copy.deepcopy(plain)
    x = torch.randn(5, 6)
    for _ in range(2):  # two steps: the step counters advance alike
        grads = []
        for model, wrap in ((plain, False), (ckpt, True)):
            model.zero_grad()
            h = checkpoint(model[0], x, use_reentrant=False) if wrap else model[0](x)
            out = checkpoint(model[1], h, use_reentrant=False) if wrap else model[1](h)
            out.square().sum().backward()
            grads.append([p.grad.clone() for p in model.parameters()])
        for g_plain, g_ckpt in zip(*grads, strict=True):
            assert torch.equal(g_plain, g_ckpt)
    assert rp.method_state(plain) == rp.method_state(ckpt)
    other = copy.deepcopy(plain)  # another step of the seed stream: other draws
    other[0][1].rp_step += 1
    other(x).square().sum().backward()
    ckpt.zero_grad()
    ckpt(x).square().sum().backward()
    assert not torch.equal(other[0][0].weight.grad, ckpt[0][0].weight.grad)


def test_convert_report_restore_and_global_rng():
    model = nn.Sequential(nn.Linear(4, 8), nn.GELU(), nn.SiLU(inplace=True), nn.Linear(8, 2))
    reference = copy.deepcopy(model)
    report = rp.convert(model, "rad:keep=0.5")
    assert isinstance(model[1], QuantGELU) and isinstance(model[2], QuantSiLU)
    assert report.methods["1"] == f"{DEFAULT_BITS}-bit f'(x), stochastic rounding"
    x = torch.randn(3, 4)
    state = torch.get_rng_state()
    assert torch.equal(model(x), reference(x))
    model(x).sum().backward()
    assert torch.equal(torch.get_rng_state(), state)
    assert rp.convert(model, "rad").skipped["1"] == "already converted"
    assert "1" not in rp.convert(copy.deepcopy(reference), "exact").converted
    off = rp.convert(copy.deepcopy(reference), "rad", activation_masks=False)
    assert off.skipped["1"] == "activation_masks=False"
    assert set(rp.restore(model)) == {"0", "1", "2", "3"}
    assert type(model[1]) is nn.GELU and "rp_bits_given" not in model[1].__dict__


def test_inplace_silu_matches_pytorch():
    x = torch.randn(3, 9, requires_grad=True)
    upstream = torch.randn(3, 9)
    ours_in, ref_in = x * 1.0, x * 1.0
    ours = QuantSiLU(inplace=True, bits=8)(ours_in)
    ref = nn.SiLU(inplace=True)(ref_in)
    assert torch.equal(ours, ref) and torch.equal(ours_in, ref)
    (g,) = torch.autograd.grad(ours, x, upstream)
    (g_ref,) = torch.autograd.grad(ref, x, upstream)
    assert (g - g_ref).norm() < 5e-3 * g_ref.norm()


def test_bad_input_names_the_argument():
    x = torch.randn(2, 3, requires_grad=True)
    with pytest.raises(ValueError, match="bits must be one of 1, 2, 4, 8; got 3"):
        rpf.silu(x, bits=3)
    with pytest.raises(ValueError, match="bits must be one of"):
        QuantTanh(bits=16)
    with pytest.raises(ValueError, match="approximate must be 'none' or 'tanh'"):
        rpf.gelu(x, "fast")
    with pytest.raises(TypeError, match="seed must be an int"):
        rpf.sigmoid(x, seed=0.5)
    with pytest.raises(ValueError, match="same shape"):
        rpf.swiglu(x, torch.randn(2, 1))


# --- transformers' models (optional dependency; tiny configs, random weights) --------------------


def _count_saved(model, batch) -> int:
    with rp.track_saved(model) as saved:
        model(batch).logits.sum()
    return saved.bytes


def test_gpt2_activations_convert():
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(
        n_layer=2,
        n_embd=32,
        n_head=2,
        n_positions=16,
        vocab_size=64,
        activation_function="gelu_new",
        bos_token_id=0,
        eos_token_id=0,
    )
    model = transformers.GPT2LMHeadModel(config).eval()  # eval: no dropout, same forward
    reference = copy.deepcopy(model)
    ids = torch.randint(0, 64, (2, 16))
    before = _count_saved(reference, ids)
    report = rp.convert(model, "rad:keep=1.0", target_modules="*.mlp.act")
    assert report.converted == ["transformer.h.0.mlp.act", "transformer.h.1.mlp.act"]
    assert report.kinds["transformer.h.0.mlp.act"] == "NewGELUActivation"
    assert isinstance(model.transformer.h[0].mlp.act, transformers.activations.NewGELUActivation)
    assert torch.equal(model(ids).logits, reference(ids).logits)
    saved = before - _count_saved(model, ids)
    tokens, inner = 2 * 16, 4 * 32
    # PyTorch keeps 4 float tensors of the MLP's width (x, the tanh's input and output, 0.5 x);
    # ours 4 bits per element plus a scale and minimum per row
    assert saved == 2 * (4 * 4 * tokens * inner - (tokens * inner // 2 + tokens * 8))
    model(ids).logits.square().mean().backward()
    assert rp.restore(model) == report.converted


def test_llama_gated_mlp_converts():
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        num_hidden_layers=2,
        hidden_size=32,
        intermediate_size=64,
        num_attention_heads=2,
        num_key_value_heads=2,
        vocab_size=64,
        max_position_embeddings=16,
    )
    model = transformers.LlamaForCausalLM(config)
    reference = copy.deepcopy(model)
    ids = torch.randint(0, 64, (2, 16))
    before = _count_saved(reference, ids)
    report = rp.convert(model, "rad:keep=1.0", target_modules=["*.mlp", "*.mlp.act_fn"])
    mlp = model.model.layers[0].mlp
    assert report.converted == [
        f"model.layers.{i}.{m}" for i in (0, 1) for m in ("mlp", "mlp.act_fn")
    ]
    assert report.methods["model.layers.0.mlp"] == "4-bit f(a) and f'(a) b, stochastic rounding"
    assert isinstance(mlp, act.GatedMLP) and type(mlp).__name__ == "GatedMLP_LlamaMLP"
    assert torch.equal(model(ids).logits, reference(ids).logits)
    tokens, inner = 2 * 16, 64
    # PyTorch keeps a, silu(a) and up(x) (3 float tensors); ours two 4-bit tensors + rows
    assert before - _count_saved(model, ids) == 2 * (
        3 * 4 * tokens * inner - 2 * (tokens * inner // 2 + tokens * 8)
    )
    model(ids).logits.square().mean().backward()
    assert all(p.grad is not None for p in mlp.parameters())
    assert set(rp.restore(model)) == set(report.converted)
    assert type(mlp) is transformers.models.llama.modeling_llama.LlamaMLP


@pytest.mark.parametrize(
    "name",
    [
        "gelu",
        "gelu_new",
        "gelu_fast",
        "gelu_pytorch_tanh",
        "quick_gelu",
        "silu",
        "gelu_accurate",
        "gelu_python",
    ],
)
def test_transformers_activations_are_recognised(name):
    transformers = pytest.importorskip("transformers")
    module = transformers.activations.ACT2FN[name]
    reference = copy.deepcopy(module)
    holder = nn.Sequential(module)
    report = rp.convert(holder, "rad")
    assert report.converted == ["0"]
    x = (3 * torch.randn(6, 40, dtype=torch.float64)).requires_grad_()
    upstream = torch.randn(6, 40, dtype=torch.float64)
    y = holder(x)
    assert torch.equal(y, reference(x))
    holder[0].rp_bits_given = 8
    (grad,) = torch.autograd.grad(holder(x), x, upstream)
    (exact,) = _exact_grad(reference, x, upstream=upstream)
    assert (grad - exact).norm() < 5e-3 * exact.norm()


def test_transformers_activations_without_a_form_are_reported():
    transformers = pytest.importorskip("transformers")
    holder = nn.Sequential(transformers.activations.ACT2FN["mish"])
    report = rp.convert(holder, "rad")
    assert report.skipped == {"0": "Mish has no k-bit form yet; kept exact"}


# The stored derivative codes depend on f'(x) to the last bit (published figures): each derivative
# must equal, bitwise, its expression as first written (the in-place forms only save passes),
# except those now taken from PyTorch's own backward kernels (one pass instead of about ten):
# bitwise autograd's derivative of the fused op, and within float rounding of the expression.
_KERNEL_DERIVATIVES = {
    "gelu": lambda x: F.gelu(x),
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "silu": F.silu,
}
_FROZEN_DERIVATIVES = {
    "gelu": lambda x: (
        0.5 * (1.0 + torch.erf(x * math.sqrt(0.5)))
        + x * torch.exp(-0.5 * x * x) * (1.0 / math.sqrt(2.0 * math.pi))
    ),
    "gelu_tanh": lambda x: (
        lambda t: (
            0.5 * (1.0 + t)
            + 0.5 * x * (1.0 - t * t) * math.sqrt(2.0 / math.pi) * (1.0 + 3 * 0.044715 * x * x)
        )
    )(torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x * x * x))),
    "gelu_fast": lambda x: (
        lambda t: (
            0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * 0.7978845608 * (1.0 + 3 * 0.044715 * x * x)
        )
    )(torch.tanh(0.7978845608 * (x + 0.044715 * x * x * x))),
    "silu": lambda x: (lambda s: s * (1.0 + x * (1.0 - s)))(torch.sigmoid(x)),
    "quick_gelu": lambda x: (lambda s: s + 1.702 * x * s * (1.0 - s))(torch.sigmoid(1.702 * x)),
    "tanh": lambda x: (lambda t: 1.0 - t * t)(torch.tanh(x)),
    "sigmoid": lambda x: (lambda s: s * (1.0 - s))(torch.sigmoid(x)),
}


@pytest.mark.parametrize("kind", sorted(_FROZEN_DERIVATIVES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_derivatives_bitwise_as_first_written(kind, dtype):
    assert set(_FROZEN_DERIVATIVES) == set(act.DERIVATIVES)
    x = (torch.randn(37, 129, generator=torch.Generator().manual_seed(3)) * 3).to(dtype)
    before = x.clone()
    work = x if dtype == torch.float64 else x.float()
    got, want = act.DERIVATIVES[kind](x), _FROZEN_DERIVATIVES[kind](work)
    assert got.dtype == want.dtype
    if kind in _KERNEL_DERIVATIVES:
        leaf = work.clone().requires_grad_()
        (autograd,) = torch.autograd.grad(_KERNEL_DERIVATIVES[kind](leaf).sum(), leaf)
        assert torch.equal(got.view(torch.uint8), autograd.view(torch.uint8))
        torch.testing.assert_close(got, want, rtol=1e-5 if dtype != torch.float64 else 1e-12,
                                   atol=2e-6 if dtype != torch.float64 else 1e-12)  # fmt: skip
    else:
        assert torch.equal(got.view(torch.uint8), want.view(torch.uint8))
    assert torch.equal(x, before)  # the input is never written


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_new_gelu_is_transformers_bitwise(dtype):
    """The in-place GPT-2 GELU (what a converted NewGELUActivation computes) equals transformers'
    own forward bitwise, on odd sizes (vector tails) and a model-sized input."""
    transformers = pytest.importorskip("transformers")
    reference = transformers.activations.NewGELUActivation()
    for shape in [(17,), (3, 1001), (8, 128, 1024)]:
        x = (3 * torch.randn(shape)).to(dtype)
        assert torch.equal(act.new_gelu(x), reference(x))
    holder = nn.Sequential(transformers.activations.NewGELUActivation())
    rp.convert(holder, "quant:bits=2")
    assert type(holder[0]).rp_value is act.new_gelu
    x = torch.randn(4, 33, requires_grad=True)
    assert torch.equal(holder(x), reference(x))
