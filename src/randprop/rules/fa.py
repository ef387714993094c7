"""Feedback alignment (Lillicrap et al., 2016): backward through a fixed random matrix B, not W.

For y = x W^T + b (Linear) or y = conv(x, W) + b: dL/dW and dL/db are exact, dL/dx = g B
(Linear) or conv_transpose(g, B) (conv), with B of W's shape, He-normal N(0, 2/fan_in), fixed for
the run by (seed, layer index). FA(model) swaps the class of every plain nn.Linear / nn.ConvNd
to a subclass with the same parameters and state_dict keys, by randprop.convert's swap (its
layers keep the layer protocol of randprop.methods.base); .remove(), or rp.restore(model),
swaps them back. B is drawn once and kept (``store=True``) or regenerated from its seed in every
backward pass (``store=False``: no memory for B, one Gaussian draw per layer and step).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from randprop import random as rnd
from randprop.convert import restore_layer, swap_layer
from randprop.methods.base import ConvertedLayer, RandomizedLayer, autocast_inputs, explicit_padding
from randprop.rules._core import InstalledRule, he_normal
from randprop.rules.registry import LossFn, register_rule


class _FAMixin(ConvertedLayer):
    rp_rule = "rp.rules.FA"  # rp.convert refuses layers under a rule
    rp_fa_seed: int
    rp_fa_feedback: torch.Tensor | None  # the stored B, or None to regenerate it

    def rp_feedback(self) -> torch.Tensor:
        if self.rp_fa_feedback is not None:
            return self.rp_fa_feedback
        w = self.weight
        return he_normal(tuple(w.shape), w[0].numel(), self.rp_fa_seed, w.device, w.dtype)

    def rp_release(self) -> None:
        """Called on restore: a plain layer has no feedback matrix."""
        self.__dict__.pop("rp_fa_seed", None)
        self.__dict__.pop("rp_fa_feedback", None)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rule=fa"


class _FALinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, layer):
        ctx.save_for_backward(x)
        ctx.layer, ctx.has_bias = layer, bias is not None
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        b = ctx.layer.rp_feedback().to(g.dtype)
        g2, x2 = g.reshape(-1, g.shape[-1]), x.reshape(-1, x.shape[-1])
        grad_x = g @ b if ctx.needs_input_grad[0] else None
        grad_w = g2.T @ x2 if ctx.needs_input_grad[1] else None
        grad_b = g2.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return grad_x, grad_w, grad_b, None


class FALinear(_FAMixin, nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, w, b = autocast_inputs(x, self.weight, self.bias)
        return _FALinearFn.apply(x, w, b, self)


def _conv_args(layer: nn.Module, padding: tuple[int, ...]) -> tuple:
    """aten.convolution's (stride, padding, dilation, transposed, output_padding, groups)."""
    return layer.stride, padding, layer.dilation, False, (0,) * len(padding), layer.groups


class _FAConvFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, layer, padding):
        ctx.save_for_backward(x)
        ctx.layer, ctx.bias_shape = layer, None if bias is None else bias.shape
        ctx.args = _conv_args(layer, padding)
        return torch.ops.aten.convolution(x, weight, bias, *ctx.args)

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        layer, args = ctx.layer, ctx.args
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            b = layer.rp_feedback().to(g.dtype)
            grad_x = torch.ops.aten.convolution_backward(
                g, x, b, None, *args, [True, False, False]
            )[0]
        if any(ctx.needs_input_grad[1:3]):
            w = layer.weight.to(g.dtype)
            mask = [False, ctx.needs_input_grad[1], ctx.needs_input_grad[2]]
            _, grad_w, grad_b = torch.ops.aten.convolution_backward(
                g, x, w, ctx.bias_shape, *args, mask
            )
        return grad_x, grad_w, grad_b, None, None


class _FAConv(_FAMixin):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, padding = explicit_padding(self, x)  # padding modes and 'same' / 'valid'
        x, w, b = autocast_inputs(x, self.weight, self.bias)
        return _FAConvFn.apply(x, w, b, self, tuple(padding))


class FAConv1d(_FAConv, nn.Conv1d):
    pass


class FAConv2d(_FAConv, nn.Conv2d):
    pass


class FAConv3d(_FAConv, nn.Conv3d):
    pass


_LAYERS: dict[type, type] = {
    nn.Linear: FALinear,
    nn.Conv1d: FAConv1d,
    nn.Conv2d: FAConv2d,
    nn.Conv3d: FAConv3d,
}


class FA(InstalledRule):
    """Feedback alignment on every plain Linear / Conv1d-3d of ``model`` (in place).

    .layers: names of the converted layers; .feedback: {name: B}
    (the stored matrices, empty with store=False; they may be overwritten in place).
    """

    def __init__(
        self, model: nn.Module, *, loss_fn: LossFn | None = None, seed: int = 0, store: bool = True
    ) -> None:
        super().__init__(model, loss_fn)
        if store not in (True, False):
            raise ValueError(f"store must be True or False, got {store!r}")
        self.layers: list[str] = []
        self.feedback: dict[str, torch.Tensor] = {}
        self._swapped: list[nn.Module] = []
        converted = [
            n or "<root>" for n, m in model.named_modules() if isinstance(m, RandomizedLayer)
        ]
        if converted:
            raise ValueError(
                f"layers {', '.join(converted)} were converted by rp.convert; FA replaces their "
                "backward pass too: call rp.restore(model) before rp.rules.FA"
            )
        for name, module in model.named_modules():
            cls = _LAYERS.get(type(module))
            if cls is None:
                continue
            self._swapped.append(module)
            swap_layer(module, cls)
            module.rp_fa_seed = rnd.derive_seed(seed, len(self.layers), stream=rnd.STREAM_FA)
            module.rp_fa_feedback = None
            if store:
                module.rp_fa_feedback = module.rp_feedback()
                self.feedback[name] = module.rp_fa_feedback
            self.layers.append(name)
        if not self.layers:
            raise ValueError("FA found no nn.Linear / nn.Conv1d-3d layer in the model")

    def remove(self) -> None:
        """Give the layers their original classes back (parameters untouched); the layers that
        rp.restore already gave back are left as they are."""
        for module in self._swapped:
            if isinstance(module, _FAMixin):
                restore_layer(module)
        self._swapped.clear()


@register_rule("fa")
def fa_rule(model: nn.Module, loss_fn: LossFn, seed: int = 0) -> FA:
    """Feedback alignment: fixed random matrices B replace W^T in the backward pass."""
    return FA(model, loss_fn=loss_fn, seed=seed)
