"""MEM-DFA (Chu et al., 2020): the DFA update with activation memory constant in depth.

Pass 1 runs the model without grad and gives the output error e = dL/d(output). Pass 2 runs the
forward again with grad; as each hidden block's output h_l is reached, B_l e is pushed into the
block's parameters at once (torch.autograd.backward(h_l, B_l e)), which frees the block's saved
activations, and the next block reads h_l.detach(). The output block then backpropagates the loss.
At most one block's activations are held at a time, for one extra forward pass. With the same
B_l, parameters and batch this is exactly the DFA update.

Both passes see the same randomness and statistics: pass 1 runs inside torch.random.fork_rng, so
pass 2 draws the same dropout masks (and leaves the global RNG where one forward pass would), and
the model's buffers (batch-norm running statistics) are restored after pass 1, so they are
updated once per step.

Under DistributedDataParallel (plain or static_graph) pass 2 produces the hidden blocks'
gradients during the forward pass, before DDP's reducer expects any; so MemDFA runs both passes
on the wrapped module itself and does what DDP would: it broadcasts rank 0's buffers before
pass 1 (when DDP syncs buffers; estimator state excluded from that is left alone) and averages
the gradients over the ranks in one all-reduce at the end.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from randprop.rules._core import BoundaryHooks, FeedbackMatrices, boundaries
from randprop.rules.registry import LossFn, register_rule


class MemDFA:
    """MEM-DFA on ``model``: ``.backward(x, y)`` runs both passes, leaves gradients in .grad
    (accumulating, like loss.backward()) and returns the loss. Outside .backward the model
    behaves as usual. blocks and seed as in :class:`randprop.rules.DFA`. ``model`` may be
    wrapped in DistributedDataParallel (blocks then name submodules of ``model.module``), or
    ``.model`` set to such a wrapper of it after construction."""

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        blocks: Sequence[nn.Module] | None = None,
        *,
        seed: int = 0,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"MemDFA: model must be an nn.Module; got {type(model).__name__}")
        if not callable(loss_fn):
            raise TypeError(
                f"MemDFA: loss_fn must be callable (output, target) -> loss; "
                f"got {type(loss_fn).__name__}"
            )
        self.model, self.loss_fn = model, loss_fn
        self.feedback = FeedbackMatrices(seed)
        ddp = isinstance(model, DistributedDataParallel)
        self._net = model.module if ddp else model  # the module the passes run
        self.boundaries = boundaries(self._net, blocks)
        self._pass: str | None = None  # None (inactive), "probe" (pass 1) or "update" (pass 2)
        self._error: torch.Tensor | None = None
        self._last: tuple[int, torch.Tensor] | None = None
        self._output_index: int | None = None
        self._hooks = BoundaryHooks(self._net, self.boundaries, self._boundary, self._output)

    def _boundary(self, index: int, h: torch.Tensor) -> torch.Tensor:
        if self._pass == "probe":
            self._last = (index, h)
        elif self._pass == "update" and index != self._output_index and h.requires_grad:
            torch.autograd.backward(h, self.feedback.project(index, self._error, h.shape, h.dtype))
            return h.detach()
        return h

    def _output(self, out: torch.Tensor) -> torch.Tensor:
        if self._pass == "probe":  # did the last listed block produce the output?
            last, self._last = self._last, None
            self._output_index = last[0] if last is not None and last[1] is out else None
        return out

    def backward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Both passes on the batch (x, y); returns the (detached) loss."""
        devices = [x.device.index or 0] if x.device.type == "cuda" else []
        ddp = self.model if isinstance(self.model, DistributedDataParallel) else None
        if ddp is not None:
            _broadcast_buffers(ddp)
        buffers = [(b, b.clone()) for b in self._net.buffers()]
        try:
            with torch.random.fork_rng(devices=devices), torch.no_grad():
                self._pass = "probe"
                out = self._net(x)
                for buffer, saved in buffers:
                    buffer.copy_(saved)
            del buffers
            out = out.detach().requires_grad_()
            with torch.enable_grad():
                (self._error,) = torch.autograd.grad(self.loss_fn(out, y), out)
                self._pass = "update"
                loss = self.loss_fn(self._net(x), y)
                loss.backward()
        finally:
            self._pass, self._error, self._last = None, None, None
        if ddp is not None:
            _average_gradients(ddp)
        return loss.detach()

    def remove(self) -> None:
        """Remove the hooks."""
        self._hooks.remove()


def _broadcast_buffers(ddp: DistributedDataParallel) -> None:
    """Rank 0's buffers to every rank, as DDP's forward does (unless it syncs no buffers), the
    buffers DDP ignores (per-rank estimator state) excepted."""
    if not ddp.broadcast_buffers:
        return
    for name, buffer in ddp.module.named_buffers():
        if name not in ddp.parameters_to_ignore:
            dist.broadcast(buffer, 0, group=ddp.process_group)


def _average_gradients(ddp: DistributedDataParallel) -> None:
    """Replace every parameter's .grad by its mean over ``ddp``'s process group (a missing
    gradient counts as zero), in one all-reduce."""
    params = [p for p in ddp.module.parameters() if p.requires_grad]
    grads = [torch.zeros_like(p) if p.grad is None else p.grad for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, group=ddp.process_group)
    flat /= dist.get_world_size(ddp.process_group)
    for p, g in zip(params, flat.split([g.numel() for g in grads]), strict=True):
        p.grad = g.view_as(p).clone()


@register_rule("memdfa")
def memdfa_rule(model: nn.Module, loss_fn: LossFn, seed: int = 0) -> MemDFA:
    """MEM-DFA: DFA in two forward passes, activation memory constant in depth."""
    return MemDFA(model, loss_fn, seed=seed)
