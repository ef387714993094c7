"""rp.functional.attention: F.scaled_dot_product_attention's values and gradients, no L x S
tensor saved for backward, dropout by seed regenerated in backward."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from stat_checks import assert_unbiased
from torch.utils.checkpoint import checkpoint

import randprop as rp
from randprop import random as rnd

attention = rp.functional.attention


def _qkv(q_shape, kv_shape, ev=7, dtype=torch.float32):
    q = torch.randn(*q_shape, dtype=dtype, requires_grad=True)
    k = torch.randn(*kv_shape, dtype=dtype, requires_grad=True)
    v = torch.randn(*kv_shape[:-1], ev, dtype=dtype, requires_grad=True)
    return q, k, v


def _row_masked_bool(length, source):
    m = torch.rand(length, source) > 0.3
    m[3] = False  # a row attending to nothing gives 0, as PyTorch's kernel
    return m


CASES = {
    "plain": ((2, 3, 13, 8), (2, 3, 11, 8), lambda: None, False, False),
    "causal": ((2, 3, 13, 8), (2, 3, 13, 8), lambda: None, True, False),
    "causal_longer_keys": ((2, 3, 13, 8), (2, 3, 17, 8), lambda: None, True, False),
    "bool_mask": ((2, 3, 13, 8), (2, 3, 11, 8), lambda: _row_masked_bool(13, 11), False, False),
    "float_mask_per_batch": (
        (2, 3, 13, 8),
        (2, 3, 11, 8),
        lambda: torch.randn(2, 1, 13, 11),
        False,
        False,
    ),
    "float_mask_row": ((2, 3, 13, 8), (2, 3, 11, 8), lambda: torch.randn(1, 11), False, False),
    "gqa": ((2, 4, 13, 8), (2, 2, 11, 8), lambda: None, False, True),
    "unbatched": ((13, 8), (11, 8), lambda: None, False, False),
    "broadcast_keys": ((5, 13, 8), (1, 11, 8), lambda: None, False, False),
    "five_dims": ((2, 2, 3, 13, 8), (2, 2, 3, 11, 8), lambda: torch.randn(3, 13, 11), False, False),
}


#: the three paths: fused kernel re-run in backward, fused keeping O, chunked Function
MODES = {
    "fused": {"fused": True},
    "keep_output": {"fused": True, "keep_output": True},
    "chunked": {"fused": False},
}


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("case", list(CASES))
def test_attention_equals_sdpa(case, mode):
    q_shape, kv_shape, make_mask, causal, gqa = CASES[case]
    q, k, v = _qkv(q_shape, kv_shape)
    mask = make_mask()
    kwargs = dict(attn_mask=mask, is_causal=causal, enable_gqa=gqa)
    ref = F.scaled_dot_product_attention(q, k, v, **kwargs)
    out = attention(q, k, v, **kwargs, chunk_size=5, **MODES[mode])
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    grad = torch.randn_like(ref)
    ref_grads = torch.autograd.grad(ref, (q, k, v), grad)
    grads = torch.autograd.grad(out, (q, k, v), grad)
    for g, r in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("case", ["plain", "causal", "float_mask_per_batch", "gqa"])
def test_fused_recompute_gradients_are_sdpas_exactly(case):
    """The fused path re-runs PyTorch's kernel in backward: forward and the gradients of the
    inputs that require grad are bitwise PyTorch's (the same kernel on the same inputs)."""
    q_shape, kv_shape, make_mask, causal, gqa = CASES[case]
    q, k, v = _qkv(q_shape, kv_shape)
    kwargs = dict(attn_mask=make_mask(), is_causal=causal, enable_gqa=gqa)
    ref = F.scaled_dot_product_attention(q, k, v, **kwargs)
    out = attention(q, k, v, **kwargs)
    assert out.grad_fn is not None and "FusedRecompute" in type(out.grad_fn).__name__
    assert torch.equal(out, ref)
    grad = torch.randn_like(ref)
    for wrt in ((q, k, v), (k,)):  # all inputs, and only some needing a gradient
        ref_grads = torch.autograd.grad(ref, wrt, grad, retain_graph=True)
        grads = torch.autograd.grad(out, wrt, grad, retain_graph=True)
        for g, r in zip(grads, ref_grads, strict=True):
            assert torch.equal(g, r)
    q2 = q.detach().requires_grad_(False)  # q needs no gradient: none computed for it
    (dk,) = torch.autograd.grad(attention(q2, k, v, **kwargs), (k,), grad)
    (ref_dk,) = torch.autograd.grad(F.scaled_dot_product_attention(q2, k, v, **kwargs), (k,), grad)
    assert torch.equal(dk, ref_dk)


