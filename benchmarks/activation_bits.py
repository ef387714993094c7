"""Choose the default code width of stored activation derivatives (randprop.methods.activations).

GPT-2-style MLP block, Linear(256, 1024) -> GELU (tanh form) -> Linear(1024, 256), on
8 x 128 tokens, loss <R, output> with a fixed random R. For each width k: the variance that
stochastic rounding of f'(x) adds to the gradients of the first Linear's weight and of the
block's input, relative to their squared norms, E|g - g_exact|^2 / |g_exact|^2 over K draws;
the bias of round-to-nearest, |E g - g_exact| / |g_exact|; and bytes stored per element.

    PYTHONPATH=src python benchmarks/activation_bits.py
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from randprop.methods.activations import gelu_tanh_grad, quantized_derivative

DRAWS = 16


def main() -> None:
    gen = torch.Generator().manual_seed(0)
    tokens, d, hidden = 8 * 128, 256, 1024
    x = torch.randn(tokens, d, generator=gen)
    w1 = torch.randn(hidden, d, generator=gen) / d**0.5
    w2 = torch.randn(d, hidden, generator=gen) / hidden**0.5
    r = torch.randn(tokens, d, generator=gen)

    def grads(act) -> torch.Tensor:
        xs, w = x.clone().requires_grad_(), w1.clone().requires_grad_()
        out = F.linear(act(F.linear(xs, w)), w2)
        return torch.autograd.grad((out * r).sum(), (w, xs))

    def gelu(t):
        return F.gelu(t, approximate="tanh")

    exact = grads(gelu)
    print(
        "| bits | bytes / element | rel. variance dW1 | rel. variance dX | rel. bias, nearest dW1 |"
    )
    print("|---|---|---|---|---|")
    for bits in (1, 2, 4, 8):
        var = [0.0, 0.0]
        quantized = functools.partial(
            quantized_derivative, fn=gelu, derivative=gelu_tanh_grad, bits=bits
        )
        for seed in range(DRAWS):
            g = grads(functools.partial(quantized, seed=seed))
            for i in range(2):
                var[i] += ((g[i] - exact[i]).norm() ** 2 / exact[i].norm() ** 2).item() / DRAWS
        near = grads(functools.partial(quantized, stochastic=False))
        bias = ((near[0] - exact[0]).norm() / exact[0].norm()).item()
        per_element = bits / 8 + 8 / hidden
        print(f"| {bits} | {per_element:.3f} | {var[0]:.2e} | {var[1]:.2e} | {bias:.2e} |")
    print(
        "PyTorch: F.gelu(tanh) keeps 4 bytes / element (x); NewGELUActivation's written-out form 16"
    )


if __name__ == "__main__":
    main()
