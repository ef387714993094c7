"""Fused, chunked lm-head and cross-entropy: the loss of ``F.linear`` then ``F.cross_entropy``
without keeping the logits for backward.

Exact: for rows x_i with logits z_i = W x_i + b, target t_i and label smoothing e over C classes,

    loss_i = lse(z_i) - (1 - e) z_{i,t_i} - (e / C) sum_j z_{i,j},
    dL/dz_i = g_i (softmax(z_i) - (1 - e) onehot(t_i) - e / C),

g_i the upstream gradient of row i (reduction "mean": g / the number of rows not ignored; rows
whose target is ``ignore_index`` get 0). The forward runs over chunks of rows and keeps, besides
the input, weight, bias and target, one float per row: lse(z_i). Backward recomputes each chunk's
logits from them and accumulates dX = dZ W, dW = dZ^T X, db = sum dZ, so no rows x classes
tensor outlives its chunk (PyTorch keeps the logits, or their log-softmax, for backward: 4 bytes
per row per class in float32). Logits are reduced in float32 (float64 for float64 inputs).
"""

from __future__ import annotations

import torch
from torch import nn

from randprop.methods.base import autocast_dtype, autocast_inputs

REDUCTIONS = ("mean", "sum", "none")
#: default chunk: about this many logits at once (16 MiB in float32)
CHUNK_ELEMENTS = 2**22


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _chunk_terms(x, weight, bias, target, valid, smoothing):
    """float logits of the rows ``x``, and the part of the loss that is linear in them:
    (1 - e) z_t + (e / C) sum_j z_j (0 on ignored rows)."""
    logits = torch.addmm(bias, x, weight.t()) if bias is not None else x @ weight.t()
    logits = logits.to(_work_dtype(x.dtype))
    linear = logits.gather(1, target.unsqueeze(1)).squeeze(1) * (1 - smoothing)
    if smoothing:
        linear = linear + logits.mean(1) * smoothing
    return logits, torch.where(valid, linear, 0)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, target, ignore_index, reduction, smoothing, chunk):
        valid = target != ignore_index
        safe = torch.where(valid, target, 0)
        rows = x.shape[0]
        lse = x.new_empty(rows, dtype=_work_dtype(x.dtype))
        losses = torch.empty_like(lse)
        for start in range(0, rows, chunk):
            part = slice(start, start + chunk)
            logits, linear = _chunk_terms(x[part], weight, bias, safe[part], valid[part], smoothing)
            lse[part] = torch.logsumexp(logits, 1)
            losses[part] = torch.where(valid[part], lse[part], 0) - linear
        ctx.save_for_backward(x, weight, bias, target, lse)
        ctx.ignore_index, ctx.reduction, ctx.smoothing, ctx.chunk = (
            ignore_index, reduction, smoothing, chunk,
        )  # fmt: skip
        if reduction == "none":
            return losses
        total = losses.sum()
        return total / valid.sum() if reduction == "mean" else total

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, bias, target, lse = ctx.saved_tensors
        valid = target != ctx.ignore_index
        safe = torch.where(valid, target, 0)
        work = lse.dtype
        if ctx.reduction == "mean":
            scale = (grad_out.to(work) / valid.sum()).expand_as(lse)
        else:
            scale = grad_out.to(work).expand_as(lse)
        scale = torch.where(valid, scale, 0)
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        grad_x = torch.empty_like(x) if need_x else None
        grad_w = torch.zeros_like(weight, dtype=work) if need_w else None
        grad_b = torch.zeros_like(bias, dtype=work) if need_b else None
        classes = weight.shape[0]
        for start in range(0, x.shape[0], ctx.chunk):
            part = slice(start, start + ctx.chunk)
            xs = x[part]
            logits = torch.addmm(bias, xs, weight.t()) if bias is not None else xs @ weight.t()
            dz = (logits.to(work) - lse[part].unsqueeze(1)).exp_()  # softmax
            dz.scatter_add_(
                1, safe[part].unsqueeze(1),
                torch.full_like(dz[:, :1], -(1 - ctx.smoothing)),
            )  # fmt: skip
            if ctx.smoothing:
                dz -= ctx.smoothing / classes
            dz *= scale[part].unsqueeze(1)
            if need_b:
                grad_b += dz.sum(0)
            if need_w:
                grad_w.addmm_(dz.t(), xs.to(work))
            if need_x:
                grad_x[part] = dz.to(x.dtype) @ weight
        grad_w = None if grad_w is None else grad_w.to(weight.dtype)
        grad_b = None if grad_b is None else grad_b.to(bias.dtype)
        return grad_x, grad_w, grad_b, None, None, None, None, None