def test_fused_recompute_under_autocast_is_sdpas():
    """Under autocast the backward re-runs the forward under the same autocast state."""
    q, k, v = _qkv((2, 2, 16, 8), (2, 2, 16, 8), ev=8)
    grad = torch.randn(2, 2, 16, 8)
    results = []
    for fn in (F.scaled_dot_product_attention, attention):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = fn(q.bfloat16(), k.bfloat16(), v.bfloat16(), is_causal=True)
        results.append((out, *torch.autograd.grad(out, (q, k, v), grad.bfloat16())))
    assert results[0][0].dtype == results[1][0].dtype == torch.bfloat16
    for got, ref in zip(results[1], results[0], strict=True):
        assert torch.equal(got, ref)


def test_attention_mask_gradient_equals_sdpa():
    q, k, v = _qkv((2, 3, 13, 8), (2, 3, 11, 8))
    for shape in ((2, 1, 13, 11), (1, 11)):
        mask = torch.randn(shape, requires_grad=True)
        ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        out = attention(q, k, v, attn_mask=mask, chunk_size=4)
        grad = torch.randn_like(ref)
        (ref_grad,) = torch.autograd.grad(ref, mask, grad)
        (got,) = torch.autograd.grad(out, mask, grad)
        torch.testing.assert_close(got, ref_grad, rtol=1e-4, atol=1e-5)


def test_attention_mha_shapes():
    """The shapes nn.MultiheadAttention gives SDPA: (N, H, L, hd) with a merged (N, H, L, S)
    float mask, and its (N * H, L, hd) batch-first view with an (L, S) mask."""
    mha = torch.nn.MultiheadAttention(16, 4, batch_first=True)
    x = torch.randn(2, 9, 16)
    padding = torch.zeros(2, 9, dtype=torch.bool)
    padding[1, -3:] = True
    ref, _ = mha(x, x, x, key_padding_mask=padding, need_weights=False)
    q, k, v = F.linear(x, mha.in_proj_weight, mha.in_proj_bias).chunk(3, dim=-1)
    q, k, v = (t.unflatten(-1, (4, 4)).transpose(1, 2) for t in (q, k, v))
    mask = torch.zeros(2, 1, 1, 9).masked_fill(padding[:, None, None], -torch.inf)
    for fused in (True, False):
        out = attention(q, k, v, attn_mask=mask.expand(2, 4, 9, 9), fused=fused)
        torch.testing.assert_close(mha.out_proj(out.transpose(1, 2).flatten(2)), ref)
    causal = torch.ones(9, 9, dtype=torch.bool).tril()
    flat = [t.flatten(0, 1) for t in (q, k, v)]
    torch.testing.assert_close(
        attention(*flat, attn_mask=causal, fused=False),
        F.scaled_dot_product_attention(*flat, attn_mask=causal),
    )


def test_attention_bfloat16_close_to_sdpa():
    q, k, v = _qkv((2, 2, 16, 8), (2, 2, 16, 8), dtype=torch.bfloat16)
    mask = _row_masked_bool(16, 16)
    ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask)
    out = attention(q, k, v, attn_mask=mask, fused=False)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, rtol=2e-2, atol=2e-2)
    out.sum().backward()
    assert q.grad.dtype == torch.bfloat16 and torch.isfinite(q.grad).all()


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("dropout_p", [0.0, 0.2])
def test_attention_saves_no_score_matrix(mode, dropout_p):
    """Saved: Q, K, V (3 x L x E per head), the logsumexp (L per head) and, from PyTorch's fused
    kernel keeping its output, O; an L x S tensor alone would be 4x larger than that bound
    (S = 256, E = 16). The fused kernel re-run in backward keeps Q, K and V alone (no mask
    given: its boolean mask is converted to a float L x S one, so the chunked path runs)."""
    heads, length, dim = 4, 256, 16
    q, k, v = _qkv((1, heads, length, dim), (1, heads, length, dim), ev=dim)
    mask = torch.rand(length, length) > 0.2
    keeps_o = mode == "keep_output" and not dropout_p
    bound = 4 * heads * ((4 if keeps_o else 3) * length * dim + length)
    for kwargs in ({}, {"is_causal": True}, {"attn_mask": mask}):
        with rp.track_saved(exclude=[mask]) as saved:
            out = attention(q, k, v, dropout_p=dropout_p, chunk_size=64, **MODES[mode], **kwargs)
        assert 0 < saved.bytes <= bound < 4 * heads * length * length
        if mode == "fused" and not dropout_p and "attn_mask" not in kwargs:
            assert saved.bytes == 4 * heads * 3 * length * dim
        out.sum().backward()
    # the positive control: PyTorch's own dropout path keeps the L x S probabilities
    with rp.track_saved() as saved:
        F.scaled_dot_product_attention(q, k, v, dropout_p=0.2)
    assert saved.bytes > 4 * heads * length * length


