"""randprop on the models people train: a character-level Shakespeare language model (GPT-2-style
and LLaMA-style, built from transformers configs), a ViT and a ResNet-18-style net on MNIST
(CIFAR-10 for the ResNet when its files are given).

Per model the same settings, each trained for the same number of steps: exact backprop;
activation checkpointing (transformers' ``gradient_checkpointing_enable``, else per block);
randprop settings (every weight layer, activation, norm, dropout converted; the compact attention
core and, for the language models, the fused lm-head + cross-entropy); a randprop setting with
checkpointing; and the memory-matched smaller batch (exact backprop at the largest batch whose
measured saved bytes do not exceed a randprop setting's). Measured per run: bytes saved for
backward (``rp.track_saved`` over a forward and backward; under non-reentrant checkpointing
the hooks see what the forward keeps, not the block recomputed in backward), the peak
memory of a whole step (``randprop.measure.peak``), the median step time, the validation loss
along the run, and at the end the validation loss (language models) or test accuracy (images).

Every finished run is written to OUT/runs/ at once and the report is rewritten after it, so an
interrupted suite loses at most the run in progress; run it again with the same OUT to resume.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import math
import sys
import time
from collections.abc import Sequence
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import randprop as rp
from randprop.checkpointing import install_checkpointing
from randprop.data import Splits, load_dataset
from randprop.data.sources import cifar_folder
from randprop.experiments import report
from randprop.experiments.registry import check_tasks, suite
from randprop.measure.peak import peak_memory, state_tensors
from randprop.methods.loss import linear_cross_entropy
from randprop.models import build_model
from randprop.random import STREAM_INIT, derive_seed
from randprop.train.baselines import largest_batch
from randprop.train.loop import batch_indices

RAD, QUANT = "rad:keep=0.2,bits=2", "quant:bits=2"


@dataclasses.dataclass(frozen=True)
class Setting:
    """One row: ``method`` converted (None: exact; a dict: per-layer methods, as rp.convert takes
    them), checkpointing, the fused lm-head loss (language
    models), or the exact small batch matched to the saved bytes of the setting ``matched_to``.
    ``all_seeds`` False: the first seed only (checkpointing computes the same gradients as the
    setting without it, so it is run for its memory and time)."""

    label: str
    method: str | dict[str, str] | None = None
    checkpointing: bool = False
    matched_to: str | None = None
    all_seeds: bool = True


SETTINGS = {
    "full": [
        Setting("exact"),
        Setting("checkpointing", checkpointing=True, all_seeds=False),
        Setting(f"`{RAD}`", RAD),
        Setting(f"`{QUANT}`", QUANT),
        Setting(f"`{QUANT}` + checkpointing", QUANT, checkpointing=True, all_seeds=False),
        Setting("small batch", matched_to=f"`{QUANT}`"),
    ],
}
#: LLaMA: one seed, so the randprop + checkpointing row (same gradients) is left out
SETTINGS["no-rp-ckpt"] = [s for s in SETTINGS["full"] if not (s.method and s.checkpointing)]


@dataclasses.dataclass(frozen=True)
class Task:
    """One model on one dataset: ``kind`` "lm" (val loss after the steps) or "image" (test
    accuracy); ``size`` the model's dimensions; ``eval_examples`` validation examples
    evaluated every ``eval_every`` steps (language model: windows of ``context`` characters);
    ``schedule`` the learning-rate factor after the linear warm-up: "constant", or "cosine"
    0.5 (1 + cos(pi t / steps)), decaying to 0 at the last step."""

    name: str
    title: str
    kind: str
    model: str
    size: dict
    batch: int
    steps: int
    seeds: tuple[int, ...]
    lr: float
    eval_every: int
    eval_examples: int
    test_examples: int = 0
    settings: str = "full"
    warmup: int = 10
    timing_rounds: int = 8
    schedule: str = "constant"


LM_SIZE = {"layers": 4, "hidden": 256, "heads": 4, "context": 128, "intermediate": 688}
QUICK_LM_SIZE = {"layers": 1, "hidden": 32, "heads": 2, "context": 16, "intermediate": 64}


def all_tasks_of(quick: bool) -> list[Task]:
    """The suite's tasks at full scale (sized for about 45 minutes on one shared CPU thread), or
    the seconds-long smoke version."""
    if quick:
        lm = {"size": QUICK_LM_SIZE, "batch": 2, "steps": 2, "seeds": (0,), "lr": 2e-3,
              "eval_every": 1, "eval_examples": 4, "warmup": 1,
              "timing_rounds": 1}  # fmt: skip
        img = {"size": {}, "steps": 2, "seeds": (0,), "lr": 1e-3, "eval_every": 1,
               "eval_examples": 16, "test_examples": 16, "warmup": 1,
               "timing_rounds": 1}  # fmt: skip
        return [
            Task("gpt2", "GPT-2-style char LM (quick)", "lm", "gpt2", **lm),
            Task("vit", "ViT (quick)", "image", "vit", batch=8, **img),
            Task("resnet", "ResNet-18-style (quick)", "image", "resnet18", batch=4, **img),
        ]
    lm = {"size": LM_SIZE, "batch": 8, "lr": 2e-3, "eval_every": 20,
          "eval_examples": 64}  # fmt: skip
    return [
        Task(
            "gpt2",
            "GPT-2-style char LM, Shakespeare",
            "lm",
            "gpt2",
            steps=60,
            seeds=(0, 1, 2),
            **lm,
        ),
        Task(
            "llama",
            "LLaMA-style char LM, Shakespeare",
            "lm",
            "llama",
            steps=40,
            seeds=(0,),
            settings="no-rp-ckpt",
            **lm,
        ),  # fmt: skip
        Task(
            "vit",
            "ViT, MNIST",
            "image",
            "vit",
            {},
            batch=64,
            steps=500,
            seeds=(0, 1, 2),
            lr=1e-3,
            eval_every=100,
            eval_examples=1000,
            test_examples=10000,
        ),  # fmt: skip
        Task(
            "resnet",
            "ResNet-18-style, MNIST",
            "image",
            "resnet18",
            {},
            batch=32,
            steps=120,
            seeds=(0, 1, 2),
            lr=1e-3,
            eval_every=40,
            eval_examples=500,
            test_examples=2000,
        ),  # fmt: skip
    ]


# ---- models and data ----------------------------------------------------------------------


def transformers_lm(kind: str, size: dict, vocab: int) -> nn.Module:
    """A GPT-2- or LLaMA-style causal LM with random weights, from a transformers config."""
    try:
        from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM
    except ImportError as err:
        raise RuntimeError(
            "bench transformer: the language-model part needs the optional package "
            "transformers; install it with `pip install --no-deps transformers` (make venv does)"
        ) from err
    special = {"bos_token_id": 0, "eos_token_id": 0}
    if kind == "gpt2":
        cfg = GPT2Config(n_layer=size["layers"], n_embd=size["hidden"], n_head=size["heads"],
                         vocab_size=vocab, n_positions=size["context"], **special)  # fmt: skip
        return GPT2LMHeadModel(cfg)
    cfg = LlamaConfig(num_hidden_layers=size["layers"], hidden_size=size["hidden"],
                      num_attention_heads=size["heads"], num_key_value_heads=size["heads"],
                      intermediate_size=size["intermediate"], vocab_size=vocab,
                      max_position_embeddings=size["context"], pad_token_id=0, **special)  # fmt: skip
    return LlamaForCausalLM(cfg)


def image_data() -> tuple[str, str]:
    """(dataset, ResNet model): CIFAR-10 when its files are given ($RANDPROP_CIFAR10, set by
    ``randprop bench --data-root``), else MNIST."""
    try:
        cifar_folder(None)
        return "cifar10", "resnet18-cifar"
    except FileNotFoundError:
        return "mnist", "resnet18"


def task_data(task: Task, cache: dict) -> Splits:
    key = ("shakespeare", task.size["context"]) if task.kind == "lm" else (task.model,)
    if key not in cache:
        if task.kind == "lm":
            cache[key] = load_dataset("shakespeare", seq_len=task.size["context"])
        else:
            data = "cifar10" if task.model == "resnet18-cifar" else "mnist"
            cache[key] = load_dataset(data, seed=0)
    return cache[key]


def build(task: Task, setting: Setting, seed: int, splits: Splits) -> nn.Module:
    """The task's model initialised from ``seed``, with ``setting`` installed (global RNG kept)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(seed, stream=STREAM_INIT))
        if task.kind == "lm":
            model = transformers_lm(task.model, task.size, splits.num_classes)
        else:
            model = build_model(task.model)
    model.train()
    if setting.method:
        rp.convert(model, setting.method, seed=seed)
        if task.kind == "lm":
            from randprop.methods.attention import use_compact_attention

            use_compact_attention(model)
    if setting.checkpointing:
        if task.kind == "lm":
            model.gradient_checkpointing_enable()
        else:
            install_checkpointing(model)
    return model


