"""No host synchronisation on the hot path: every method's forward and backward, counted op by op.

A TorchDispatchMode sees every aten op of a training step (forward, loss, backward). On a GPU the
ops below make the host wait for the device (a value read back, a data-dependent output shape,
data copied between the host and the device); on the CPU they cost nothing, so they would go
unnoticed without this count. On the CPU a copy between devices cannot happen, so there the
check covers the reads back and the data-dependent shapes; with CUDA present the same cases also
run on the GPU, where every op producing a CPU tensor counts too.
"""

from __future__ import annotations

import copy
import sys
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import randprop as rp
from randprop.methods.base import RandomizedLayer
from randprop.methods.dropout import draw_seed
from randprop.methods.loss import LinearCrossEntropy

aten = torch.ops.aten

#: ops that read a value back to the host or whose output shape depends on the data
SYNCING = {
    aten._local_scalar_dense,
    aten.item,
    aten.is_nonzero,
    aten.equal,
    aten.nonzero,
    aten.argwhere,
    aten.masked_select,
    aten._unique,
    aten._unique2,
    aten.unique_dim,
    aten.unique_consecutive,
    aten.bincount,
    aten.lift_fresh,  # torch.tensor(python data): a host-to-device copy on a GPU
    aten.lift_fresh_copy,
}


#: code that reads a CPU tensor by design, never waiting for a device: the seed drawn from
#: PyTorch's default CPU generator (as nn.Dropout does) and a layer's step counter (a 0-dim
#: CPU tensor, so that a compiled graph can advance it)
_HOST_SIDE = {
    draw_seed.__code__,
    RandomizedLayer.rp_next_seed.__code__,
    RandomizedLayer.rp_step.fget.__code__,
    RandomizedLayer.rp_step.fset.__code__,
}


def _host_side(frame) -> bool:
    """True inside the code of :data:`_HOST_SIDE`."""
    while frame is not None:
        if frame.f_code in _HOST_SIDE:
            return True
        frame = frame.f_back
    return False


class HostSyncCounter(TorchDispatchMode):
    """Records the ops of the block that synchronise the host with a GPU."""

    def __init__(self, device: torch.device) -> None:
        super().__init__()
        self.device = device
        self.found: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        packet = func.overloadpacket
        if packet in SYNCING:
            if not _host_side(sys._getframe()):
                self.found.append(str(func))
        elif packet in (aten.index, aten.index_put, aten.index_put_) and any(
            isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8)
            for i in args[1]
            if i is not None
        ):
            self.found.append(f"{func} with a boolean index")
        elif packet is aten.repeat_interleave and kwargs.get("output_size") is None:
            self.found.append(f"{func} without output_size")
        out = func(*args, **kwargs)
        if self.device.type != "cpu":  # a host tensor in or out: a copy, or work on the host
            inputs = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
            outputs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
            host = [t for t in inputs if t.dim()] + outputs  # 0-dim inputs: host scalars
            if any(t.device.type == "cpu" for t in host) and not _host_side(sys._getframe()):
                self.found.append(f"{func} on a CPU tensor")
        return out


def count_syncs(step: Callable[[], None], device: torch.device) -> list[str]:
    with HostSyncCounter(device) as counter:
        step()
    return counter.found


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


class Cnn(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 4, 3, padding=1),
            nn.BatchNorm2d(4),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(4, 4, 3, padding=1),
            nn.GroupNorm(2, 4),
            nn.LeakyReLU(0.1),
            nn.AvgPool2d(2),
            nn.Dropout2d(0.2),
        )
        self.seq = nn.Conv1d(4, 6, 3)
        self.head = nn.Sequential(
            nn.Linear(6 * 2, 16),
            nn.LayerNorm(16),
            nn.GELU(),
            nn.Dropout(0.2),
            nn.Linear(16, 16),
            nn.SiLU(),
            nn.RMSNorm(16),
            nn.Tanh(),
            nn.Linear(16, 12),
            nn.Sigmoid(),
            nn.Linear(12, 5),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.features(x)  # (B, 4, 2, 2)
        h = self.seq(h.flatten(2).repeat(1, 1, 2))  # (B, 6, 6)
        return self.head(h.reshape(h.shape[0], 3, 12))  # tokens: (B, 3, 12) rows for CRS


class Transformer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True, dropout=0.1)
        self.norm = nn.LayerNorm(8)
        self.head = nn.Linear(8, 7)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(x + self.attn(x, x, x, need_weights=False)[0]))