def _dropout_reference(q, k, v, p, seed, chunk):
    """The same dropout computed by plain autograd: probabilities in full, the keep-mask of each
    chunk of query rows regenerated from (seed, chunk index) by randprop.random."""
    probs = torch.softmax(q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5, dim=-1)
    keeps = []
    for index, r0 in enumerate(range(0, q.shape[-2], chunk)):
        rows = probs[..., r0 : r0 + chunk, :]
        gen = rnd.generator(rnd.derive_seed(seed, layer=index))
        keeps.append(rnd.bernoulli_mask(tuple(rows.shape), 1 - p, gen, rows.device))
    return (probs * torch.cat(keeps, dim=-2) / (1 - p)) @ v


def test_attention_dropout_backward_is_that_of_the_same_mask():
    q, k, v = _qkv((2, 3, 13, 8), (2, 3, 11, 8))
    out = attention(q, k, v, dropout_p=0.3, seed=7, chunk_size=5)
    ref = _dropout_reference(q, k, v, 0.3, seed=7, chunk=5)
    torch.testing.assert_close(out, ref)
    grad = torch.randn_like(ref)
    for g, r in zip(
        torch.autograd.grad(out, (q, k, v), grad),
        torch.autograd.grad(ref, (q, k, v), grad),
        strict=True,
    ):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-5)
    other = attention(q, k, v, dropout_p=0.3, seed=8, chunk_size=5)
    assert not torch.allclose(other, out)  # the seed decides the mask


def test_attention_dropout_is_unbiased():
    """E[dropout output] = the output without dropout (Hotelling T^2 over 300 seeds); the
    positive control, dropout without the 1 / (1 - p) rescaling, is rejected."""
    q, k, v = (t.detach() for t in _qkv((1, 2, 6, 4), (1, 2, 5, 4), ev=3))
    exact = F.scaled_dot_product_attention(q, k, v)
    draws = torch.stack([attention(q, k, v, dropout_p=0.25, seed=s) for s in range(300)])
    assert_unbiased(draws, exact)
    with pytest.raises(AssertionError, match="biased"):
        assert_unbiased(draws * 0.75, exact)


def test_attention_dropout_seed_from_default_generator_and_checkpoint():
    """seed=None draws it from the default CPU generator (torch.manual_seed repeats it), and
    non-reentrant checkpointing replays that draw on recompute: the gradients are those of the
    plain call."""
    q, k, v = _qkv((2, 2, 12, 8), (2, 2, 12, 8))

    def block(q, k, v):
        return attention(q, k, v, dropout_p=0.3, is_causal=True, chunk_size=5) * 2

    def grads(use_checkpoint):
        torch.manual_seed(5)
        out = checkpoint(block, q, k, v, use_reentrant=False) if use_checkpoint else block(q, k, v)
        return (out, *torch.autograd.grad(out.square().sum(), (q, k, v)))

    plain, again, ckpt = grads(False), grads(False), grads(True)
    for a, b, c in zip(plain, again, ckpt, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
        torch.testing.assert_close(c, a, rtol=0, atol=0)
    torch.manual_seed(6)
    assert not torch.equal(block(q, k, v), plain[0])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"dropout_p": 1.5}, "dropout_p"),
        ({"chunk_size": 0}, "chunk_size"),
        ({"is_causal": True, "attn_mask": torch.ones(4, 4, dtype=torch.bool)}, "is_causal"),
        ({"attn_mask": torch.ones(4, 4, dtype=torch.int64)}, "attn_mask"),
    ],
)
def test_attention_bad_arguments(kwargs, match):
    q, k, v = _qkv((1, 2, 4, 8), (1, 2, 4, 8))
    with pytest.raises(ValueError, match=match):
        attention(q, k, v, **kwargs)
    with pytest.raises(ValueError, match="share E"):
        attention(q, k[..., :4], v)
    with pytest.raises(ValueError, match="enable_gqa"):
        attention(q, k[:, :1].expand(1, 1, 4, 8), v, enable_gqa=True)