def loss_of(task: Task, setting: Setting, model: nn.Module, x, y) -> torch.Tensor:
    """The training loss; randprop settings of a language model use the fused lm-head +
    cross-entropy on the last hidden state (the logits are never kept)."""
    if task.kind != "lm":
        return F.cross_entropy(model(x), y)
    if setting.method:
        hidden = model.base_model(input_ids=x).last_hidden_state
        hidden = hidden.reshape(-1, hidden.shape[-1])
        return linear_cross_entropy(hidden, model.lm_head.weight, y.reshape(-1))
    logits = model(input_ids=x).logits
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))


@torch.no_grad()
def evaluate(task: Task, model: nn.Module, data, examples: int) -> dict[str, float]:
    """Mean cross-entropy and accuracy (per character / per image) over the first ``examples``."""
    x_all, y_all = (t[:examples] for t in data.tensors)
    model.eval()
    loss_sum, correct, count, chunk = 0.0, 0, 0, 32 if task.kind == "lm" else 500
    for start in range(0, len(x_all), chunk):
        x, y = x_all[start : start + chunk], y_all[start : start + chunk]
        out = model(input_ids=x).logits if task.kind == "lm" else model(x)
        out, y = out.reshape(-1, out.shape[-1]), y.reshape(-1)
        loss_sum += float(F.cross_entropy(out, y, reduction="sum"))
        correct += int((out.argmax(-1) == y).sum())
        count += y.numel()
    model.train()
    return {"loss": loss_sum / count, "accuracy": correct / count}


