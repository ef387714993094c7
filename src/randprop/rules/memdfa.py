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
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from randprop.rules._core import BoundaryHooks, FeedbackMatrices, boundaries
from randprop.rules.registry import LossFn, register_rule


class MemDFA:
    """MEM-DFA on ``model``: ``.backward(x, y)`` runs both passes, leaves gradients in .grad
    (accumulating, like loss.backward()) and returns the loss. Outside .backward the model
    behaves as usual. blocks and seed as in :class:`randprop.rules.DFA`."""

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
        self.boundaries = boundaries(model, blocks)
        self._pass: str | None = None  # None (inactive), "probe" (pass 1) or "update" (pass 2)
        self._error: torch.Tensor | None = None
        self._last: tuple[int, torch.Tensor] | None = None
        self._output_index: int | None = None
        self._hooks = BoundaryHooks(model, self.boundaries, self._boundary, self._output)

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
        buffers = [(b, b.clone()) for b in self.model.buffers()]
        try:
            with torch.random.fork_rng(devices=devices), torch.no_grad():
                self._pass = "probe"
                out = self.model(x)
                for buffer, saved in buffers:
                    buffer.copy_(saved)
            del buffers
            out = out.detach().requires_grad_()
            with torch.enable_grad():
                (self._error,) = torch.autograd.grad(self.loss_fn(out, y), out)
                self._pass = "update"
                loss = self.loss_fn(self.model(x), y)
                loss.backward()
        finally:
            self._pass, self._error, self._last = None, None, None
        return loss.detach()

    def remove(self) -> None:
        """Remove the hooks."""
        self._hooks.remove()


@register_rule("memdfa")
def memdfa_rule(model: nn.Module, loss_fn: LossFn, seed: int = 0) -> MemDFA:
    """MEM-DFA: DFA in two forward passes, activation memory constant in depth."""
    return MemDFA(model, loss_fn, seed=seed)
