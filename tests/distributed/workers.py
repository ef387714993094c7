"""What the 2-process tests run in each process (spawned, gloo over a file store: no port).

Each check returns tensors that the parent test compares across ranks and against its own
single-process runs: :func:`run` saves them to ``out/rank{r}.pt``.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

import randprop as rp
from randprop.rules import DFA, FA, MemDFA
from randprop.train.distributed import Context, data_parallel

WORLD = 2
BATCH = 8  # per rank


def mlp(seed: int, norm: bool = False) -> nn.Sequential:
    """A small MLP initialised from ``seed`` (the global RNG is restored)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        layers = [nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 3)]
        if norm:
            layers.insert(1, nn.BatchNorm1d(5))
        return nn.Sequential(*layers)


def batch(rank: int, step: int = 0, n: int = BATCH) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank ``rank``'s examples at ``step`` (a fixed generator: the same in every process)."""
    gen = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randn(n, 6, generator=gen), torch.randint(0, 3, (n,), generator=gen)


def grads(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def rad_grads(rank_data: int) -> dict[str, torch.Tensor]:
    """Gradients of a RAD-converted MLP (seed 0) on rank ``rank_data``'s batch, no DDP: the draws
    are this process's (its rank's)."""
    model = mlp(0)
    rp.convert(model, "rad:keep=0.5", seed=0)
    x, y = batch(rank_data)
    F.cross_entropy(model(x), y).backward()
    return grads(model)


def memdfa_steps(model: nn.Module, rule: MemDFA, data, steps: int = 3) -> list[dict]:
    """Gradients of ``steps`` MEM-DFA SGD steps on ``data(step)``."""
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    out = []
    for step in range(steps):
        opt.zero_grad()
        rule.backward(*data(step))
        out.append(grads(model))
        opt.step()
    return out


def ddp_checks(rank: int) -> dict:
    ctx = Context(rank, WORLD)
    res: dict = {}
    # draws: the same batch on every rank, the draws per rank
    res["rad_same_batch"] = rad_grads(0)
    # feedback matrices of FA and DFA
    fa = FA(mlp(1), seed=3)
    res["fa"] = dict(fa.feedback)
    dfa = DFA(mlp(1), seed=3)
    res["dfa"] = [dfa.feedback.get(i, 5, 3, torch.device("cpu")) for i in range(2)]
    # estimator state across a DDP forward: data_parallel keeps it per rank, plain DDP does not
    for name, wrap in (("kept", data_parallel), ("plain", None)):
        model = mlp(2, norm=True)
        rp.convert(model, "aop:keep=0.5", seed=0)
        ddp = data_parallel(model, ctx) if wrap else nn.parallel.DistributedDataParallel(model)
        for step in range(2):
            x, y = batch(rank, step)
            F.cross_entropy(ddp(x), y).backward()
        before = rp.method_state(model)
        ddp.eval()(batch(rank, 2)[0])  # DDP syncs buffers at the start of a forward
        res[f"state_{name}"] = (before, rp.method_state(model))
        res[f"bn_{name}"] = model[1].running_mean.clone()
    # MEM-DFA through DDP, static graph and plain, on each rank's batch
    for static in (True, False):
        model = mlp(4)
        ddp = nn.parallel.DistributedDataParallel(model, static_graph=static)
        rule = MemDFA(ddp, F.cross_entropy)
        res[f"memdfa_static={static}"] = memdfa_steps(model, rule, lambda s: batch(rank, s))
    return res


def fsdp_checks(rank: int) -> dict:
    from torch.distributed.fsdp import fully_shard

    res: dict = {}
    model = mlp(5)
    rp.convert(model, "rad:keep=0.5", seed=7)
    for layer in (model[0], model[2], model[4]):
        fully_shard(layer)
    fully_shard(model)
    x, y = batch(rank)
    F.cross_entropy(model(x), y).backward()
    res["fsdp"] = {n: p.grad.full_tensor() for n, p in model.named_parameters()}
    # the same gradient from one process with this rank's draws and batch (no FSDP)
    single = mlp(5)
    rp.convert(single, "rad:keep=0.5", seed=7)
    F.cross_entropy(single(x), y).backward()
    res["single"] = grads(single)
    # training: a few Adam steps on a fixed batch lower the loss
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    losses = []
    for _ in range(8):
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    res["fsdp_losses"] = losses
    return res


CHECKS = {"ddp": ddp_checks, "fsdp": fsdp_checks}


def _worker(rank: int, store: str, checks: list[str], out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
    try:
        res = {name: CHECKS[name](rank) for name in checks}
        torch.save(res, Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def run(checks: list[str], out: Path) -> list[dict]:
    """Run ``checks`` in 2 spawned processes; their results, in rank order."""
    with tempfile.TemporaryDirectory() as tmp:
        store = os.path.join(tmp, "store")
        mp.start_processes(
            _worker, args=(store, checks, str(out)), nprocs=WORLD, start_method="spawn"
        )
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