# ---- measurement ----------------------------------------------------------------------------


def saved_bytes(task: Task, setting: Setting, model: nn.Module, x, y) -> int:
    """Peak bytes held for backward over one forward and backward, on a copy of ``model`` (its
    random streams and the global RNG untouched)."""
    probe = copy.deepcopy(model)
    with torch.random.fork_rng(devices=[]), rp.track_saved(probe) as saved:
        loss_of(task, setting, probe, x, y).backward()
    return saved.bytes


def matched_batches(task: Task, splits: Splits, settings: list[Setting]) -> dict[str, dict]:
    """Per setting some small batch is matched to: {"batch", "budget", "exact_bytes"}: the
    largest batch whose exact saved bytes do not exceed the setting's at the task's batch (at
    least 1; ``exact_bytes`` then says by how much batch 1 exceeds the budget)."""
    x, y = splits.train.tensors
    exact = Setting("exact")
    base = build(task, exact, 0, splits)
    exact_bytes = {}  # batch -> exact's saved bytes

    def fits(b: int, budget: int) -> bool:
        if b not in exact_bytes:
            exact_bytes[b] = saved_bytes(task, exact, base, x[:b].clone(), y[:b].clone())
        return exact_bytes[b] <= budget

    out = {}
    for label in sorted({s.matched_to for s in settings if s.matched_to}):
        target = next(s for s in settings if s.label == label)
        model = build(task, target, 0, splits)
        budget = saved_bytes(task, target, model, x[: task.batch].clone(), y[: task.batch].clone())
        b = max(largest_batch(functools.partial(fits, budget=budget), task.batch), 1)
        fits(b, budget)
        out[label] = {"batch": b, "budget": budget, "exact_bytes": exact_bytes[b]}
    return out


def alternated_times(
    task: Task, settings: list[Setting], batches: dict[str, int], splits: Splits, rounds: int
) -> dict[str, float]:
    """Median step time per setting, the settings' steps interleaved: each round runs one
    training step of every setting (after a first, untimed round), so a change of machine load
    falls on all of them alike. Seed 0's models, the first batch of each setting's size."""
    x_train, y_train = splits.train.tensors
    state = {}
    for s in settings:
        model = build(task, s, 0, splits)
        first = torch.arange(batches[s.label])
        state[s.label] = (s, model, torch.optim.AdamW(model.parameters(), lr=task.lr),
                          x_train[first], y_train[first])  # fmt: skip
    times: dict[str, list[float]] = {s.label: [] for s in settings}
    with torch.random.fork_rng(devices=[]):
        for r in range(rounds + 1):
            for label, (s, model, optimizer, x, y) in state.items():
                t0 = time.perf_counter()
                optimizer.zero_grad(set_to_none=True)
                loss_of(task, s, model, x, y).backward()
                optimizer.step()
                if r:
                    times[label].append(time.perf_counter() - t0)
    return {label: float(np.median(t)) for label, t in times.items()}


