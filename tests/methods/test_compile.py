"""Converted models under torch.compile: one graph (fullgraph=True fails on any graph break), no
recompilation after the first step, and the eager gradients and step counters for the same seeds
(the seeded draws run inside custom ops that read the seed as a tensor).

Backend aot_eager: it traces forward and backward as inductor does, without inductor's slow
code generation (benchmarks/compile_speed.py times inductor).
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch._dynamo.testing import CompileCounterWithBackend

import randprop as rp
from randprop.methods.base import RandomizedLayer
from randprop.models.feedforward import cnn


@pytest.fixture(autouse=True)
def _fresh_compile_caches():
    """Each test compiles from scratch: no graph of another test counts against the limits."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def mlp() -> nn.Module:
    return nn.Sequential(
        nn.Flatten(), nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3)
    )


def small_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(4, 4, 3, stride=2, padding=1),
        nn.LeakyReLU(0.1),
        nn.Flatten(),
        nn.Linear(4 * 4 * 4, 3),
    )


MLP_METHODS = [
    "rad:keep=0.3",
    "rad:keep=0.3,mode=project",
    "rad:keep=0.3,same_sample=true",
    "rad:keep=0.3,mode=project,same_sample=true",
]
CNN_METHODS = ["rad:keep=0.3", "rad:keep=0.3,mode=project", "trace:probes=3",
               "trace:probes=3,channels=independent,probe=rademacher"]  # fmt: skip
CASES = [(mlp, (5, 12), m) for m in MLP_METHODS] + [
    (small_cnn, (3, 2, 8, 8), m) for m in CNN_METHODS
]


def steps(model: nn.Module, inputs: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    """The parameter gradients of one forward and backward per input."""
    grads = []
    for x in inputs:
        model.zero_grad()
        model(x).square().sum().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    return grads


def converted(build, method: str, seed: int = 3) -> nn.Module:
    torch.manual_seed(0)
    model = build()
    rp.convert(model, method, seed=seed)
    return model


@pytest.mark.parametrize(("build", "shape", "method"), CASES)
def test_compiled_one_graph_no_recompile_eager_grads(build, shape, method):
    eager = converted(build, method)
    model = copy.deepcopy(eager)
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, backend=counter, fullgraph=True)
    inputs = [torch.randn(shape) for _ in range(3)]
    want, got = steps(eager, inputs), steps(compiled, inputs)
    assert counter.frame_count == 1  # compiled once, at the first step: no recompile after
    for w, g in zip(want, got, strict=True):
        for a, b in zip(w, g, strict=True):
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    layers = [m for m in model.modules() if isinstance(m, RandomizedLayer)]
    assert layers and all(m.rp_step == len(inputs) for m in layers)
    # positive control: another run seed draws other sketches, so the gradients would differ
    other = steps(converted(build, method, seed=4), inputs)
    assert not torch.allclose(other[0][0], want[0][0])


def test_compiled_step_counter_is_shared_with_eager():
    """Eager and compiled calls advance one counter: a compiled step after eager ones draws
    the seed the eager step would have drawn."""
    eager = converted(mlp, "rad:keep=0.3")
    model = copy.deepcopy(eager)
    inputs = [torch.randn(5, 12) for _ in range(3)]
    want = steps(eager, inputs)
    got = steps(model, inputs[:2])  # eager
    got += steps(torch.compile(model, backend="aot_eager", fullgraph=True), inputs[2:])
    for a, b in zip(want[2], got[2], strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    assert model[1].rp_step == 3


def test_compiled_cnn_model():
    """The models registry's conv net, RAD-converted (masked ReLUs included): one graph."""
    model = converted(cnn, "rad:keep=0.2")
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, backend=counter, fullgraph=True)
    steps(compiled, [torch.randn(2, 1, 28, 28) for _ in range(2)])
    assert counter.frame_count == 1


def test_restore_drops_the_step_counter():
    model = converted(mlp, "rad:keep=0.3")
    rp.restore(model)
    assert "rp_step_count" not in model[1].__dict__