class Recurrent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.RNN(3, 6, nonlinearity="relu", batch_first=True)
        self.lstm = nn.LSTM(6, 5)
        self.cell = nn.RNNCell(5, 4, nonlinearity="relu")
        self.lstm_cell = nn.LSTMCell(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.lstm(self.rnn(x)[0].transpose(0, 1))[0][-1]
        return self.lstm_cell(self.cell(h))[0]


def _batch(model: nn.Module, device: torch.device) -> torch.Tensor:
    shape = {Cnn: (4, 3, 8, 8), Transformer: (3, 5, 8), Recurrent: (3, 4, 3)}[type(model)]
    return torch.randn(shape, device=device)


METHODS = [
    rp.RAD(keep=0.3),
    rp.RAD(keep=0.3, mode="project"),
    rp.RAD(keep=0.3, same_sample=True),
    rp.RAD(keep=0.3, same_sample=True, mode="project"),
    rp.RAD(keep=0.3, bits=4),
    rp.Trace(probes=3),
    rp.Trace(probes=3, probe="orthogonal", channels="independent", bits=2),
    rp.CRS(keep=0.5),
    rp.CRS(keep=0.5, winners=0.0, bits=4),
    rp.AOP(keep=0.5),
    rp.AOP(keep=0.5, memory="queue", decay=0.9),
    rp.AOP(keep=0.5, memory="queue", policy="weighted"),
    rp.AOP(keep=0.5, memory="off", policy="random", target="both"),
    rp.SparseVJP(density=0.5),
    rp.SparseVJP(density=0.5, sketch="optimal"),
    rp.SparseVJP(density=0.5, sketch="optimal", budget="row"),
    rp.SparseVJP(density=0.5, structure="row"),
    rp.SparseVJP(density=0.5, structure="row", bits=4),
    rp.SparseVJP(density=0.5, structure="row", sketch="optimal"),
    rp.SparseVJP(density=0.5, structure="row", sketch="lowrank"),
    rp.SparseVJP(density=0.5, structure="row", sketch="gaussian"),
    rp.SparseVJP(density=0.5, structure="column"),
    rp.SparseVJP(density=0.5, structure="column", sketch="optimal"),
    rp.SparseVJP(density=0.5, structure="column", sketch="lowrank"),
    rp.Quant(bits=2),
    rp.Quant(bits=4, group=32),
]


def _train_step(model: nn.Module, x: torch.Tensor) -> Callable[[], None]:
    def step() -> None:
        model(x).square().mean().backward()

    return step


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("method", METHODS, ids=str)
@pytest.mark.parametrize("model_class", [Cnn, Transformer, Recurrent])
def test_converted_training_step_never_synchronises(model_class, method, device):
    model = model_class().to(device)
    report = rp.convert(model, method, seed=1)
    if not report.converted:
        pytest.skip(f"{method} converts nothing in {model_class.__name__}")
    step = _train_step(model, _batch(model, device))
    for _ in range(2):  # first steps create the layers' state (AOP memory, CRS estimate)
        step()
    assert count_syncs(step, torch.device(device)) == []


def _functional_model(device: str) -> Callable[[], None]:
    """Functional calls redirected by convert(functional_ops=True), attention with dropout and
    a boolean mask, and the fused lm-head + loss."""

    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = nn.Linear(8, 8)
            self.lm = LinearCrossEntropy(nn.Linear(8, 11))

        def forward(self, x, y):
            h = F.gelu(self.proj(x))
            h = F.layer_norm(F.silu(h), (8,))
            h = F.dropout(F.relu(h), 0.1, training=True)
            q = h.view(2, 3, 2, 4).transpose(1, 2)
            mask = torch.ones(3, 3, dtype=torch.bool, device=h.device).tril()
            a = rp.functional.attention(q, q, q, mask, dropout_p=0.1, seed=3, fused=False)
            h = torch.tanh(a.transpose(1, 2).reshape(6, 8))
            return self.lm(h, y)

    model = Model().to(device)
    rp.convert(model, rp.RAD(keep=0.5), seed=2, functional_ops=True)
    x = torch.randn(2, 3, 8, device=device)
    y = torch.tensor([1, 2, -100, 4, 5, 6], device=device)
    return lambda: model(x, y).backward()


def _rule(kind: str, device: str) -> Callable[[], None]:
    model = nn.Sequential(
        nn.Sequential(nn.Conv2d(2, 3, 3), nn.ReLU()),
        nn.Sequential(nn.Flatten(), nn.Linear(12, 6), nn.ReLU()),
        nn.Linear(6, 4),
    ).to(device)
    x = torch.randn(5, 2, 4, 4, device=device)
    y = torch.randint(0, 4, (5,), device=device)
    if kind == "memdfa":
        rule = rp.rules.MemDFA(model, F.cross_entropy, list(model), seed=1)
        return lambda: rule.backward(x, y)
    if kind == "dfa":
        rp.rules.DFA(model, blocks=list(model), seed=1)
    else:
        rp.rules.FA(model, seed=1, store=kind == "fa-stored")
    return lambda: F.cross_entropy(model(x), y).backward()


def _quantize_saved(device: str) -> Callable[[], None]:
    """rp.quantize_saved's hooks on a plain model (a RAD layer inside, left alone)."""
    model = Cnn().to(device)
    rp.convert(model.head, rp.RAD(keep=0.5), seed=1)
    rp.quantize_saved(model, bits=4, min_numel=1)
    return _train_step(model, _batch(model, torch.device(device)))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "kind", ["functional", "quantize-saved", "fa-stored", "fa-regenerated", "dfa", "memdfa"]
)
def test_compact_ops_and_rules_never_synchronise(kind, device):
    if kind == "functional":
        step = _functional_model(device)
    elif kind == "quantize-saved":
        step = _quantize_saved(device)
    else:
        step = _rule(kind, device)
    step()
    assert count_syncs(step, torch.device(device)) == []


class _ReadsBack(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * grad.abs().max().item()


@pytest.mark.parametrize(
    "culprit",
    [
        lambda x: _ReadsBack.apply(x),
        lambda x: x[x > 0],
        lambda x: x * torch.tensor([2.0], device=x.device),
        lambda x: x[: int(x.abs().argmax())],
        lambda x: x if torch.equal(x, x) else -x,
        lambda x: x[x.nonzero().squeeze(1)],
    ],
    ids=["item-in-backward", "boolean-index", "tensor-from-data", "int", "equal", "nonzero"],
)
def test_the_counter_catches_a_synchronising_op(culprit):
    """Positive control: each of these host synchronisations is counted."""
    x = torch.randn(6, requires_grad=True)
    found = count_syncs(lambda: culprit(copy.copy(x)).sum().backward(), torch.device("cpu"))
    assert found, "the counter missed a host synchronisation"