def lr_factor(task: Task, step: int) -> float:
    """The learning rate at ``step`` as a fraction of ``task.lr``: linear warm-up over
    ``task.warmup`` steps, times the cosine decay where ``task.schedule`` is "cosine"."""
    if task.schedule not in ("constant", "cosine"):
        raise ValueError(f"schedule must be 'constant' or 'cosine'; got {task.schedule!r}")
    factor = min(1.0, (step + 1) / task.warmup)
    if task.schedule == "cosine":
        factor *= 0.5 * (1 + math.cos(math.pi * step / task.steps))
    return factor


def train_run(task: Task, setting: Setting, seed: int, batch: int, splits: Splits) -> dict:
    """Train one setting for ``task.steps`` steps (AdamW, linear warm-up then ``task.schedule``);
    the batches are a pure function of (seed, step). Returns the run's figures."""
    start = time.perf_counter()
    model = build(task, setting, seed, splits)
    x_train, y_train = splits.train.tensors
    first = torch.arange(batch)
    saved = saved_bytes(task, setting, model, x_train[first], y_train[first])
    optimizer = torch.optim.AdamW(model.parameters(), lr=task.lr)
    curve, losses, times, peak = [], [], [], None
    with torch.random.fork_rng(devices=[]):  # transformers' own dropout draws from it
        torch.manual_seed(derive_seed(seed, stream=STREAM_INIT, step=1))
        for step in range(task.steps):
            idx = batch_indices(len(x_train), batch, seed, step)
            x, y = x_train[idx], y_train[idx]
            for group in optimizer.param_groups:
                group["lr"] = task.lr * lr_factor(task, step)
            tracked = step == min(1, task.steps - 1)  # Adam's state exists from the 2nd step
            held = [*state_tensors(model, optimizer), x, y] if tracked else []
            meter = peak_memory("cpu", held) if tracked else nullcontext()
            t0 = time.perf_counter()
            with meter:
                optimizer.zero_grad(set_to_none=True)
                loss = loss_of(task, setting, model, x, y)
                loss.backward()
                optimizer.step()
            if tracked:
                peak = meter.bytes
            else:
                times.append(time.perf_counter() - t0)
            losses.append(float(loss.detach()))
            if (step + 1) % task.eval_every == 0 or step + 1 == task.steps:
                val = evaluate(task, model, splits.val, task.eval_examples)
                curve.append([step + 1, val["loss"], val["accuracy"]])
    final = {"val_loss": curve[-1][1], "val_accuracy": curve[-1][2]}
    if task.kind == "image":
        test = evaluate(task, model, splits.test, task.test_examples)
        final |= {"test_loss": test["loss"], "test_accuracy": test["accuracy"]}
    return {
        "task": task.name,
        "label": setting.label,
        "method": setting.method or "exact",
        "checkpointing": setting.checkpointing,
        "batch": batch,
        "seed": seed,
        "steps": task.steps,
        **final,
        "saved_bytes": saved,
        "peak_bytes": peak,
        "seconds_per_step": float(np.median(times)) if times else math.nan,
        "train_losses": losses,
        "curve": curve,
        "wall_seconds": time.perf_counter() - start,
    }


# ---- aggregation and report -------------------------------------------------------------------


def _std(values: list[float]) -> float:
    return float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


