"""randprop's attention inside transformers models (skipped without transformers): the same
logits and gradients as the eager implementation, fewer bytes saved, dropout by seed that
activation checkpointing replays."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import randprop as rp
from randprop.methods.attention import use_compact_attention

transformers = pytest.importorskip("transformers")

VOCAB, SEQ = 128, 16


def _gpt2(**overrides):
    config = transformers.GPT2Config(
        n_layer=2, n_embd=64, n_head=4, vocab_size=VOCAB, n_positions=32, **overrides
    )
    return transformers.GPT2LMHeadModel(config)


def _llama(**overrides):
    config = transformers.LlamaConfig(
        num_hidden_layers=2,
        hidden_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        vocab_size=VOCAB,
        max_position_embeddings=32,
        **overrides,
    )
    return transformers.LlamaForCausalLM(config)


def _run(model, ids, mask):
    """Logits, parameter gradients of a loss over the unpadded positions, bytes saved."""
    model.zero_grad()
    with rp.track_saved(model) as saved:
        logits = model(ids, attention_mask=mask, use_cache=False).logits
    logits[:, 3:].square().mean().backward()
    return logits.detach(), [p.grad.clone() for p in model.parameters()], saved.bytes


IMPLEMENTATIONS = {
    "randprop": {},
    "randprop_keep_output": {"keep_output": True},
    "randprop_chunked": {"fused": False},
}


@pytest.mark.parametrize("implementation", list(IMPLEMENTATIONS))
@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("make", [_gpt2, _llama], ids=["gpt2", "llama"])
def test_randprop_attention_equals_eager_and_saves_less(make, padded, implementation):
    model = make().eval()
    ids = torch.randint(0, VOCAB, (2, SEQ))
    mask = None
    if padded:  # left padding: a boolean mask reaches the attention
        mask = torch.ones(2, SEQ, dtype=torch.long)
        mask[1, :3] = 0
    model.set_attn_implementation("eager")
    ref_logits, ref_grads, ref_bytes = _run(model, ids, mask)
    use_compact_attention(model, **IMPLEMENTATIONS[implementation])
    assert model.config._attn_implementation == implementation
    logits, grads, saved = _run(model, ids, mask)
    torch.testing.assert_close(logits[:, 3:], ref_logits[:, 3:], rtol=1e-5, atol=1e-5)
    for g, r in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-5)
    assert saved < ref_bytes


def _dropout_grads(model, ids, seed):
    torch.manual_seed(seed)
    model.zero_grad()
    loss = model(ids, labels=ids, use_cache=False).loss
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters()]


def test_randprop_attention_dropout_replayed_by_gradient_checkpointing():
    """Attention dropout on (the others off): the seed comes from the default CPU generator, so
    torch.manual_seed repeats a step and gradient checkpointing (non-reentrant) recomputes the
    same mask: gradients equal to the plain run's."""
    model = _gpt2(attn_pdrop=0.3, resid_pdrop=0.0, embd_pdrop=0.0).train()
    use_compact_attention(model)
    ids = torch.randint(0, VOCAB, (2, SEQ))
    loss, grads = _dropout_grads(model, ids, seed=0)
    other, _ = _dropout_grads(model, ids, seed=1)
    assert loss != other  # dropout is on and the seed decides it
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ckpt_loss, ckpt_grads = _dropout_grads(model, ids, seed=0)
    torch.testing.assert_close(ckpt_loss, loss, rtol=0, atol=0)
    for g, r in zip(ckpt_grads, grads, strict=True):
        torch.testing.assert_close(g, r)
    model.eval()  # no dropout outside training: the eager logits
    with torch.no_grad():
        compact = model(ids, use_cache=False).logits
        model.set_attn_implementation("eager")
        torch.testing.assert_close(compact, model(ids, use_cache=False).logits)


def test_use_compact_attention_needs_a_transformers_model():
    with pytest.raises(TypeError, match="PreTrainedModel"):
        use_compact_attention(torch.nn.Linear(2, 2))
    with pytest.raises(TypeError, match="keep_output"):
        use_compact_attention(_gpt2(), keep_output="yes")


def test_randprop_does_not_import_transformers():
    code = (
        "import sys, randprop as rp, randprop.functional, randprop.methods.attention; "
        "rp.functional.attention; assert 'transformers' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