def _check(input, weight, bias, target, reduction, label_smoothing, chunk_size) -> None:
    if not isinstance(input, torch.Tensor) or not input.is_floating_point() or input.dim() < 1:
        raise TypeError("input must be a floating-point tensor of shape (*, in_features)")
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise ValueError("weight must be a 2-D tensor (num_classes, in_features)")
    if weight.shape[1] != input.shape[-1]:
        raise ValueError(
            f"weight must be (num_classes, in_features={input.shape[-1]}) for an input of shape "
            f"{tuple(input.shape)}; got weight of shape {tuple(weight.shape)}"
        )
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(
            f"bias must be None or of shape ({weight.shape[0]},); got {tuple(bias.shape)}"
        )
    if autocast_dtype(input.device.type) is None:
        for name, t in (("weight", weight), ("bias", bias)):
            if t is not None and t.dtype != input.dtype:
                raise TypeError(f"{name} must have input's dtype {input.dtype}; got {t.dtype}")
    if not isinstance(target, torch.Tensor) or target.dtype not in (torch.int64, torch.int32):
        got = target.dtype if isinstance(target, torch.Tensor) else type(target).__name__
        raise TypeError(f"target must be a tensor of class indices (int64 or int32); got {got}")
    if target.shape != input.shape[:-1]:
        raise ValueError(
            f"target must have shape input.shape[:-1] = {tuple(input.shape[:-1])}; got "
            f"{tuple(target.shape)}"
        )
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {', '.join(REDUCTIONS)}; got {reduction!r}")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1]; got {label_smoothing}")
    if chunk_size is not None and (
        isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1
    ):
        raise ValueError(f"chunk_size must be a positive int or None; got {chunk_size!r}")


def linear_cross_entropy(
    input: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """``F.cross_entropy(F.linear(input, weight, bias).flatten(0, -2), target.flatten())``,
    without keeping the logits for backward (see the module doc).

    input (*, in_features), weight (num_classes, in_features), target (*) of class indices;
    reduction "none" returns shape (*). chunk_size: rows per chunk, None for about 2^22 logits
    at once. Under autocast the matmuls run in the autocast dtype and the loss is float32, as
    autocast runs F.linear and F.cross_entropy.
    """
    _check(input, weight, bias, target, reduction, label_smoothing, chunk_size)
    cast = autocast_dtype(input.device.type) is not None
    out_dtype = torch.float32 if cast else input.dtype
    x, weight, bias = autocast_inputs(input, weight, bias)
    shape = target.shape
    x = x.reshape(-1, x.shape[-1])
    target = target.reshape(-1).long()
    chunk = chunk_size or max(1, CHUNK_ELEMENTS // max(1, weight.shape[0]))
    with torch.autocast(x.device.type, enabled=False):
        loss = _LinearCrossEntropy.apply(
            x, weight, bias, target, ignore_index, reduction, float(label_smoothing), chunk
        )
    loss = loss.to(out_dtype)
    return loss.reshape(shape) if reduction == "none" else loss


class LinearCrossEntropy(nn.Module):
    """Loss module: ``lm_head`` (an nn.Linear) then cross-entropy, fused as
    :func:`linear_cross_entropy`; ``forward(hidden, target)``. The lm-head is held, not copied:
    its parameters get the gradients."""

    def __init__(
        self,
        lm_head: nn.Linear,
        *,
        ignore_index: int = -100,
        reduction: str = "mean",
        label_smoothing: float = 0.0,
        chunk_size: int | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(lm_head, nn.Linear):
            raise TypeError(f"lm_head must be an nn.Linear; got {type(lm_head).__name__}")
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {', '.join(REDUCTIONS)}; got {reduction!r}")
        self.lm_head = lm_head
        self.ignore_index, self.reduction = ignore_index, reduction
        self.label_smoothing, self.chunk_size = label_smoothing, chunk_size

    def forward(self, hidden: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return linear_cross_entropy(
            hidden,
            self.lm_head.weight,
            target,
            self.lm_head.bias,
            ignore_index=self.ignore_index,
            reduction=self.reduction,
            label_smoothing=self.label_smoothing,
            chunk_size=self.chunk_size,
        )

    def extra_repr(self) -> str:
        return f"ignore_index={self.ignore_index}, reduction={self.reduction!r}"