def aggregate(task: Task, runs: list[dict], timing: dict[str, float] | None = None) -> list[dict]:
    """One row per setting (in table order): means and std over seeds, ratios against exact's
    figures of the same run."""
    rows = []
    for label in dict.fromkeys(r["label"] for r in runs):
        mine = [r for r in runs if r["label"] == label]
        quality = "val_loss" if task.kind == "lm" else "test_accuracy"
        values = [r[quality] for r in mine]
        curve = [[c[0], float(np.mean([r["curve"][i][1] for r in mine]))]
                 for i, c in enumerate(mine[0]["curve"])]  # fmt: skip
        rows.append({
            "label": label, "method": mine[0]["method"], "batch": mine[0]["batch"],
            "checkpointing": mine[0]["checkpointing"], "seeds": [r["seed"] for r in mine],
            "quality": float(np.mean(values)), "quality_std": _std(values),
            "saved_bytes": mine[0]["saved_bytes"],
            "peak_bytes": max((r["peak_bytes"] or 0) for r in mine) or None,
            "seconds_per_step": float(np.median([r["seconds_per_step"] for r in mine])),
            "alternated_seconds_per_step": (timing or {}).get(label),
            "curve": curve,
        })  # fmt: skip
    return add_ratios(rows)


def add_ratios(rows: list[dict]) -> list[dict]:
    """Add to each row its saved bytes and step time against exact's (and its saved bytes
    against checkpointing's, for the rows with checkpointing)."""
    exact = next((r for r in rows if r["label"] == "exact"), None)
    ckpt = next((r for r in rows if r["label"] == "checkpointing"), None)
    for row in rows:
        if exact:
            row["bytes_vs_exact"] = exact["saved_bytes"] / max(row["saved_bytes"], 1)
            row["time_vs_exact"] = row["seconds_per_step"] / exact["seconds_per_step"]
            if row.get("alternated_seconds_per_step") and exact.get("alternated_seconds_per_step"):
                alt = row["alternated_seconds_per_step"] / exact["alternated_seconds_per_step"]
                row["alternated_time_vs_exact"] = alt
        if ckpt and row["checkpointing"]:
            row["bytes_vs_checkpointing"] = ckpt["saved_bytes"] / max(row["saved_bytes"], 1)
    return rows


#: the issue's bounds on the GPT-2-style char LM: validation loss within 3% of exact's and below
#: the memory-matched small batch's; step time (no checkpointing) <= 1.3x exact's
LOSS_RATIO, TIME_RATIO = 1.03, 1.3


def verdict(task: Task, rows: list[dict], matched: dict) -> list[str]:
    """The Done-when lines for a language model: the best randprop setting without
    checkpointing (lowest mean validation loss) against the bounds, each failure by how much."""
    by_label = {r["label"]: r for r in rows}
    exact = by_label.get("exact")
    candidates = [r for r in rows if r["method"] != "exact" and not r["checkpointing"]]
    if not exact or not candidates:
        return []
    best = min(candidates, key=lambda r: r["quality"])
    small = by_label.get("small batch")
    ratio = best["quality"] / exact["quality"]
    lines = [
        f"**{task.title}, {len(best['seeds'])} seed(s), {task.steps} equal steps: the best "
        f"setting is `{best['method']}`** (fused loss), validation loss {best['quality']:.4f} "
        f"± {best['quality_std']:.4f} against exact's {exact['quality']:.4f} ± "
        f"{exact['quality_std']:.4f}; it stores {best['bytes_vs_exact']:.2f}x fewer bytes for "
        "backward than exact.",
        "",
    ]
    met = ratio <= LOSS_RATIO
    lines.append(
        f"- Within {100 * (LOSS_RATIO - 1):.0f}% of exact's validation loss: "
        + (f"**met** ({ratio:.4f}x)." if met else
           f"**failed**: {ratio:.4f}x exact's, {100 * (ratio - LOSS_RATIO):.2f} percentage "
           f"points over the bound ({best['quality'] - exact['quality']:+.4f} nats).")
    )  # fmt: skip
    if small is not None:
        below = best["quality"] < small["quality"]
        lines.append(
            f"- Below the memory-matched small batch's (batch {small['batch']}, matched to "
            f"{', '.join(matched)}; validation loss "
            f"{small['quality']:.4f} ± {small['quality_std']:.4f}): "
            + ("**met**" if below else "**failed**")
            + f" (difference {best['quality'] - small['quality']:+.4f} nats)."
        )
    t = best.get("alternated_time_vs_exact", best["time_vs_exact"])
    how = "in alternation" if "alternated_time_vs_exact" in best else "medians of the runs"
    lines.append(
        f"- Step time <= {TIME_RATIO}x exact's on the same run ({how}): "
        + (f"**met** ({t:.2f}x)." if t <= TIME_RATIO else
           f"**failed**: {t:.2f}x, {t / TIME_RATIO:.2f}x the bound.")
    )  # fmt: skip
    return lines


