"""One training loop for every method, learning rule and baseline.

Writes, under ``cfg.out``: metrics.jsonl (one JSON object per log / evaluation), checkpoint.pt
(atomic; model, optimizer, schedule, RNG and method state) and summary.json. The batch at step t
is a pure function of (seed, t): epoch e = t // (N // B) uses the permutation drawn from
derive_seed(seed, DATA, e), so a resumed run sees exactly the batches an uninterrupted one does.

summary.json's peak_bytes is the most memory held at once during a training step (zero_grad,
forward, backward, optimizer step), measured over the first ``PEAK_STEPS`` steps a process runs
(tracking every step would slow it): on CUDA the allocator's peak after a reset at the step's
start; elsewhere randprop.measure.peak.track_peak, counting the model's parameters, gradients,
buffers and method state, the optimizer state, the batch and every tensor the step allocates
(what autograd saves, gradients, temporaries), never the dataset. A resumed run keeps the larger
of the checkpoint's figure and its own; null when no step was measured. peak_forward_backward_bytes
is the same over zero_grad, forward and backward only (without the optimizer step, whose state
and update temporaries can dominate a small model's peak): it is where the methods' saved bytes
show.

Under torchrun (see :mod:`randprop.train.distributed`) every process trains its share of each
batch (``batch`` is the global batch, split evenly) through DDP with its own draws and estimator
state; rank 0 alone writes metrics, checkpoints and the summary, and a checkpoint holds every
rank's method state and RNG state, which each rank gets back on resume.
"""

from __future__ import annotations

