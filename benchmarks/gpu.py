"""Peak GPU memory and step time on one GPU ([scale] item 5): the MLP ("mlp"), the
ResNet-18-style net ("resnet18") and the GPT-2-style transformers config of the [coverage] issue
(4 layers, hidden 256, 4 heads, 8 x 128 tokens, vocabulary 2048; random weights), each with exact
backprop, activation checkpointing, the best randprop settings of
benchmarks/results/transformer-memory.md, and (GPT-2) those settings with checkpointing.

    PYTHONPATH=src .venv/bin/python benchmarks/gpu.py                # on a GPU, < 8 minutes
    PYTHONPATH=src .venv/bin/python benchmarks/gpu.py --dry --out DIR  # CPU, tiny, seconds

Writes OUT/report.md and OUT/results.json (OUT: benchmarks/results/gpu). Each row trains a fresh
copy of one model (AdamW, random data of the model's input shape, fixed seed) for WARMUP steps,
then STEPS timed steps (torch.cuda.synchronize around each); peak: torch.cuda.max_memory_allocated
over the timed steps (parameters, gradients, optimizer state and activations; reset after the
warm-up), also given above the memory held before the first timed step. --dry runs the same code
on the CPU at 1 thread with tiny sizes and one timed step, where the allocator's peak is not available (null).
GPT-2 rows need transformers (pip install transformers --no-deps); without it they are skipped
and the report says so.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import randprop as rp
from randprop.experiments import report
from randprop.methods.attention import use_compact_attention
from randprop.models import build_model, input_shape
from randprop.train import install_checkpointing

SETTINGS = ("rad:keep=0.2,bits=2", "rad:keep=0.1,bits=4", "quant:bits=2")
#: (batch, warm-up steps, timed steps) on a GPU and in the dry run
FULL = {"mlp": 256, "resnet18": 128, "warmup": 3, "steps": 20}
DRY = {"mlp": 8, "resnet18": 2, "warmup": 1, "steps": 1}
#: ResNet-18-style base width (the registered model's default on a GPU)
WIDTH = {False: 16, True: 4}


def gpt2(dry: bool):
    """(model, token ids) of the GPT-2-style config (tiny in the dry run), or None without
    transformers."""
    try:
        from transformers import GPT2Config, GPT2LMHeadModel
    except ImportError:
        return None
    layers, hidden, heads, tokens, vocab = (2, 32, 2, (2, 16), 64) if dry else (4, 256, 4, (8, 128), 2048)  # fmt: skip
    config = GPT2Config(n_layer=layers, n_embd=hidden, n_head=heads, vocab_size=vocab,
                        n_positions=tokens[1], bos_token_id=0, eos_token_id=0)  # fmt: skip
    gen = torch.Generator().manual_seed(0)
    return GPT2LMHeadModel(config), torch.randint(0, vocab, tokens, generator=gen)


def variants(name: str, base: nn.Module):
    """(label, model) per row: exact, checkpointing, each randprop setting (GPT-2: also with
    checkpointing)."""
    yield "exact", copy.deepcopy(base)
    model = copy.deepcopy(base)
    if name == "gpt2":
        model.gradient_checkpointing_enable()
    else:
        install_checkpointing(model)
    yield "checkpointing", model
    for setting in SETTINGS:
        for checkpointing in (False, True) if name == "gpt2" else (False,):
            model = copy.deepcopy(base)
            rp.convert(model, setting)
            if name == "gpt2":
                use_compact_attention(model)
                if checkpointing:
                    model.gradient_checkpointing_enable()
            yield f"`{setting}`" + (" + checkpointing" if checkpointing else ""), model


def cases(dry: bool, sizes: dict, device: torch.device) -> dict[str, tuple[nn.Module, Callable]]:
    """{model name: (model, loss of the model on its fixed batch, on ``device``)}."""
    gen = torch.Generator().manual_seed(0)
    out: dict[str, tuple[nn.Module, Callable]] = {}
    for name in ("mlp", "resnet18"):
        x = torch.randn(sizes[name], *input_shape(name), generator=gen).to(device)
        y = torch.randint(0, 10, (sizes[name],), generator=gen).to(device)
        model = build_model(name, width=WIDTH[dry]) if name == "resnet18" else build_model(name)
        out[name] = (model, lambda m, x=x, y=y: F.cross_entropy(m(x), y))
    built = gpt2(dry)
    if built is not None:
        model, ids = built[0], built[1].to(device)
        out["gpt2"] = (model, lambda m, ids=ids: m(input_ids=ids, labels=ids).loss)
    return out


def measure(model: nn.Module, loss_fn: Callable, device: torch.device, sizes: dict) -> dict:
    """Median step time (s) and the allocator's peak over the timed steps (bytes; None off
    CUDA), with the bytes held before them."""
    cuda = device.type == "cuda"
    model.to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)

    def step() -> float:
        if cuda:
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss_fn(model).backward()
        opt.step()
        if cuda:
            torch.cuda.synchronize(device)
        return time.perf_counter() - start

    for _ in range(sizes["warmup"]):
        step()
    held = None
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
        held = torch.cuda.memory_allocated(device)
    times = [step() for _ in range(sizes["steps"])]
    peak = torch.cuda.max_memory_allocated(device) if cuda else None
    return {"step_s": statistics.median(times), "peak_bytes": peak, "held_bytes": held}


def write(out: Path, rows: list[dict], header: list[str], skipped: list[str]) -> None:
    """OUT/report.md (a table per model, ratios to exact) and OUT/results.json."""
    lines = [*header, ""]
    for name in dict.fromkeys(r["model"] for r in rows):
        mine = [r for r in rows if r["model"] == name]
        exact = mine[0]
        table = []
        for r in mine:
            peak = r["peak_bytes"]
            table.append([
                r["setting"],
                "n/a" if peak is None else f"{peak / 2**20:.1f} MiB",
                "n/a" if peak is None else f"{(peak - r['held_bytes']) / 2**20:.1f} MiB",
                "n/a" if peak is None else f"{exact['peak_bytes'] / peak:.2f}x",
                f"{r['step_s'] * 1e3:.1f}",
                f"{r['step_s'] / exact['step_s']:.2f}x",
            ])  # fmt: skip
        lines += [f"## {name}", ""]
        lines += report.markdown_table(
            ["setting", "peak allocated", "peak above held before the steps",
             "exact / peak", "step ms (median)", "step / exact"], table)  # fmt: skip
        lines.append("")
    lines += [f"Skipped: {s}" for s in skipped]
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.md").write_text("\n".join(lines) + "\n")
    (out / "results.json").write_text(json.dumps({"rows": rows, "skipped": skipped}, indent=1))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry", action="store_true", help="CPU, tiny sizes, few steps")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/gpu"))
    args = parser.parse_args(argv)
    if not args.dry and not torch.cuda.is_available():
        parser.error("no CUDA device: run with --dry on the CPU")
    device = torch.device("cpu" if args.dry else "cuda")
    if args.dry:
        torch.set_num_threads(1)
    sizes = DRY if args.dry else FULL
    start, load = time.time(), report.load()
    torch.manual_seed(0)
    rows = []
    models = cases(args.dry, sizes, device)
    for name, (base, loss_fn) in models.items():
        for label, model in variants(name, base):
            rows.append({"model": name, "setting": label, **measure(model, loss_fn, device, sizes)})
            print(rows[-1], flush=True)
            del model
            if device.type == "cuda":
                torch.cuda.empty_cache()
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "none (dry run on CPU)"
    header = [
        "# Peak GPU memory and step time" + (" (dry run: CPU, tiny sizes)" if args.dry else ""),
        "",
        f"Command: `PYTHONPATH=src .venv/bin/python benchmarks/gpu.py{' --dry' if args.dry else ''}"
        f" --out {args.out}`  ",
        f"Machine: {report.machine()}; GPU: {gpu}; {report.date()}; load {load} at the start; "
        f"{time.time() - start:.0f} s.",
        "",
        f"Batches: mlp {sizes['mlp']}, resnet18 {sizes['resnet18']} (width {WIDTH[args.dry]}), "
        "GPT-2 "
        f"{'2 x 16 tokens, tiny config' if args.dry else '8 x 128 tokens'}; AdamW; "
        f"{sizes['warmup']} warm-up steps, then {sizes['steps']} timed steps. Peak: "
        "torch.cuda.max_memory_allocated over the timed steps (parameters, gradients, AdamW "
        "state, batch and activations), and above the bytes held before them.",
    ]
    skipped = [] if "gpt2" in models else ["gpt2: transformers is not installed"]
    write(args.out, rows, header, skipped)


if __name__ == "__main__":
    main()