def _ratio(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}x"


def table(task: Task, rows: list[dict]) -> list[str]:
    quality = "validation loss (nats/char)" if task.kind == "lm" else "test accuracy"
    header = ["setting", "batch", "seeds", quality, "saved bytes", "fewer than exact",
              "fewer than checkpointing", "peak of a step", "s / step in its runs",
              "time vs exact: in its runs / in alternation"]  # fmt: skip
    cells = [[
        r["label"], r["batch"], len(r["seeds"]), f"{r['quality']:.4f} ± {r['quality_std']:.4f}",
        f"{r['saved_bytes'] / 1e6:.2f} MB", f"{r.get('bytes_vs_exact', math.nan):.2f}x",
        f"{r['bytes_vs_checkpointing']:.2f}x" if "bytes_vs_checkpointing" in r else "",
        "n/a" if r["peak_bytes"] is None else f"{r['peak_bytes'] / 1e6:.1f} MB",
        f"{r['seconds_per_step']:.3f}",
        f"{r.get('time_vs_exact', math.nan):.2f}x / " + _ratio(r.get("alternated_time_vs_exact")),
    ] for r in rows]  # fmt: skip
    return report.markdown_table(header, cells)


def plot_curves(tasks_rows: dict[str, list[dict]], titles: dict[str, str], path: Path) -> str:
    """Validation loss against steps (mean over seeds), one panel per task."""
    plt = report.pyplot()
    n = len(tasks_rows)
    fig, axes = plt.subplots(1, n, figsize=(4.8 * n, 3.8), squeeze=False)
    for ax, (name, rows) in zip(axes[0], tasks_rows.items(), strict=True):
        for r in rows:
            steps, loss = zip(*r["curve"], strict=True)
            ax.plot(steps, loss, marker="o", markersize=3, label=r["label"].replace("`", ""))
        ax.set_xlabel("step")
        ax.set_ylabel("validation loss")
        ax.set_title(titles[name], fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    return report.save_figure(fig, path, dpi=110)


def plot_quality(tasks_rows: dict[str, list[dict]], tasks_by: dict[str, Task], path: Path) -> str:
    """Final quality against measured saved bytes (log scale), one panel per task."""
    plt = report.pyplot()
    n = len(tasks_rows)
    fig, axes = plt.subplots(1, n, figsize=(4.8 * n, 3.8), squeeze=False)
    for ax, (name, rows) in zip(axes[0], tasks_rows.items(), strict=True):
        for r in rows:
            ax.errorbar(r["saved_bytes"], r["quality"], yerr=r["quality_std"], fmt="o", capsize=3)
            ax.annotate(r["label"].replace("`", ""), (r["saved_bytes"], r["quality"]),
                        fontsize=6, xytext=(3, 2), textcoords="offset points")  # fmt: skip
        ax.set_xscale("log")
        ax.set_xlabel("bytes saved for backward (measured)")
        ax.set_ylabel("validation loss" if tasks_by[name].kind == "lm" else "test accuracy")
        ax.set_title(tasks_by[name].title, fontsize=9)
        ax.grid(alpha=0.3)
    return report.save_figure(fig, path, dpi=110)


def scale_line(task: Task) -> str:
    what = (f"{task.size['layers']} layers, hidden {task.size['hidden']}, {task.size['heads']} "
            f"heads, context {task.size['context']}; validation loss on the first "
            f"{task.eval_examples} validation windows ({task.eval_examples * task.size['context']:,}"
            " characters)" if task.kind == "lm" else
            f"test accuracy on the first {task.test_examples} test images, validation loss "
            f"on {task.eval_examples} validation images")  # fmt: skip
    return (f"- {task.title}: batch {task.batch}, {task.steps} steps, seeds {list(task.seeds)}, "
            f"AdamW lr {task.lr:g} ({task.warmup}-step linear warm-up); {what}; step times in "
            f"alternation over {task.timing_rounds} rounds.")  # fmt: skip


def write_report(out: Path, all_tasks: list[Task], results: dict, meta: dict) -> str:
    by_name = {t.name: t for t in all_tasks}
    rows = {name: r["rows"] for name, r in results.items() if r["rows"]}
    incomplete = "" if meta.get("complete") else " so far (**incomplete: runs still missing**)"
    lines = report.run_header(
        "randprop on transformers and ResNets: char-LM, ViT, ResNet-18", meta, incomplete
    )
    for name in rows:
        if by_name[name].kind == "lm":
            lines += [*verdict(by_name[name], rows[name], results[name]["matched"]), ""]
    lines += [
        "## Set-up and scale",
        "",
        "Scaled to fit about 45 minutes on one thread of a shared 2-core CPU: far fewer steps "
        "than a real training run, so the figures compare the settings early in training; a "
        "gap can open or close later.",
        "",
        *[scale_line(t) for t in all_tasks if t.name in rows],
        "",
        "Settings: `rad:keep=0.2,bits=2` and `quant:bits=2` convert every weight layer, "
        "activation, norm and dropout (`rp.convert`); the language models also switch to "
        "randprop's attention core (no T x T tensor kept) and train with the fused lm-head + "
        "cross-entropy (`rp.LinearCrossEntropy`'s function) on the last hidden state; the "
        "exact rows use the model's logits. Checkpointing: transformers' "
        "`gradient_checkpointing_enable()` for the language models, `torch.utils.checkpoint` "
        "per block otherwise; checkpointing rows run the first seed only (same gradients as "
        "without it). Small batch: exact backprop at the largest batch whose measured saved "
        "bytes do not exceed the matched setting's (at least 1). Saved bytes: `rp.track_saved` "
        "over one forward and backward, parameters excluded; for the checkpointing rows that is "
        "what the forward keeps (each checkpointed block's input): the block recomputed during "
        "backward (non-reentrant checkpointing) keeps its tensors under checkpointing's own "
        "hooks, which `rp.track_saved` does not see; the peak column counts it, and "
        "benchmarks/results/transformer-memory.md measures it with reentrant checkpointing. Peak: "
        "the whole second step (zero_grad, forward, backward, AdamW's update; parameters, "
        "gradients and optimizer state included), by `randprop.measure.peak`. Time: the median "
        "step time of each run (the runs one after another, so a change of machine load "
        "between runs moves these ratios), and the median over rounds in which every setting "
        "runs one step in turn (seed 0's models, after one untimed round): the fair ratio, "
        "used for the bound. Only ratios mean anything on this shared machine.",
        "",
    ]
    for name, task_rows in rows.items():
        matched = results[name]["matched"]
        lines += [f"## {by_name[name].title}", "", *table(by_name[name], task_rows), ""]
        for label, m in matched.items():
            over = m["exact_bytes"] > m["budget"]
            lines.append(
                f"Small batch matched to {label}: batch {m['batch']} (exact saves "
                f"{m['exact_bytes'] / 1e6:.2f} MB at that batch, the setting "
                f"{m['budget'] / 1e6:.2f} MB at batch {by_name[name].batch}"
                + (": even batch 1 stores more than the setting)." if over else ").")
            )
        lines.append("")
    lines += [
        "![validation loss against steps](loss_vs_steps.png)",
        "",
        "![quality against saved bytes](quality_vs_bytes.png)",
        "",
    ]
    text = "\n".join(lines)
    (out / "report.md").write_text(text)
    return text


def _run_path(runs: Path, task: Task, setting: Setting, seed: int) -> Path:
    slug = "".join(c if c.isalnum() else "-" for c in setting.label.replace("`", "")).strip("-")
    return runs / task.name / f"{slug}-s{seed}.json"


def _log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


#: the suite's tasks by name, in order
TASK_NAMES = ("gpt2", "llama", "vit", "resnet")


@suite(
    "transformer",
    "char-LM GPT-2/LLaMA, ViT, ResNet-18: exact, checkpointing, randprop, small batch",
    TASK_NAMES,
)
def run(out: Path, quick: bool = False, tasks: Sequence[str] = TASK_NAMES) -> dict:
    """Run (or resume from OUT/runs) the suite's tasks named in ``tasks``."""
    asked = check_tasks("transformer", tasks, TASK_NAMES)
    out.mkdir(parents=True, exist_ok=True)
    runs_dir = out / "runs"
    start, load_before = time.time(), report.load()
    all_tasks = [t for t in all_tasks_of(quick) if t.name in tasks]
    try:
        import transformers  # noqa: F401
    except ImportError:
        if not quick:
            transformers_lm("gpt2", LM_SIZE, 2)  # raises the clear error
        _log("bench transformer: transformers is not installed; the language models are skipped")
        all_tasks = [t for t in all_tasks if t.kind != "lm"]
    dataset, resnet = image_data()
    all_tasks = [dataclasses.replace(t, model=resnet, title=t.title.replace("MNIST", "CIFAR-10"))
                 if t.model == "resnet18" and dataset == "cifar10" else t for t in all_tasks]  # fmt: skip
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    cache: dict = {}
    results: dict = {}
    meta = {"command": f"randprop bench transformer{asked} --out {out}" + (" --quick" if quick else ""),
            "machine": report.machine(1), "load_before": load_before}  # fmt: skip

    def save(complete: bool, plots: bool = True) -> dict:
        """Write results.json and report.md (and the plots, slow to draw: not after every run)."""
        meta.update(date=report.date(), load_after=report.load(), complete=complete,
                    minutes=(time.time() - start) / 60)  # fmt: skip
        payload = {"meta": meta, "tasks": [dataclasses.asdict(t) for t in all_tasks],
                   "results": results}  # fmt: skip
        (out / "results.json").write_text(json.dumps(payload, indent=2))
        rows = {name: r["rows"] for name, r in results.items() if r["rows"]}
        if rows and plots:
            by_name = {t.name: t for t in all_tasks}
            plot_curves(rows, {n: by_name[n].title for n in rows}, out / "loss_vs_steps.png")
            plot_quality(rows, by_name, out / "quality_vs_bytes.png")
        write_report(out, all_tasks, results, meta)
        return payload

    try:
        for task in all_tasks:
            splits = task_data(task, cache)
            settings = SETTINGS[task.settings]
            matched_path = runs_dir / task.name / "matched.json"
            if matched_path.exists():
                matched = json.loads(matched_path.read_text())
            else:
                _log(f"[{task.name}] measuring the memory-matched small batch")
                matched = matched_batches(task, splits, settings)
                matched_path.parent.mkdir(parents=True, exist_ok=True)
                matched_path.write_text(json.dumps(matched, indent=2))
            task_runs: list[dict] = []
            results[task.name] = {"matched": matched, "runs": task_runs, "rows": []}
            for seed in task.seeds:
                for setting in settings:
                    if not setting.all_seeds and seed != task.seeds[0]:
                        continue
                    path = _run_path(runs_dir, task, setting, seed)
                    if path.exists():
                        task_runs.append(json.loads(path.read_text()))
                        continue
                    batch = (
                        matched[setting.matched_to]["batch"] if setting.matched_to else task.batch
                    )
                    _log(f"[{task.name}] seed {seed}: {setting.label} (batch {batch}), "
                         f"{task.steps} steps ...")  # fmt: skip
                    result = train_run(task, setting, seed, batch, splits)
                    path.write_text(json.dumps(result))
                    task_runs.append(result)
                    _log(f"[{task.name}] seed {seed}: {setting.label}: val loss "
                         f"{result['val_loss']:.4f}, {result['saved_bytes'] / 1e6:.2f} MB saved, "
                         f"{result['seconds_per_step']:.3f} s/step, "
                         f"{result['wall_seconds']:.0f} s")  # fmt: skip
                    order = {s.label: i for i, s in enumerate(settings)}
                    task_runs.sort(key=lambda r: order[r["label"]])
                    results[task.name]["rows"] = aggregate(task, task_runs)
                    save(complete=False, plots=False)
            timing_path = runs_dir / task.name / "timing.json"
            if timing_path.exists():
                timing = json.loads(timing_path.read_text())
            else:
                _log(f"[{task.name}] step times in alternation, {task.timing_rounds} rounds")
                batches = {s.label: matched[s.matched_to]["batch"] if s.matched_to else task.batch
                           for s in settings}  # fmt: skip
                timing = alternated_times(task, settings, batches, splits, task.timing_rounds)
                timing_path.write_text(json.dumps(timing, indent=2))
            order = {s.label: i for i, s in enumerate(settings)}
            task_runs.sort(key=lambda r: order[r["label"]])
            results[task.name]["timing"] = timing
            results[task.name]["rows"] = aggregate(task, task_runs, timing)
            if task is not all_tasks[-1]:
                save(complete=False)
    finally:
        torch.set_num_threads(threads)
    return save(complete=True)
