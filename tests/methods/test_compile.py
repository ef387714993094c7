"""Converted models under torch.compile: one graph (fullgraph=True fails on any graph break), no
recompilation after the first step, and the eager gradients and step counters for the same seeds
(the seeded draws run inside custom ops that read the seed as a tensor).

Backend aot_eager: it traces forward and backward as inductor does, without inductor's slow
code generation (benchmarks/compile_speed.py times inductor).

Covered here: RAD and Trace (any bits), the ReLU-family masks, k-bit stochastic rounding
(``randprop::quantize``: stored sketches, Quant, k-bit activations, gated MLPs, LayerNorm /
RMSNorm / BatchNorm / GroupNorm), SparseVJP (Linear and Conv, every sketch and structure),
compact dropout and attention (their seeds drawn in the graph from the default CPU generator:
a compiler that replaces random ops, as inductor does unless ``fallback_random``, draws other
masks than eager), CRS once its gradient-norm estimate exists.

Still breaking the graph inside a converted layer:
- CRS's first call (it creates its estimate buffer) and AOP (WeightNode's side channel, memory
  buffers created, grown and updated in backward);
- RAD recurrent layers (dynamo does not trace nn.RNN / GRU / LSTM modules);
- the functional-ops swaps (a TorchFunctionMode entered from forward hooks, Python counters);
- activation-checkpoint replay of seeds is not recorded while compiling (rp_next_seed).
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch._dynamo.testing import CompileCounterWithBackend

import randprop as rp
from randprop.methods.attention import attention
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


def smooth_mlp() -> nn.Module:
    """Smooth activations and norms: k-bit derivatives, normalised inputs and a gated MLP."""
    return nn.Sequential(
        nn.Linear(12, 16), nn.LayerNorm(16), nn.GELU(), nn.Linear(16, 16), nn.RMSNorm(16),
        nn.SiLU(), GatedMLP(), nn.Linear(16, 3),
    )  # fmt: skip


class GatedMLP(nn.Module):
    """The layout of a LlamaMLP (SwiGLU), which rp.convert swaps for a k-bit gate."""

    def __init__(self) -> None:
        super().__init__()
        self.gate_proj, self.up_proj = nn.Linear(16, 8), nn.Linear(16, 8)
        self.down_proj, self.act_fn = nn.Linear(8, 16), nn.SiLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


def norm_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.GELU(),
        nn.Conv2d(4, 4, 3, stride=2, padding=1), nn.GroupNorm(2, 4), nn.Tanh(),
        nn.Flatten(), nn.Linear(4 * 4 * 4, 3),
    )  # fmt: skip


#: k-bit stochastic rounding (randprop::quantize): stored sketches, Quant, activations, norms
KBIT_MLP_METHODS = ["rad:keep=0.3,bits=4", "rad:keep=0.3,mode=project,bits=2,group=4",
                    "quant:bits=2", "quant:bits=4,group=8"]  # fmt: skip
KBIT_CNN_METHODS = ["rad:keep=0.3,bits=4", "trace:probes=3,bits=4", "quant:bits=2"]
#: SparseVJP: the forward's row draw and the sketched backward as custom ops
VJP_METHODS = ["vjp:density=0.5", "vjp:density=0.5,sketch=optimal,structure=row",
               "vjp:density=0.5,structure=row,bits=4", "vjp:density=0.5,sketch=lowrank,structure=row",
               "vjp:density=0.5,sketch=gaussian,structure=column",
               "vjp:density=0.5,sketch=optimal,structure=column"]  # fmt: skip
CASES = (
    [(mlp, (5, 12), m) for m in MLP_METHODS + KBIT_MLP_METHODS + VJP_METHODS]
    + [(small_cnn, (3, 2, 8, 8), m) for m in CNN_METHODS + KBIT_CNN_METHODS + VJP_METHODS]
    + [(smooth_mlp, (5, 12), m) for m in ("rad:keep=0.3", "quant:bits=4")]
    + [(norm_cnn, (3, 2, 8, 8), "rad:keep=0.3,bits=8")]
)


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
    counts = [m.rp_step for m in model.modules() if isinstance(m, RandomizedLayer)]
    assert counts == [m.rp_step for m in eager.modules() if isinstance(m, RandomizedLayer)]
    assert len(inputs) in counts and set(counts) <= {0, len(inputs)}  # (a gate's act_fn: 0)
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


def test_compiled_dropout_draws_the_eager_seeds():
    """Compact dropout draws its seed from the default CPU generator in the graph (no read back)
    and its mask inside an op: under aot_eager the same masks as eager for the same
    torch.manual_seed."""
    torch.manual_seed(0)
    eager = nn.Sequential(nn.Linear(12, 16), nn.Dropout(0.3), nn.ReLU(), nn.Dropout1d(0.5),
                          nn.Linear(16, 3))  # fmt: skip
    rp.convert(eager, "rad:keep=0.5", seed=3)
    assert type(eager[1]).__name__ == "SeededDropout"
    model = copy.deepcopy(eager)
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, backend=counter, fullgraph=True)
    inputs = [torch.randn(4, 6, 12) for _ in range(3)]
    torch.manual_seed(5)
    want = steps(eager, inputs)
    torch.manual_seed(5)
    got = steps(compiled, inputs)
    assert counter.frame_count == 1
    for w, g in zip(want, got, strict=True):
        for a, b in zip(w, g, strict=True):
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    torch.manual_seed(6)  # positive control: other seeds, other masks
    assert not torch.allclose(steps(compiled, inputs[:1])[0][0], want[0][0])


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("dropout_p", [0.0, 0.2])
def test_compiled_compact_attention(fused, dropout_p):
    """Compact attention in one graph: the fused recompute as a non-reentrant checkpoint, the
    chunked form's dropout seed drawn in the graph and its masks inside an op; eager gradients
    for the same torch.manual_seed."""
    qkv = [torch.randn(2, 2, 6, 4, requires_grad=True) for _ in range(3)]

    def f(q, k, v):
        return attention(q, k, v, dropout_p=dropout_p, is_causal=True, chunk_size=4, fused=fused)

    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(f, backend=counter, fullgraph=True)
    grads = []
    for fn in (f, compiled, compiled):
        torch.manual_seed(1)
        fn(*qkv).square().sum().backward()
        grads.append([t.grad for t in qkv])
        for t in qkv:
            t.grad = None
    assert counter.frame_count == 1
    for want, got in zip(grads[0], grads[2], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    if dropout_p:  # positive control: another seed, other masks
        torch.manual_seed(2)
        compiled(*qkv).square().sum().backward()
        assert not torch.allclose(qkv[0].grad, grads[0][0])


def test_compiled_crs_after_its_estimate_exists():
    """CRS compiles to one graph once its gradient-norm estimate exists (one eager step): the
    weight gradient and the estimate's update in the layer's own backward, as eager computes
    them."""
    eager = converted(mlp, "crs:keep=0.5")
    inputs = [torch.randn(5, 12) for _ in range(4)]
    steps(eager, inputs[:1])
    model = copy.deepcopy(eager)
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, backend=counter, fullgraph=True)
    want, got = steps(eager, inputs[1:]), steps(compiled, inputs[1:])
    assert counter.frame_count == 1
    for w, g in zip(want, got, strict=True):
        for a, b in zip(w, g, strict=True):
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(model[1].crs_grad_norm, eager[1].crs_grad_norm)
    assert model[1].rp_step == eager[1].rp_step == len(inputs)
    other = steps(converted(mlp, "crs:keep=0.5", seed=4), inputs[:2])  # positive control
    assert not torch.allclose(other[1][0], want[0][0])
