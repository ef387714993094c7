"""transformers' Conv1D (by duck typing) and nn.MultiheadAttention's projections under every
Linear method: exact forward, exact gradients where the method is exact, unbiased where not."""

from __future__ import annotations

import copy

import pytest
import torch
from stat_checks import assert_unbiased
from torch import nn

import randprop as rp

LINEAR_METHODS = ["rad:keep=0.5", "crs:keep=0.5", "aop:keep=0.5", "vjp:density=0.5", "quant:bits=2"]


class Conv1D(nn.Module):
    """transformers.pytorch_utils.Conv1D as GPT-2 has it (copied: no transformers needed)."""

    def __init__(self, nf: int, nx: int) -> None:
        super().__init__()
        self.nf, self.nx = nf, nx
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.5)
        self.bias = nn.Parameter(torch.randn(nf))

    def forward(self, x):
        size_out = x.size()[:-1] + (self.nf,)
        return torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight).view(size_out)


def grads(model, x, upstream):
    model.zero_grad(set_to_none=True)
    out = model(x)
    (out * upstream).sum().backward()
    return out.detach(), [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("method", LINEAR_METHODS)
def test_conv1d_converts_and_forward_is_exact(method):
    model = nn.Sequential(Conv1D(6, 4)).double()
    plain = copy.deepcopy(model)
    report = rp.convert(model, method)
    assert report.converted == ["0"] and isinstance(model[0], Conv1D)
    assert list(model.state_dict()) == ["0.weight", "0.bias"]
    x = torch.randn(2, 5, 4, dtype=torch.float64, requires_grad=True)
    upstream = torch.randn(2, 5, 6, dtype=torch.float64)
    out, g = grads(model, x, upstream)
    out_p, g_p = grads(plain, x, upstream)
    assert torch.equal(out, out_p)
    assert all(a.shape == b.shape and torch.isfinite(a).all() for a, b in zip(g, g_p, strict=True))
    assert rp.restore(model) == ["0"] and type(model[0]) is Conv1D


def test_conv1d_rad_keep_one_is_exact_and_keep_half_unbiased():
    layer = Conv1D(5, 4).double()
    x = torch.randn(3, 7, 4, dtype=torch.float64)
    upstream = torch.randn(3, 7, 5, dtype=torch.float64)
    exact = grads(layer, x, upstream)[1][0]
    full = copy.deepcopy(layer)
    rp.convert(full, "rad:keep=1.0")
    torch.testing.assert_close(grads(full, x, upstream)[1][0], exact, rtol=1e-12, atol=1e-12)
    half = copy.deepcopy(layer)
    rp.convert(half, "rad:keep=0.5", seed=3)
    draws = torch.stack([grads(half, x, upstream)[1][0] for _ in range(400)])
    assert_unbiased(draws, exact)
    with pytest.raises(AssertionError, match="biased"):  # the check has power
        assert_unbiased(draws * 1.1, exact)


def test_not_a_conv1d_by_shape_is_left_alone():
    layer = Conv1D(6, 4)
    layer.nf = 5  # weight (4, 6) no longer matches (nx, nf)
    report = rp.convert(nn.Sequential(layer), "rad")
    assert report.converted == [] and "does not support Conv1D" in report.skipped["0"]


MHA_CASES = {
    "self-seq-first": dict(kw={}, cross=False),
    "self-batch-first": dict(kw=dict(batch_first=True), cross=False),
    "cross-kv-shared": dict(kw=dict(batch_first=True), cross="kv"),
    "cross-separate": dict(kw={}, cross="qkv"),
    "kdim-vdim": dict(kw=dict(kdim=3, vdim=5, batch_first=True), cross="qkv"),
    "bias-kv-zero-attn": dict(kw=dict(add_bias_kv=True, add_zero_attn=True), cross=False),
    "no-bias": dict(kw=dict(bias=False, batch_first=True), cross=False),
}


def mha_inputs(mha, cross, seq=5, batch=3):
    gen = torch.Generator().manual_seed(1)
    e = mha.embed_dim

    def make(dim, length):
        shape = (batch, length, dim) if mha.batch_first else (length, batch, dim)
        return torch.randn(shape, dtype=torch.float64, generator=gen)

    q = make(e, seq)
    if not cross:
        return q, q, q
    k = make(mha.kdim, seq + 1)
    return q, k, (k if cross == "kv" and mha.kdim == mha.vdim else make(mha.vdim, seq + 1))


def mha_call(mha, q, k, v, upstream, **kwargs):
    mha.zero_grad(set_to_none=True)
    out, weights = mha(q, k, v, **kwargs)
    (out * upstream).sum().backward()
    return out.detach(), weights, {n: p.grad.clone() for n, p in mha.named_parameters()}


@pytest.mark.parametrize("case", MHA_CASES.values(), ids=MHA_CASES.keys())
@pytest.mark.parametrize("need_weights", [True, False])
@pytest.mark.parametrize("masks", [False, True])
def test_multihead_attention_forward_exact_and_rad_keep_one_gradients_exact(
    case, need_weights, masks
):
    torch.manual_seed(0)
    plain = nn.MultiheadAttention(8, 2, dtype=torch.float64, **case["kw"])
    model = copy.deepcopy(nn.Sequential(plain))
    report = rp.convert(model, "rad:keep=1.0")
    assert report.converted == ["0", "0.out_proj"] and not report.skipped
    q, k, v = mha_inputs(plain, case["cross"])
    kwargs = dict(need_weights=need_weights)
    if masks:
        t, s = q.shape[1 if plain.batch_first else 0], k.shape[1 if plain.batch_first else 0]
        kwargs["attn_mask"] = torch.ones(t, s, dtype=torch.bool).triu(1 + s - t)
        kwargs["key_padding_mask"] = torch.zeros(3, s, dtype=torch.bool)
        kwargs["key_padding_mask"][0, -1] = True
    upstream = torch.randn_like(plain(q, k, v, need_weights=False)[0])
    out_p, w_p, g_p = mha_call(plain, q, k, v, upstream, **kwargs)
    out, w, g = mha_call(model[0], q, k, v, upstream, **kwargs)
    torch.testing.assert_close(out, out_p, rtol=1e-13, atol=1e-13)
    assert (w is None) == (w_p is None) and (w is None or torch.allclose(w, w_p, atol=1e-13))
    assert g.keys() == g_p.keys()
    for name in g:
        torch.testing.assert_close(g[name], g_p[name], rtol=1e-10, atol=1e-10)


def test_multihead_attention_is_causal_unbatched_and_no_grad_match():
    plain = nn.MultiheadAttention(8, 2, dtype=torch.float64)
    model = copy.deepcopy(plain)
    rp.convert(model, "rad:keep=0.5")
    x = torch.randn(6, 2, 8, dtype=torch.float64)
    mask = nn.Transformer.generate_square_subsequent_mask(6, dtype=torch.float64)
    for kwargs in (dict(need_weights=False, is_causal=True), dict(need_weights=True)):
        out, _ = model(x, x, x, attn_mask=mask, **kwargs)
        torch.testing.assert_close(out, plain(x, x, x, attn_mask=mask, **kwargs)[0])
    u = x[:, 0]
    torch.testing.assert_close(model(u, u, u)[0], plain(u, u, u)[0])
    with torch.no_grad():
        torch.testing.assert_close(model(x, x, x)[0], plain(x, x, x)[0])


@pytest.mark.parametrize(
    "method, control", [("rad:keep=0.5", 1.1), ("vjp:density=0.5", 1.3), ("quant:bits=2", 1.1)]
)
@pytest.mark.parametrize("cross", [False, "qkv"])
def test_multihead_attention_gradients_unbiased(method, control, cross):
    """Unbiased; and a scale error of ``control`` is rejected from the same draws (power)."""
    torch.manual_seed(0)
    plain = nn.MultiheadAttention(6, 2, dtype=torch.float64)
    model = copy.deepcopy(plain)
    rp.convert(nn.Sequential(model), method, seed=5)
    q, k, v = mha_inputs(plain, cross, seq=4, batch=2)
    upstream = torch.randn_like(plain(q, k, v)[0])
    exact = torch.cat([g.flatten() for g in mha_call(plain, q, k, v, upstream)[2].values()])
    draws = torch.stack(
        [
            torch.cat([g.flatten() for g in mha_call(model, q, k, v, upstream)[2].values()])
            for _ in range(300)
        ]
    )
    assert_unbiased(draws, exact)
    with pytest.raises(AssertionError, match="biased"):
        assert_unbiased(draws * control, exact)


def test_transformer_encoder_layer_converts_every_weight_layer():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 4, dim_feedforward=32, dropout=0.0, batch_first=True)
    plain = copy.deepcopy(layer)
    report = rp.convert(layer, "rad:keep=0.1")
    weighted = {"self_attn", "self_attn.out_proj", "linear1", "linear2"}
    assert weighted | {"norm1", "norm2"} <= set(report.converted)  # norms: k-bit x_hat
    assert not report.skipped
    x = torch.randn(2, 5, 16)
    torch.testing.assert_close(layer(x), plain(x), rtol=1e-6, atol=1e-6)
    layer(x).sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in layer.parameters())


@pytest.mark.parametrize("method", ["crs", "aop"])
def test_out_proj_of_an_unconverted_attention_is_reported(method):
    report = rp.convert(nn.Sequential(nn.MultiheadAttention(8, 2)), method)
    assert "does not support MultiheadAttention" in report.skipped["0"]
    assert "MultiheadAttention uses this Linear's weight directly" in report.skipped["0.out_proj"]


def test_embedding_report_says_nothing_to_compress():
    report = rp.convert(nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 2)), "rad")
    assert report.skipped["0"] == (
        "Embedding: backward keeps only the int indices; nothing to compress"
    )
