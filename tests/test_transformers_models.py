"""GPT-2, LLaMA, BERT and ViT built from tiny transformers configs (random weights, nothing
downloaded) convert with no weight layer skipped; PEFT LoRA adapters convert and train.

Skipped where transformers (or peft) is not installed. Every Embedding is skipped (its backward
keeps only the indices); GPT-2's lm_head, which shares the token embedding's weight, is
converted: its RAD estimate and the embedding's exact gradient add up in the shared parameter.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import randprop as rp
from randprop.methods.projections import is_conv1d

transformers = pytest.importorskip("transformers")

SIZE = dict(hidden=64, layers=2, heads=4, vocab=128, seq=16)
NORMS = ("LayerNorm", "RMSNorm")


def gpt2():
    cfg = transformers.GPT2Config(
        n_embd=SIZE["hidden"], n_layer=SIZE["layers"], n_head=SIZE["heads"],
        vocab_size=SIZE["vocab"], n_positions=SIZE["seq"],
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )  # fmt: skip
    return transformers.GPT2LMHeadModel(cfg), token_batch()


def llama():
    cfg = transformers.LlamaConfig(
        hidden_size=SIZE["hidden"], intermediate_size=2 * SIZE["hidden"],
        num_hidden_layers=SIZE["layers"], num_attention_heads=SIZE["heads"],
        num_key_value_heads=2, vocab_size=SIZE["vocab"], max_position_embeddings=SIZE["seq"],
    )  # fmt: skip
    return transformers.LlamaForCausalLM(cfg), token_batch()


def bert():
    cfg = transformers.BertConfig(
        hidden_size=SIZE["hidden"], intermediate_size=2 * SIZE["hidden"],
        num_hidden_layers=SIZE["layers"], num_attention_heads=SIZE["heads"],
        vocab_size=SIZE["vocab"], max_position_embeddings=SIZE["seq"],
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )  # fmt: skip
    return transformers.BertForMaskedLM(cfg), token_batch()


def vit():
    cfg = transformers.ViTConfig(
        hidden_size=SIZE["hidden"], intermediate_size=2 * SIZE["hidden"],
        num_hidden_layers=SIZE["layers"], num_attention_heads=SIZE["heads"],
        image_size=16, patch_size=4, num_channels=3, num_labels=10,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )  # fmt: skip
    gen = torch.Generator().manual_seed(0)
    return transformers.ViTForImageClassification(cfg), {
        "pixel_values": torch.randn(2, 3, 16, 16, generator=gen),
        "labels": torch.randint(0, 10, (2,), generator=gen),
    }


def token_batch():
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, SIZE["vocab"], (2, SIZE["seq"]), generator=gen)
    return {"input_ids": ids, "labels": ids}


MODELS = {"gpt2": gpt2, "llama": llama, "bert": bert, "vit": vit}


def is_weight_layer(module: nn.Module) -> bool:
    """A layer whose weight multiplies the activations (what randprop estimates)."""
    kinds = (nn.Linear, nn.modules.conv._ConvNd, nn.MultiheadAttention)
    return isinstance(module, kinds) or is_conv1d(module)


@pytest.mark.parametrize("build", MODELS.values(), ids=MODELS.keys())
def test_model_converts_with_no_weight_layer_skipped(build):
    torch.manual_seed(0)
    model, batch = build()
    model.train()
    plain = copy.deepcopy(model)
    report = rp.convert(model, "rad:keep=0.1")
    modules = dict(model.named_modules())
    weight_layers = [n for n, m in plain.named_modules() if is_weight_layer(m)]
    assert weight_layers and set(weight_layers) <= set(report.converted)
    for name, reason in report.skipped.items():
        module = modules[name]
        if isinstance(module, nn.Embedding):
            assert reason.startswith("Embedding: backward keeps only the int indices")
        else:  # the normalisations: not weight layers (their own compact forms are separate)
            assert type(module).__name__.endswith(NORMS), (name, reason)
    if "lm_head" in modules and model.config.tie_word_embeddings:
        assert model.lm_head.weight is model.get_input_embeddings().weight
        assert "lm_head" in report.converted

    out = model(**batch)
    torch.testing.assert_close(out.logits, plain(**batch).logits, rtol=1e-5, atol=1e-5)
    out.loss.backward()
    for name, param in model.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all(), name


def test_gpt2_conv1d_forward_and_gradient_exact_at_keep_one():
    """GPT-2's Conv1D layers through RAD keep=1.0 (exact): gradients equal the plain model's."""
    torch.manual_seed(0)
    model, batch = gpt2()
    model = model.double()
    plain = copy.deepcopy(model)
    rp.convert(model, "rad:keep=1.0", activation_masks=False)  # GELU's k-bit form is not exact
    assert type(model.transformer.h[0].attn.c_attn).__name__ == "RADConv1D_Conv1D"
    model(**batch).loss.backward()
    plain(**batch).loss.backward()
    for (name, p), q in zip(model.named_parameters(), plain.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-9, atol=1e-12, msg=name)


def test_peft_lora_model_converts_and_trains_one_step():
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    model, batch = gpt2()
    config = peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True
    )
    model = peft.get_peft_model(model, config)
    report = rp.convert(model, "rad:keep=0.5")
    lora = [n for n in report.converted if ".lora_A." in n or ".lora_B." in n]
    assert len(lora) == 2 * 2 * SIZE["layers"]  # lora_A and lora_B of two modules per block
    assert any(n.endswith("c_attn.base_layer") for n in report.converted)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    model(**batch).loss.backward()
    trained = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trained and all(".lora_" in n for n in trained)
    for name in trained:
        grad = dict(model.named_parameters())[name].grad
        assert grad is not None and torch.isfinite(grad).all(), name
    opt.step()
    lora_b = [n for n in trained if ".lora_B." in n]
    assert any(not torch.equal(dict(model.named_parameters())[n], before[n]) for n in lora_b)
