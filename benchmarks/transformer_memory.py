"""Bytes saved for backward by small transformers models (random weights, built from configs):
exact, activation checkpointing, randprop settings, and randprop with checkpointing.

GPT-2 and LLaMA as in the [coverage] issue: 4 layers, hidden 256, 4 heads, vocabulary 2048,
8 x 128 tokens, training mode (dropout on for GPT-2). The loss is the model's own (logits kept)
or, for the "fused loss" rows, rp.functional.linear_cross_entropy on the last hidden state.
randprop rows convert the model (every weight layer, activation, norm and dropout) and switch it
to the compact attention core (PyTorch's fused kernel keeping only Q, K and V, its output
recomputed in backward; the "keeping O" row keeps it, as PyTorch does; GPT-2 trains with
attention dropout, which always runs the chunked Function: Q, K, V and the logsumexp). Figures:
rp.track_saved's peak over forward and backward (each storage once, parameters excluded).
Checkpointing is transformers' gradient_checkpointing_enable with use_reentrant=True, so that a
checkpointed block's recomputation in backward is counted: the default non-reentrant checkpoint
saves its recomputed tensors under its own saved-tensor hooks, which hide them from
rp.track_saved (it would count only the blocks' inputs and what lies outside the blocks), though
they take the same memory.

    PYTHONPATH=src python benchmarks/transformer_memory.py benchmarks/results/transformer-memory.md
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import torch

import randprop as rp
import randprop.functional as rpf
from randprop.experiments import report
from randprop.methods.attention import use_compact_attention

TOKENS = (8, 128)
SETTINGS = ("rad:keep=0.1,bits=4", "rad:keep=0.2,bits=2", "quant:bits=2")
#: reentrant, so that rp.track_saved sees the recomputation (module doc)
CHECKPOINTING = {"use_reentrant": True}


def models():
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    special = {"bos_token_id": 0, "eos_token_id": 0}
    gpt2 = GPT2Config(n_layer=4, n_embd=256, n_head=4, vocab_size=2048, n_positions=128, **special)
    llama = LlamaConfig(num_hidden_layers=4, hidden_size=256, num_attention_heads=4,
                        num_key_value_heads=4, intermediate_size=688, vocab_size=2048,
                        max_position_embeddings=128, pad_token_id=0, **special)  # fmt: skip
    return {
        "GPT-2": (GPT2LMHeadModel(gpt2), lambda m: m.transformer),
        "LLaMA": (LlamaForCausalLM(llama), lambda m: m.model),
    }


def saved_bytes(model, body, ids: torch.Tensor, fused: bool) -> int:
    """Peak bytes held for backward over one forward and backward."""
    model.train()
    with rp.track_saved(model) as saved:
        if fused:
            hidden = body(model)(input_ids=ids).last_hidden_state[:, :-1]
            loss = rpf.linear_cross_entropy(
                hidden.reshape(-1, hidden.shape[-1]), model.lm_head.weight, ids[:, 1:].reshape(-1)
            )
        else:
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
    return saved.bytes


def variants(base):
    """(label, model) of every row: exact, checkpointing, each setting with and without it."""
    yield "exact", copy.deepcopy(base)
    ckpt = copy.deepcopy(base)
    ckpt.gradient_checkpointing_enable(gradient_checkpointing_kwargs=CHECKPOINTING)
    yield "checkpointing", ckpt
    for method in SETTINGS:
        for checkpointing in (False, True):
            model = copy.deepcopy(base)
            rp.convert(model, method)
            use_compact_attention(model)
            if checkpointing:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=CHECKPOINTING)
            label = f"`{method}`" + (" + checkpointing" if checkpointing else "")
            yield label, model
    model = copy.deepcopy(base)
    rp.convert(model, SETTINGS[1])
    use_compact_attention(model, keep_output=True)
    yield f"`{SETTINGS[1]}`, attention keeping O", model


def main(out: Path) -> None:
    torch.manual_seed(0)
    ids = torch.randint(0, 2048, TOKENS)
    lines = [
        "# Bytes saved for backward: small transformers models",
        "",
        f"Command: `PYTHONPATH=src python benchmarks/transformer_memory.py {out}`  ",
        f"Machine: {report.machine()}; {report.date()}; load {report.load()}.",
        "",
        *(part.replace("\n", " ") + "\n" for part in __doc__.split("\n\n")[:2]),
    ]
    for name, (base, body) in models().items():
        rows, exact, ckpt = [], None, None
        for label, model in variants(base):
            plain = saved_bytes(model, body, ids, fused=False)
            fused = saved_bytes(model, body, ids, fused=True)
            exact, ckpt = (
                exact or (plain, fused),
                (plain, fused) if label == "checkpointing" else ckpt,
            )
            rows.append([label, f"{plain / 1e6:.1f} MB", f"{fused / 1e6:.1f} MB",
                         f"{exact[0] / plain:.2f}x / {exact[0] / fused:.2f}x",
                         f"{ckpt[0] / plain:.2f}x / {ckpt[1] / fused:.2f}x" if ckpt else ""])  # fmt: skip
            print(name, *rows[-1], flush=True)
        lines += [f"## {name}", ""]
        lines += report.markdown_table(
            ["setting", "saved (model's loss)", "saved (fused loss)",
             "fewer than exact's (model's loss): model's / fused loss",
             "fewer than checkpointing with the same loss: model's / fused"], rows)  # fmt: skip
        lines.append("")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines))


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "benchmarks/results/transformer-memory.md"))
