"""Direct feedback alignment (Nokland, 2016) installed on a model by forward hooks.

With e = dL/d(output) and fixed random B_l, every hidden block l receives B_l e at its output h_l
in place of the backpropagated dL/dh_l (so a block Linear -> ReLU gets delta_l = (B_l e) * f'(a_l),
dW_l = delta_l^T h_{l-1}); inside a block, and in the output block, derivatives are exact. The
gradient between blocks is cut: block l+1 reads h_l.detach(). A single autograd node at the
network output receives e and hands B_l e to every h_l, so an ordinary ``loss.backward()`` runs
DFA with no targets passed to the forward pass. Memory is that of backprop (all activations are
kept); MemDFA trades one extra forward pass for memory constant in depth.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from randprop.rules._core import BoundaryHooks, FeedbackMatrices, InstalledRule, boundaries
from randprop.rules.registry import LossFn, register_rule


class _Inject(torch.autograd.Function):
    """Identity on the output; backward sends e to the output and B_l e to each block output."""

    @staticmethod
    def forward(ctx, feedback, indices, out, *hidden):
        ctx.feedback, ctx.indices = feedback, indices
        ctx.meta = [(h.shape, h.dtype) for h in hidden]
        return out.view_as(out)

    @staticmethod
    def backward(ctx, e):
        grads = [
            ctx.feedback.project(i, e, shape, dtype)
            for i, (shape, dtype) in zip(ctx.indices, ctx.meta, strict=True)
        ]
        return None, None, e, *grads


class DFA(InstalledRule):
    """Direct feedback alignment on ``model``; train with loss.backward() (or .backward(x, y)).

    blocks: see :func:`randprop.rules._core.boundaries` (None: BlockOutput markers, or the blocks
    of an nn.Sequential). seed: fixes every B_l (the same B_l as a MemDFA with the same seed).
    """

    def __init__(
        self,
        model: nn.Module,
        blocks: Sequence[nn.Module] | None = None,
        *,
        loss_fn: LossFn | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__(model, loss_fn)
        self.feedback = FeedbackMatrices(seed)
        self.boundaries = boundaries(model, blocks)
        self._pending: list[tuple[int, torch.Tensor, torch.Tensor]] = []
        self._hooks = BoundaryHooks(model, self.boundaries, self._cut, self._inject)

    def _cut(self, index: int, h: torch.Tensor) -> torch.Tensor:
        if index == 0:
            self._pending.clear()
        if not (torch.is_grad_enabled() and h.requires_grad):
            return h
        cut = h.detach()
        self._pending.append((index, h, cut))
        return cut

    def _inject(self, out: torch.Tensor) -> torch.Tensor:
        pending, self._pending = self._pending, []
        if not pending:
            return out
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"DFA needs a model returning a tensor, got {type(out).__name__}")
        if pending[-1][2] is out:  # the last listed block produced the output: exact error
            out = pending.pop()[1]
        if not pending:
            return out
        indices = [index for index, _, _ in pending]
        return _Inject.apply(self.feedback, indices, out, *[h for _, h, _ in pending])

    def remove(self) -> None:
        """Remove the hooks: the model backpropagates exactly again."""
        self._hooks.remove()


@register_rule("dfa")
def dfa_rule(model: nn.Module, loss_fn: LossFn, seed: int = 0) -> DFA:
    """Direct feedback alignment: the output error reaches every block through fixed random B_l."""
    return DFA(model, loss_fn=loss_fn, seed=seed)
