"""Smooth activations and GLU gates storing k-bit derivatives for backward.

Elementwise y = f(x) (GELU in its erf and tanh forms, SiLU, QuickGELU, tanh, sigmoid): backward
needs only dX = f'(x) dY, linear in f'(x). Forward runs the original op itself (bitwise equal)
and stores Q(f'(x)), the ``bits``-bit code of f'(x) from :func:`randprop.quantize.quantize`
(one scale and minimum per row, seeded stochastic rounding), so E[Q(f'(x))] = f'(x) and
E[dX] = f'(x) dY: unbiased. It costs bits / 8 bytes per element plus 8 per row, where PyTorch
keeps 4 (float32 x or y) and, for GELU written out in its tanh form (transformers'
NewGELUActivation), four float32 tensors.

Gates y = f(a) b (SwiGLU: f = SiLU; GEGLU: f = GELU): dB = f(a) dY and dA = f'(a) b dY. Stored:
Q(f(a)) and Q(f'(a) b), two k-bit tensors, each read linearly, so both gradients are unbiased;
two is the fewest, since dB and dA need two different elementwise factors (PyTorch keeps a, f(a)
and b). Storing Q(f'(a)) and Q(b) instead would also be unbiased (independent draws) but needs a
third tensor, Q(f(a)).

Default width :data:`DEFAULT_BITS` = 4, chosen by measurement (benchmarks/activation_bits.py;
GPT-2-style MLP 256 -> 1024 -> 256, GELU tanh form, 8 x 128 tokens): the variance the rounding adds
to the weight gradients, relative to their squared norm, is about 2e-3 at 4 bits (0.5 bytes per
element) against 9e-6 at 8 bits and 5e-2 at 2 bits: at 4 bits it is negligible beside that of any
randomized estimator (RAD keep=0.1: about 9) and half the bytes of 8.

The layers are :class:`~randprop.methods.base.RandomizedLayer`s: rp.convert seeds them from its
seed and their name, activation checkpointing replays their draws, and their width is ``bits=``
(construction), else the converting method's ``bits`` when it has one, else the default.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from randprop.config import check_seed
from randprop.methods.base import QuantizedLayer, needs_grad
from randprop.quantize import QuantizedTensor, check_bits, quantize_seeded

#: code width of a stored derivative when none is given (chosen by measurement, see above)
DEFAULT_BITS = 4

Derivative = Callable[[torch.Tensor], torch.Tensor]

_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


def _work(x: torch.Tensor) -> torch.Tensor:
    """``x`` in the precision a derivative is computed in: float64 stays, else float32."""
    return x if x.dtype == torch.float64 else x.float()


def _ones(x: torch.Tensor) -> torch.Tensor:
    """A 1 broadcast to ``x``'s shape (no memory): the upstream gradient that turns PyTorch's
    backward kernels into the derivative itself."""
    return x.new_ones(()).expand_as(x)


def gelu_grad(x: torch.Tensor) -> torch.Tensor:
    """d/dx x Phi(x) = Phi(x) + x phi(x) (GELU, erf form), by PyTorch's own GELU backward
    kernel (one pass; bitwise autograd's derivative of F.gelu)."""
    x = _work(x)
    return torch.ops.aten.gelu_backward(_ones(x), x, approximate="none")


def gelu_tanh_grad(x: torch.Tensor, c: float = _SQRT_2_OVER_PI) -> torch.Tensor:
    """d/dx x (1 + tanh(c (x + 0.044715 x^3))) / 2
    = (1 + t) / 2 + x (1 - t^2) c (1 + 3 0.044715 x^2) / 2, t the tanh; for c = sqrt(2 / pi)
    by PyTorch's own GELU (tanh form) backward kernel (one pass instead of about ten)."""
    x = _work(x)
    if c == _SQRT_2_OVER_PI:
        return torch.ops.aten.gelu_backward(_ones(x), x, approximate="tanh")
    t = torch.mul(x, 0.044715).mul_(x).mul_(x).add_(x).mul_(c).tanh_()
    out = torch.add(t, 1.0).mul_(0.5)
    rest = torch.mul(x, 0.5).mul_(t.mul_(t).neg_().add_(1.0)).mul_(c)
    return out.add_(rest.mul_(torch.mul(x, 3 * 0.044715).mul_(x).add_(1.0)))


def silu_grad(x: torch.Tensor) -> torch.Tensor:
    """d/dx x s(x) = s (1 + x (1 - s)), s = sigmoid(x), by PyTorch's own SiLU backward
    kernel."""
    x = _work(x)
    return torch.ops.aten.silu_backward(_ones(x), x)


def quick_gelu_grad(x: torch.Tensor) -> torch.Tensor:
    """d/dx x s(1.702 x) = s + 1.702 x s (1 - s), s = sigmoid(1.702 x)."""
    scaled = torch.mul(_work(x), 1.702)
    s = torch.sigmoid(scaled)
    return scaled.mul_(s).mul_(torch.neg(s).add_(1.0)).add_(s)


def tanh_grad(x: torch.Tensor) -> torch.Tensor:
    """d/dx tanh(x) = 1 - tanh(x)^2."""
    t = torch.tanh(_work(x))
    return t.mul_(t).neg_().add_(1.0)


def sigmoid_grad(x: torch.Tensor) -> torch.Tensor:
    """d/dx sigmoid(x) = s (1 - s)."""
    s = torch.sigmoid(_work(x))
    return torch.neg(s).add_(1.0).mul_(s)


#: activation kind -> its derivative f'(x); the kinds the layers and gates know
DERIVATIVES: dict[str, Derivative] = {
    "gelu": gelu_grad,
    "gelu_tanh": gelu_tanh_grad,
    "gelu_fast": functools.partial(gelu_tanh_grad, c=0.7978845608),  # transformers' FastGELU
    "silu": silu_grad,
    "quick_gelu": quick_gelu_grad,
    "tanh": tanh_grad,
    "sigmoid": sigmoid_grad,
}


class _QuantizedDerivative(torch.autograd.Function):
    """y = fn(x) exactly; saves Q(f'(x)); backward dX = Q(f'(x)) dY."""

    @staticmethod
    def forward(ctx, x, fn, derivative, bits, seed, stochastic, inplace):
        # before fn: inplace; the seed a compiled layer's tensor seed too
        (q,) = quantize_seeded([derivative(x)], bits, seed=seed, stochastic=stochastic)
        ctx.save_for_backward(*q.tensors)
        ctx.meta, ctx.x_dtype = q.meta, x.dtype
        y = fn(x)
        if inplace:
            ctx.mark_dirty(x)
        return y

    @staticmethod
    def backward(ctx, grad_out):
        slope = QuantizedTensor.rebuild(ctx.saved_tensors, ctx.meta).dequantize()
        return slope.mul_(grad_out).to(ctx.x_dtype), None, None, None, None, None, None


class _QuantizedGate(torch.autograd.Function):
    """y = fn(a) b exactly; saves Q(fn(a)) and Q(f'(a) b); backward dA = Q(f'(a) b) dY,
    dB = Q(fn(a)) dY."""

    @staticmethod
    def forward(ctx, a, b, fn, derivative, bits, seed, stochastic):
        fa = fn(a)
        y = fa * b
        g = derivative(a).mul_(_work(b))
        q_f, q_g = quantize_seeded([fa, g], bits, seed=seed, stochastic=stochastic)
        ctx.save_for_backward(*q_f.tensors, *q_g.tensors)
        ctx.metas, ctx.dtypes = (q_f.meta, q_g.meta), (a.dtype, b.dtype)
        return y

    @staticmethod
    def backward(ctx, grad_out):
        saved = ctx.saved_tensors
        fa = QuantizedTensor.rebuild(saved[:3], ctx.metas[0]).dequantize()
        g = QuantizedTensor.rebuild(saved[3:], ctx.metas[1]).dequantize()
        grad_out = _work(grad_out)
        grad_a = (g * grad_out).to(ctx.dtypes[0])
        grad_b = (_work(fa) * grad_out).to(ctx.dtypes[1])
        return grad_a, grad_b, None, None, None, None, None


def quantized_derivative(
    x: torch.Tensor,
    fn: Callable[[torch.Tensor], torch.Tensor],
    derivative: Derivative,
    *,
    bits: int = DEFAULT_BITS,
    seed: int = 0,
    stochastic: bool = True,
    inplace: bool = False,
) -> torch.Tensor:
    """``fn(x)`` (an elementwise op, exact) whose backward multiplies dY by ``derivative(x)``
    stored in ``bits`` bits, one scale and minimum per row, rounded stochastically with draws
    from ``seed`` (unbiased) or, with ``stochastic=False``, to nearest (biased; for
    comparison). ``inplace``: ``fn`` overwrites ``x``. Without a gradient to compute it is
    ``fn(x)`` itself."""
    check_bits(bits)
    seed = check_seed(seed, "quantized_derivative")
    if not needs_grad(x) or not x.is_floating_point() or x.numel() == 0:
        return fn(x)
    return _QuantizedDerivative.apply(x, fn, derivative, bits, seed, stochastic, inplace)


def quantized_gate(
    a: torch.Tensor,
    b: torch.Tensor,
    fn: Callable[[torch.Tensor], torch.Tensor],
    derivative: Derivative,
    *,
    bits: int = DEFAULT_BITS,
    seed: int = 0,
    stochastic: bool = True,
) -> torch.Tensor:
    """``fn(a) * b`` (exact) storing ``fn(a)`` and ``derivative(a) * b`` in ``bits`` bits each
    (stochastic rounding from ``seed``; ``stochastic=False`` rounds to nearest, biased).
    ``a`` and ``b`` must have one shape. Without a gradient to compute it is ``fn(a) * b``."""
    check_bits(bits)
    seed = check_seed(seed, "quantized_gate")
    if a.shape != b.shape:
        raise ValueError(f"gate: a and b must have the same shape; got {a.shape} and {b.shape}")
    if not needs_grad(a, b) or a.numel() == 0:
        return fn(a) * b
    return _QuantizedGate.apply(a, b, fn, derivative, bits, seed, stochastic)


# --- functional forms ---------------------------------------------------------------------------

_GELU_KIND = {"none": "gelu", "tanh": "gelu_tanh"}


def _gelu_kind(approximate: str) -> str:
    if approximate not in _GELU_KIND:
        raise ValueError(f"approximate must be 'none' or 'tanh'; got {approximate!r}")
    return _GELU_KIND[approximate]


def gelu(
    x: torch.Tensor, approximate: str = "none", *, bits: int = DEFAULT_BITS, seed: int = 0
) -> torch.Tensor:
    """F.gelu storing its derivative in ``bits`` bits (stochastic rounding from ``seed``)."""
    kind = _gelu_kind(approximate)
    fn = functools.partial(F.gelu, approximate=approximate)
    return quantized_derivative(x, fn, DERIVATIVES[kind], bits=bits, seed=seed)


def silu(x: torch.Tensor, *, bits: int = DEFAULT_BITS, seed: int = 0) -> torch.Tensor:
    """F.silu storing its derivative in ``bits`` bits (stochastic rounding from ``seed``)."""
    return quantized_derivative(x, F.silu, silu_grad, bits=bits, seed=seed)


def tanh(x: torch.Tensor, *, bits: int = DEFAULT_BITS, seed: int = 0) -> torch.Tensor:
    """torch.tanh storing its derivative in ``bits`` bits (stochastic rounding from ``seed``)."""
    return quantized_derivative(x, torch.tanh, tanh_grad, bits=bits, seed=seed)


def sigmoid(x: torch.Tensor, *, bits: int = DEFAULT_BITS, seed: int = 0) -> torch.Tensor:
    """torch.sigmoid storing its derivative in ``bits`` bits (stochastic rounding from
    ``seed``)."""
    return quantized_derivative(x, torch.sigmoid, sigmoid_grad, bits=bits, seed=seed)


def swiglu(
    a: torch.Tensor, b: torch.Tensor, *, bits: int = DEFAULT_BITS, seed: int = 0
) -> torch.Tensor:
    """F.silu(a) * b storing silu(a) and silu'(a) b in ``bits`` bits each."""
    return quantized_gate(a, b, F.silu, silu_grad, bits=bits, seed=seed)


def geglu(
    a: torch.Tensor,
    b: torch.Tensor,
    approximate: str = "none",
    *,
    bits: int = DEFAULT_BITS,
    seed: int = 0,
) -> torch.Tensor:
    """F.gelu(a, approximate) * b storing gelu(a) and gelu'(a) b in ``bits`` bits each."""
    kind = _gelu_kind(approximate)
    fn = functools.partial(F.gelu, approximate=approximate)
    return quantized_gate(a, b, fn, DERIVATIVES[kind], bits=bits, seed=seed)


# --- layers -------------------------------------------------------------------------------------


class QuantizedActivation(QuantizedLayer):
    """Base of the converted activation layers (and of the gated MLP): the derivative in
    ``rp_bits()`` bits."""

    rp_default_bits = DEFAULT_BITS

    @property
    def rp_storage(self) -> str:
        return f"{self.rp_bits()}-bit f'(x), stochastic rounding"

    def rp_active(self, x: torch.Tensor) -> bool:
        """Estimates (draws a seed, stores codes) whenever the input's gradient is needed."""
        return needs_grad(x)


class SmoothActivation(QuantizedActivation):
    """An elementwise activation whose backward uses its derivative in k bits; the class sets
    ``rp_kind`` (a key of :data:`DERIVATIVES`) or overrides :meth:`rp_derivative`."""

    rp_kind: ClassVar[str] = ""
    #: the layer's function computed bitwise as the original forward but faster, or None (the
    #: original forward itself)
    rp_value: ClassVar[Callable[[torch.Tensor], torch.Tensor] | None] = None

    def rp_activation_kind(self) -> str:
        """The key of :data:`DERIVATIVES` of this layer's function."""
        return self.rp_kind

    def rp_derivative(self) -> Derivative:
        return DERIVATIVES[self.rp_activation_kind()]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        plain = type(self).rp_value or super().forward  # the exact values
        if not self.rp_active(x) or not x.is_floating_point():
            return plain(x)
        inplace = bool(getattr(self, "inplace", False))
        return _QuantizedDerivative.apply(
            x, plain, self.rp_derivative(), self.rp_bits(), self.rp_next_seed(), True, inplace
        )


class QuantGELU(SmoothActivation, nn.GELU):
    """nn.GELU (either ``approximate``) storing its derivative in k bits."""

    def rp_activation_kind(self) -> str:
        return _gelu_kind(self.approximate)


class QuantSiLU(SmoothActivation, nn.SiLU):
    """nn.SiLU storing its derivative in k bits (``inplace`` as in nn.SiLU)."""

    rp_kind = "silu"


class QuantTanh(SmoothActivation, nn.Tanh):
    """nn.Tanh storing its derivative in k bits."""

    rp_kind = "tanh"


class QuantSigmoid(SmoothActivation, nn.Sigmoid):
    """nn.Sigmoid storing its derivative in k bits."""

    rp_kind = "sigmoid"


#: torch activation type -> its converted class
SMOOTH: dict[type, type] = {
    nn.GELU: QuantGELU,
    nn.SiLU: QuantSiLU,
    nn.Tanh: QuantTanh,
    nn.Sigmoid: QuantSigmoid,
}


# transformers' activation classes, recognised by module and class name (transformers is not
# imported): each is mixed into the class it converts (rp.convert's combined_class), whose own
# forward gives the exact values.


class QuantErfGELU(SmoothActivation):
    """GELU, erf form (transformers' GELUActivation, both its forms)."""

    rp_kind = "gelu"


class QuantTanhGELU(SmoothActivation):
    """GELU, tanh form (NewGELUActivation, GELUTanh, AccurateGELUActivation)."""

    rp_kind = "gelu_tanh"


def new_gelu(x: torch.Tensor) -> torch.Tensor:
    """transformers' NewGELUActivation, ``0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi)
    * (x + 0.044715 * torch.pow(x, 3.0))))``, op for op as written there (each product and sum
    the same rounding: bitwise its output, tested) but in place: two buffers instead of eight,
    about 3x faster on large inputs."""
    inner = torch.pow(x, 3.0).mul_(0.044715).add_(x).mul_(math.sqrt(2.0 / math.pi))
    return torch.mul(x, 0.5).mul_(inner.tanh_().add_(1.0))


class QuantNewGELU(QuantTanhGELU):
    """GELU, tanh form, of transformers' NewGELUActivation (GPT-2), computed by
    :func:`new_gelu`."""

    rp_value = staticmethod(new_gelu)


class QuantFastGELU(SmoothActivation):
    """GELU, tanh form with c = 0.7978845608 (FastGELUActivation)."""

    rp_kind = "gelu_fast"


class QuantQuickGELU(SmoothActivation):
    """x sigmoid(1.702 x) (QuickGELUActivation)."""

    rp_kind = "quick_gelu"


class QuantSiLUMixin(SmoothActivation):
    """x sigmoid(x) (SiLUActivation)."""

    rp_kind = "silu"


_TRANSFORMERS = "transformers.activations"
#: transformers.activations class name -> the mixin converting it
TRANSFORMERS_ACTIVATIONS: dict[str, type[SmoothActivation]] = {
    "GELUActivation": QuantErfGELU,
    "NewGELUActivation": QuantNewGELU,
    "GELUTanh": QuantTanhGELU,
    "AccurateGELUActivation": QuantTanhGELU,
    "FastGELUActivation": QuantFastGELU,
    "QuickGELUActivation": QuantQuickGELU,
    "SiLUActivation": QuantSiLUMixin,
}
#: transformers.activations classes kept as they are, with why
TRANSFORMERS_SKIPPED: dict[str, str] = {
    "ClippedGELUActivation": "clip(gelu(x)) has no k-bit form yet; kept exact",
    "MishActivation": "Mish has no k-bit form yet; kept exact",
    "LaplaceActivation": "Laplace activation has no k-bit form yet; kept exact",
    "ReLUSquaredActivation": "relu(x)^2 has no k-bit form yet; kept exact",
    "SqrtSoftplusActivation": "sqrt(softplus(x)) has no k-bit form yet; kept exact",
    "XIELUActivation": "xIELU (trainable parameters) has no k-bit form yet; kept exact",
}


def _transformers_name(module: nn.Module) -> str | None:
    kind = type(module)
    return kind.__name__ if kind.__module__ == _TRANSFORMERS else None


def activation_kind(module: nn.Module) -> str | None:
    """The key of :data:`DERIVATIVES` for an activation module computing that function
    (converted or not), or None."""
    if isinstance(module, SmoothActivation):
        return module.rp_activation_kind()
    if type(module) is nn.GELU:
        return _GELU_KIND.get(module.approximate)
    if type(module) in SMOOTH:
        return SMOOTH[type(module)].rp_kind
    mixin = TRANSFORMERS_ACTIVATIONS.get(_transformers_name(module) or "")
    return None if mixin is None else mixin.rp_kind


class GatedMLP(QuantizedActivation):
    """A gated MLP ``down_proj(act_fn(gate_proj(x)) * up_proj(x))`` (LlamaMLP and the many
    models sharing its layout: SwiGLU with SiLU, GEGLU with GELU) whose gate stores f(a) and
    f'(a) b in k bits (:func:`quantized_gate`) instead of a, f(a) and b. Mixed into the MLP's
    own class by rp.convert; the projections are converted (or not) on their own."""

    @property
    def rp_storage(self) -> str:
        return f"{self.rp_bits()}-bit f(a) and f'(a) b, stochastic rounding"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.gate_proj(x)
        b = self.up_proj(x)
        act = self.act_fn
        if not needs_grad(a, b) or a.shape != b.shape or not a.is_floating_point():
            return self.down_proj(act(a) * b)
        derivative = DERIVATIVES[activation_kind(act)]
        h = _QuantizedGate.apply(a, b, act, derivative, self.rp_bits(), self.rp_next_seed(), True)
        return self.down_proj(h)


_GATED_MLP_PARTS = ("gate_proj", "up_proj", "down_proj", "act_fn")


def is_gated_mlp(module: nn.Module) -> bool:
    """Duck typing: a class named ``*MLP`` with Linear-like gate_proj, up_proj, down_proj and
    an act_fn whose function is known (SiLU, GELU)."""
    parts = [getattr(module, p, None) for p in _GATED_MLP_PARTS]
    return (
        type(module).__name__.endswith("MLP")
        and all(isinstance(p, nn.Module) for p in parts)
        and activation_kind(parts[-1]) is not None
    )


def activation_class(module: nn.Module) -> tuple[type | None, str] | None:
    """What rp.convert does with ``module``: None when it is no activation this module knows;
    else (the class to swap in, "") or (None, the reason to keep it). A class that is not a
    subclass of ``type(module)`` is a mixin for rp.convert's ``combined_class``."""
    if isinstance(module, QuantizedActivation):
        return None
    kind = type(module)
    if kind in SMOOTH:
        return SMOOTH[kind], ""
    name = _transformers_name(module)
    if name in TRANSFORMERS_ACTIVATIONS:
        return TRANSFORMERS_ACTIVATIONS[name], ""
    if name in TRANSFORMERS_SKIPPED:
        return None, TRANSFORMERS_SKIPPED[name]
    if is_gated_mlp(module):
        return GatedMLP, ""
    return None


def is_activation(module: nn.Module) -> bool:
    """Whether ``module`` is an activation (or gated MLP) this module converts, has converted
    or reports as kept: a line of rp.convert's report."""
    return isinstance(module, QuantizedActivation) or activation_class(module) is not None