import copy
import json
import math
import signal
import sys
import threading
import time
from collections.abc import Callable
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from randprop.convert import ConversionReport, load_method_state, method_state
from randprop.data import Splits, load_dataset
from randprop.measure.peak import peak_memory, state_tensors
from randprop.models.registry import MODELS, build_model
from randprop.random import STREAM_DATA, STREAM_INIT, derive_seed, generator
from randprop.train import distributed
from randprop.train.baselines import install, matched_batch, saved_bytes_of
from randprop.train.checkpoint import (
    CHECKPOINT,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from randprop.train.config import TrainConfig
from randprop.train.learning_rules import LossFn

RESUME_KEYS = ("model", "data", "method", "checkpointing", "match_memory_of", "seed", "batch")
PEAK_STEPS = 3  # training steps of each process whose peak memory is measured
Callback = Callable[[int, float], None]
Batches = Callable[[int], torch.Tensor]


def _step_meter(tracked: bool, device, model, optimizer, rule, x, y):
    """A peak meter of a part of a training step (see :mod:`randprop.measure.peak`) counting what
    the step holds at its start, or a no-op when the step is not tracked."""
    if not tracked:
        return nullcontext()
    return peak_memory(device, [*state_tensors(model, optimizer, rule), x, y])


def loss_fn(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Cross-entropy; sequence outputs (B, T, C) against targets (B, T) are flattened."""
    if out.dim() == y.dim() + 1 and out.dim() > 2:
        out, y = out.reshape(-1, out.shape[-1]), y.reshape(-1)
    return F.cross_entropy(out, y)


def build_seeded(name: str, seed: int) -> nn.Module:
    """``build_model(name)`` initialised from ``seed`` (the global RNG is restored afterwards)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(seed, stream=STREAM_INIT))
        return build_model(name)


def batch_indices(n: int, batch: int, seed: int, step: int) -> torch.Tensor:
    """Indices of the batch at ``step``: reshuffled every epoch, the last partial batch dropped."""
    per_epoch = max(n // batch, 1)
    epoch, i = divmod(step, per_epoch)
    perm = torch.randperm(n, generator=generator(derive_seed(seed, step=epoch, stream=STREAM_DATA)))
    return perm[i * batch : (i + 1) * batch]


def epoch_batches(
    n: int, batch: int, permutation: Callable[[int], torch.Tensor], *, drop_last: bool = True
) -> Batches:
    """A ``batches`` hook for :func:`train`: step t takes the next ``batch`` examples of
    ``permutation(e)``, e the epoch of t; an epoch has n // batch steps (``drop_last``) or
    ceil(n / batch), the last one then smaller. ``permutation`` is called once per epoch, in
    order."""
    per_epoch = max(n // batch, 1) if drop_last else math.ceil(n / batch)
    cache: dict[int, torch.Tensor] = {}

    def indices(step: int) -> torch.Tensor:
        epoch, i = divmod(step, per_epoch)
        if epoch not in cache:
            cache.clear()
            cache[epoch] = permutation(epoch)
        return cache[epoch][i * batch : (i + 1) * batch]

    return indices


def permutations(n: int, gen: torch.Generator) -> Callable[[int], torch.Tensor]:
    """Epoch e -> the (e+1)-th ``torch.randperm(n, generator=gen)`` (drawn once, then kept)."""
    drawn: list[torch.Tensor] = []

    def permutation(epoch: int) -> torch.Tensor:
        while len(drawn) <= epoch:
            drawn.append(torch.randperm(n, generator=gen))
        return drawn[epoch]

    return permutation


@torch.no_grad()
def evaluate(
    model: nn.Module, data, batch: int, device: torch.device, loss: LossFn | None = None
) -> dict[str, float]:
    """Mean ``loss`` (default cross-entropy) and accuracy (argmax of the output against integer
    targets; nan for real-valued ones) over a dataset; the method's random streams are left
    untouched."""
    loss = loss or loss_fn
    x_all, y_all = data.tensors
    if len(x_all) == 0:
        return {"loss": math.nan, "accuracy": math.nan}
    state, was_training = method_state(model), model.training
    model.eval()
    loss_sum, correct, count = 0.0, 0, 0
    for start in range(0, len(x_all), batch):
        x, y = x_all[start : start + batch].to(device), y_all[start : start + batch].to(device)
        out = model(x)
        rows = len(y) if y.is_floating_point() else y.numel()
        loss_sum += float(loss(out, y)) * rows
        correct += 0 if y.is_floating_point() else int((out.argmax(-1) == y).sum())
        count += rows
    model.train(was_training)
    load_method_state(model, state)
    accuracy = math.nan if y_all.is_floating_point() else correct / count
    return {"loss": loss_sum / count, "accuracy": accuracy}


def _schedule(cfg: TrainConfig) -> Callable[[int], float]:
    if cfg.schedule == "cosine":
        return lambda t: 0.5 * (1 + math.cos(math.pi * min(t, cfg.steps) / cfg.steps))
    if cfg.schedule == "linear":
        return lambda t: max(0.0, 1 - t / cfg.steps)
    return lambda t: 1.0


def _scheduler(cfg: TrainConfig, optimizer: torch.optim.Optimizer):
    if cfg.schedule == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=cfg.lr, total_steps=cfg.steps)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(cfg))


def _optimizer(cfg: TrainConfig, params) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(
            params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
        )
    cls = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
    return cls(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


@contextmanager
def _deferred_sigint():
    """Ctrl-C sets a flag read between steps (a second Ctrl-C interrupts at once)."""
    flag = {"set": False}
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return

    def handler(signum, frame):
        if flag["set"]:
            raise KeyboardInterrupt
        flag["set"] = True

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield flag
    finally:
        signal.signal(signal.SIGINT, previous)


def check_out(out: str) -> None:
    """ValueError unless ``out`` is a directory or can be created as one."""
    path = Path(out)
    for p in (path, *path.parents):
        if p.exists():
            if not p.is_dir():
                what = "is a file" if p == path else f"lies below the file {str(p)!r}"
                raise ValueError(f"train: out {out!r} {what}; give a directory for the run")
            return


def _conversion(report: ConversionReport | None) -> dict | None:
    """The conversion report for summary.json: converted layers with their method, skipped ones
    with the reason (None for learning rules and checkpointing, which convert nothing)."""
    if report is None:
        return None
    converted = {name: report.methods[name] for name in report.converted}
    return {"converted": converted, "skipped": dict(report.skipped)}


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop records written after ``step`` (by a run interrupted after its last checkpoint)."""
    if path.exists():
        lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
        kept = [ln for ln in lines if json.loads(ln).get("step", 0) <= step]
        path.write_text("".join(ln + "\n" for ln in kept))


def train(
    cfg: TrainConfig,
    *,
    splits: Splits | None = None,
    callback: Callback | None = None,
    model: nn.Module | None = None,
    loss: LossFn | None = None,
    batches: Batches | None = None,
) -> dict:
    """Train ``cfg.model`` on ``cfg.data`` with ``cfg.method``; return the summary dict.

    splits: preloaded data (else ``load_dataset(cfg.data, ...)``). callback(step, loss) runs
    after every completed step; a KeyboardInterrupt from it (or Ctrl-C) saves a checkpoint.
    model: train this module (``cfg.method`` is installed on it in place; ``cfg.model`` then
    only names it) instead of ``build_model(cfg.model)`` seeded from ``cfg.seed``.
    loss: loss(output, target), default cross-entropy (also the evaluation loss).
    batches: step -> indices of its training examples (e.g. :func:`epoch_batches`); default
    :func:`batch_indices`, a pure function of (seed, step). Not with ``match_memory_of``.
    """
    if batches is not None and cfg.match_memory_of:
        raise ValueError("train: batches and match_memory_of exclude each other")
    threads = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        with distributed.session(cfg.device) as ctx:
            return _train(cfg, splits, callback, model, loss or loss_fn, batches, ctx)
    finally:
        torch.set_num_threads(threads)


def _train(
    cfg: TrainConfig,
    splits: Splits | None,
    callback: Callback | None,
    given: nn.Module | None,
    loss_fn: LossFn,
    batches: Batches | None,
    ctx: distributed.Context,
) -> dict:
    start_time = time.perf_counter()
    if given is None and cfg.model not in MODELS:
        raise ValueError(f"unknown model {cfg.model!r}; choose from {', '.join(sorted(MODELS))}")
    splits = splits or load_dataset(
        cfg.data, root=cfg.data_root, seed=cfg.seed, val_fraction=cfg.val_fraction
    )
    if given is None and tuple(MODELS[cfg.model].input_shape) != tuple(splits.input_shape):
        raise ValueError(
            f"model {cfg.model!r} takes examples of shape {MODELS[cfg.model].input_shape}; "
            f"dataset {cfg.data!r} has {splits.input_shape}"
        )
    device = ctx.device
    if cfg.out:
        check_out(cfg.out)
    out = Path(cfg.out) if cfg.out else None
    x_train, y_train = splits.train.tensors
    first = torch.arange(min(cfg.batch, len(x_train)))  # index copies, not views of x_train

    pristine = copy.deepcopy(given).to(device) if given is not None else None

    def build() -> nn.Module:  # the measurements copy what this returns
        return pristine if pristine is not None else build_seeded(cfg.model, cfg.seed).to(device)

    batch, method, budget = cfg.batch, cfg.method, None
    if cfg.match_memory_of:
        xb, yb = x_train[first].to(device), y_train[first].to(device)
        batch, budget = matched_batch(build, cfg.match_memory_of, xb, yb, loss_fn, cfg.seed)
        method = "exact"
    if batch > len(x_train):
        raise ValueError(f"batch {batch} exceeds the {len(x_train)} training examples")
    mine = ctx.shard(first[:batch])  # this rank's share of a batch (checks that it divides)

    model = given.to(device) if given is not None else build()
    rule = install(model, method, loss_fn, cfg.seed, model_name=cfg.model,
                   checkpointing=cfg.checkpointing)  # fmt: skip
    report = getattr(rule, "report", None)
    if ctx.parallel:
        distributed.parallel_rule(rule, model, ctx)
    optimizer = _optimizer(cfg, model.parameters())
    scheduler = _scheduler(cfg, optimizer)
    metrics_path = out / "metrics.jsonl" if out else None
    identity = {"model": cfg.model, "data": cfg.data, "method": cfg.method,
                "checkpointing": cfg.checkpointing,
                "match_memory_of": cfg.match_memory_of, "seed": cfg.seed, "batch": batch}  # fmt: skip
    step = 0
    progress_state = {"losses": [], "window": [], "step_times": [], "train_seconds": 0.0,
                      "peak_bytes": None, "peak_forward_backward_bytes": None,
                      "peak_step_times": []}  # fmt: skip

    if cfg.resume:
        ckpt = load_checkpoint(out / CHECKPOINT)
        ckpt_id = {"checkpointing": False, **ckpt["identity"]}  # written before it was a key
        changed = [k for k in RESUME_KEYS if ckpt_id.get(k) != identity[k]]
        if changed:
            raise ValueError(
                f"cannot resume: {', '.join(changed)} differ from the checkpoint's "
                f"({', '.join(f'{k}={ckpt_id[k]!r}' for k in changed)})"
            )
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        own = ckpt.get("ranks") or [{}] * ctx.world_size  # each rank's own state, if saved
        if len(own) != ctx.world_size:
            raise ValueError(
                f"cannot resume: the checkpoint is of {len(own)} processes, this run has "
                f"{ctx.world_size}"
            )
        load_method_state(model, own[ctx.rank].get("method_state", ckpt["method_state"]))
        if ckpt.get("rule") is not None and hasattr(rule, "load_state_dict"):
            rule.load_state_dict(ckpt["rule"])
        set_rng_state(own[ctx.rank].get("rng", ckpt["rng"]))
        step, progress_state = ckpt["step"], {**progress_state, **ckpt["progress"]}
        saved, exact_saved = ckpt["saved_bytes"], ckpt["exact_saved_bytes"]
        if ctx.main:
            _truncate_metrics(metrics_path, step)
    else:
        xb, yb = x_train[mine].to(device), y_train[mine].to(device)
        saved = saved_bytes_of(build, method, xb, yb, loss_fn, cfg.seed,  # on a fresh model
                               checkpointing=cfg.checkpointing)  # fmt: skip
        exact_saved = saved_bytes_of(build, "exact", xb, yb, loss_fn, cfg.seed)
        del xb, yb  # nothing of the set-up stays on the device during the steps
        if out and ctx.main:
            out.mkdir(parents=True, exist_ok=True)
            metrics_path.write_text("")

    def write(record: dict) -> None:
        if metrics_path and ctx.main:
            with open(metrics_path, "a") as f:
                f.write(json.dumps(record) + "\n")

    def checkpoint() -> None:
        own = {"method_state": method_state(model), "rng": rng_state()} if ctx.parallel else {}
        ranks = ctx.gather(own) if ctx.parallel else None  # a collective: every rank calls it
        if out and ctx.main:
            state = {
                "identity": identity,
                "config": cfg.to_dict(),
                "step": step,
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "method_state": method_state(model),
                "rule": rule.state_dict() if hasattr(rule, "state_dict") else None,
                "rng": rng_state(),
                "progress": progress_state,
                "ranks": ranks,
                "saved_bytes": saved,
                "exact_saved_bytes": exact_saved,
            }
            save_checkpoint(out / CHECKPOINT, state)

    def eval_record() -> dict:
        val = evaluate(model, splits.val, cfg.eval_batch, device, loss_fn)
        test = evaluate(model, splits.test, cfg.eval_batch, device, loss_fn)
        record = {"step": step, "val_loss": val["loss"], "val_accuracy": val["accuracy"],
                  "test_loss": test["loss"], "test_accuracy": test["accuracy"],
                  "time": progress_state["train_seconds"]}  # fmt: skip
        write(record)
        return record

    show = ctx.main and (cfg.progress if cfg.progress is not None else sys.stderr.isatty())
    bar = tqdm(total=cfg.steps, initial=step, disable=not show, desc=str(method), leave=False)
    in_step, measured = False, 0
    try:
        with _deferred_sigint() as sigint:
            while step < cfg.steps:
                if batches is None:
                    idx = batch_indices(len(x_train), batch, cfg.seed, step)
                else:
                    idx = batches(step)
                idx = ctx.shard(idx)
                x, y = x_train[idx].to(device), y_train[idx].to(device)
                in_step = True
                tracked = measured < PEAK_STEPS
                meter = _step_meter(tracked, device, model, optimizer, rule, x, y)
                t0 = time.perf_counter()
                with meter:
                    optimizer.zero_grad(set_to_none=True)
                    loss = ctx.mean(float(rule.backward(x, y).detach()))
                step_meter = _step_meter(tracked, device, model, optimizer, rule, x, y)
                with step_meter:  # the whole step's peak: the larger of the two parts
                    optimizer.step()
                scheduler.step()
                seconds = time.perf_counter() - t0
                step += 1
                in_step = False
                progress_state["train_seconds"] += seconds
                if tracked:  # timed apart: tracking slows a step down
                    measured += 1
                    progress_state["peak_step_times"].append(seconds)
                    for key, part in (("peak_forward_backward_bytes", meter.bytes),
                                      ("peak_bytes", max(meter.bytes, step_meter.bytes))):  # fmt: skip
                        peaks = (progress_state[key], part)
                        progress_state[key] = max(p for p in peaks if p is not None)
                else:
                    progress_state["step_times"].append(seconds)
                progress_state["losses"] = [*progress_state["losses"][-49:], loss]
                window = progress_state["window"]
                window.append(loss)
                bar.update(1)
                if cfg.log_every and step % cfg.log_every == 0:
                    write({"step": step, "loss": sum(window) / len(window),
                           "lr": scheduler.get_last_lr()[0],
                           "time": progress_state["train_seconds"], "saved_bytes": saved})  # fmt: skip
                    bar.set_postfix(loss=f"{sum(window) / len(window):.4f}")
                    progress_state["window"] = []
                if cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.steps:
                    eval_record()
                if cfg.checkpoint_every and step % cfg.checkpoint_every == 0:
                    checkpoint()
                if callback is not None:
                    callback(step, loss)
                if ctx.any(sigint["set"]):
                    raise KeyboardInterrupt
    except KeyboardInterrupt:
        bar.close()
        if out and not in_step:
            checkpoint()
        if out and not in_step and ctx.main:
            print(f"\ninterrupted: checkpoint at step {step} in {out / CHECKPOINT}; "
                  "continue with --resume", file=sys.stderr)  # fmt: skip
        raise
    bar.close()
    checkpoint()
    final = eval_record()
    losses = progress_state["losses"]
    times = sorted(progress_state["step_times"] or progress_state["peak_step_times"])
    summary = {
        "method": cfg.method,
        "checkpointing": cfg.checkpointing,
        "model": cfg.model,
        "data": cfg.data,
        "batch": batch,
        "steps": step,
        "seed": cfg.seed,
        "processes": ctx.world_size,
        "match_memory_of": cfg.match_memory_of,
        "memory_budget_bytes": budget,
        "optimizer": cfg.optimizer,
        "lr": cfg.lr,
        "weight_decay": cfg.weight_decay,
        "schedule": cfg.schedule,
        "test_accuracy": final["test_accuracy"],
        "test_loss": final["test_loss"],
        "val_accuracy": final["val_accuracy"],
        "val_loss": final["val_loss"],
        "train_loss": sum(losses) / len(losses) if losses else math.nan,
        "saved_bytes": saved,
        "exact_saved_bytes": exact_saved,
        "peak_bytes": progress_state["peak_bytes"],
        "peak_forward_backward_bytes": progress_state["peak_forward_backward_bytes"],
        "seconds_per_step": times[len(times) // 2] if times else math.nan,
        "threads": torch.get_num_threads(),
        "train_seconds": progress_state["train_seconds"],
        "wall_seconds": time.perf_counter() - start_time,
        "conversion": _conversion(report),
    }
    rule.remove()
    if out and ctx.main:
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary
