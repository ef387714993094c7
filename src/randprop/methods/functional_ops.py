"""Functional calls inside a converted model's forward, redirected to their compact forms.

Hand-written models call ``F.relu``, ``F.gelu``, ``F.silu``, ``torch.tanh``, ``F.layer_norm``,
``F.dropout`` inside a forward, where rp.convert's module swaps cannot reach them.
``rp.convert(..., functional_ops=True)`` installs forward hooks on the model that enter a
``torch.overrides.TorchFunctionMode`` around its forward; while it is active the calls in
:data:`INTERCEPTED` run as the compact forms of methods.masks (exact 1-bit masks),
methods.activations (k-bit f'(x)), methods.norms (k-bit normalised input) and methods.dropout
(1-bit mask), with the same values. A call is redirected only when autograd records it (grad
enabled and an input requires grad); otherwise it is the plain op.

Not redirected: calls inside the forward of a module that convert swaps or decides about (a
converted layer, or an activation / norm / dropout module it skipped): those are the module's own
business, so nothing is intercepted twice. The compact forms run their ops inside an autograd
Function's forward, where grad is off, and the mode is off inside its own handler.

Seeds: the i-th call of an intercepted function in the model's s-th forward (i counts every such
call, redirected or not, so positions do not depend on grad mode) draws its stochastic rounding
from ``derive_seed(derive_seed(seed, name_id(prefix + "<functional>"), s, rank), i)``: runs are
bitwise repeatable and the global RNG is never touched (dropout keeps its own policy, a seed from
the default CPU generator that checkpointing restores; see methods.dropout). Every module call
records (s, i) at its start; an activation-checkpoint recompute (it runs in backward, where the
mode is not active) re-enters the mode at the first hooked module it calls with the recorded
(s, i) of that module's latest call, so it replays the same seeds (non-reentrant and reentrant
checkpoint alike). Functional calls of a checkpointed region that are not inside a submodule of
the model (a bare function passed to checkpoint) are not replayed; checkpoint modules.
"""

from __future__ import annotations

import collections
import weakref
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils.hooks import RemovableHandle

from randprop.methods import activations, masks, norms
from randprop.methods.base import ConvertedLayer, in_backward, needs_grad
from randprop.methods.dropout import dropout
from randprop.random import current_rank, derive_seed, name_id

#: what the report says the mode cannot cover
NOT_COVERED = (
    "products and matmuls (torch.matmul, @, *: SwiGLU written out, rotary embeddings), softmax "
    "outside scaled_dot_product_attention, in-place F.silu and torch.tanh_ / sigmoid_, "
    "functions not listed, calls on tensors that do not require grad (plain, nothing to save), "
    "calls in a checkpointed region outside every submodule of the model"
)

_PLAIN = object()  # an adapter's answer: run the original function


def _records(*tensors: torch.Tensor | None) -> bool:
    """Autograd records the call and its input is a non-empty float tensor."""
    x = tensors[0]
    return needs_grad(*tensors) and x.is_floating_point() and x.numel() > 0


class _Run:
    """The state one model's hooks and mode share: run seed, forward step, call position."""

    def __init__(self, seed: int, name: str, act_bits: int, norm_bits: int) -> None:
        self.seed, self.layer = seed, name_id(name)
        self.act_bits, self.norm_bits = act_bits, norm_bits
        self.step = 0  # forwards started
        self.current = 0  # the step of the forward running (or being recomputed)
        self.position = 0  # calls of intercepted functions so far in it
        self.guard = 0  # depth of module forwards whose calls are left alone
        self.mode: FunctionalOpsMode | None = None
        self.frames: list[tuple[bool, bool]] = []  # per module call: (entered, guarded)
        self.pending: weakref.WeakKeyDictionary[nn.Module, collections.deque] = (
            weakref.WeakKeyDictionary()
        )

    def seed_at(self, position: int) -> int:
        """The seed of the call at ``position`` of the current forward."""
        base = derive_seed(self.seed, self.layer, self.current, current_rank())
        return derive_seed(base, position)

    def __getstate__(self) -> dict[str, Any]:  # a deepcopy / pickle starts afresh
        return {k: v for k, v in self.__dict__.items() if k not in ("mode", "pending", "frames")}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.mode, self.frames, self.guard = None, [], 0
        self.pending = weakref.WeakKeyDictionary()


# --- adapters: the torch function's own signature after (run, position) ------------------------


def _relu(run: _Run, i: int, input, inplace=False):
    return masks.relu(input, inplace) if _records(input) else _PLAIN


def _leaky_relu(run: _Run, i: int, input, negative_slope=0.01, inplace=False):
    return masks.leaky_relu(input, negative_slope, inplace) if _records(input) else _PLAIN


def _smooth(fn: Callable[..., torch.Tensor]) -> Callable[..., Any]:
    def adapter(run: _Run, i: int, input, *, out=None):
        if out is not None or not _records(input):
            return _PLAIN
        return fn(input, bits=run.act_bits, seed=run.seed_at(i))

    return adapter


def _gelu(run: _Run, i: int, input, approximate="none"):
    if not _records(input) or approximate not in ("none", "tanh"):
        return _PLAIN
    return activations.gelu(input, approximate, bits=run.act_bits, seed=run.seed_at(i))


def _silu(run: _Run, i: int, input, inplace=False):
    if inplace or not _records(input):
        return _PLAIN
    return activations.silu(input, bits=run.act_bits, seed=run.seed_at(i))


def _layer_norm(run: _Run, i: int, input, normalized_shape, weight=None, bias=None, eps=1e-5):
    if not _records(input, weight, bias):
        return _PLAIN
    return norms.layer_norm(input, normalized_shape, weight, bias, eps, bits=run.norm_bits,
                            seed=run.seed_at(i))  # fmt: skip


def _rms_norm(run: _Run, i: int, input, normalized_shape, weight=None, eps=None):
    if not _records(input, weight):
        return _PLAIN
    return norms.rms_norm(input, normalized_shape, weight, eps, bits=run.norm_bits,
                          seed=run.seed_at(i))  # fmt: skip


def _group_norm(run: _Run, i: int, input, num_groups, weight=None, bias=None, eps=1e-5):
    if not _records(input, weight, bias):
        return _PLAIN
    return norms.group_norm(input, num_groups, weight, bias, eps, bits=run.norm_bits,
                            seed=run.seed_at(i))  # fmt: skip


def _dropout(run: _Run, i: int, input, p=0.5, training=True, inplace=False):
    return dropout(input, p, training, inplace) if _records(input) else _PLAIN


_TANH, _SIGMOID = _smooth(activations.tanh), _smooth(activations.sigmoid)

#: the functions redirected while the mode is active -> their adapter
INTERCEPTED: dict[Callable[..., Any], Callable[..., Any]] = {
    F.relu: _relu,
    torch.relu: _relu,
    torch.Tensor.relu: _relu,
    F.leaky_relu: _leaky_relu,
    F.gelu: _gelu,
    F.silu: _silu,
    torch.tanh: _TANH,
    torch.Tensor.tanh: _TANH,
    torch.sigmoid: _SIGMOID,
    torch.Tensor.sigmoid: _SIGMOID,
    F.layer_norm: _layer_norm,
    F.group_norm: _group_norm,
    F.dropout: _dropout,
}
if hasattr(F, "rms_norm"):
    INTERCEPTED[F.rms_norm] = _rms_norm

#: the names the report lists
INTERCEPTED_NAMES = (
    "F.relu, torch.relu, F.leaky_relu (1-bit masks); F.gelu, F.silu, torch.tanh, torch.sigmoid "
    "and their Tensor methods (k-bit f'(x)); F.layer_norm, F.group_norm, F.rms_norm (k-bit "
    "normalised input); F.dropout (1-bit mask)"
)


class FunctionalOpsMode(TorchFunctionMode):
    """Redirects the calls in :data:`INTERCEPTED` to their compact forms (module doc)."""

    def __init__(self, run: _Run) -> None:
        super().__init__()
        self.run = run

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        adapter = INTERCEPTED.get(func)
        run = self.run
        if adapter is None or run.guard:
            return func(*args, **kwargs)
        position, run.position = run.position, run.position + 1
        out = adapter(run, position, *args, **kwargs)
        return func(*args, **kwargs) if out is _PLAIN else out


class FunctionalOpsHook:
    """Forward pre-hook and forward hook (one object, both roles) of one module of the model:
    the root enters the mode around its forward; every module records where its calls start
    and re-enters the mode when an activation-checkpoint recompute calls it (module doc)."""

    def __init__(self, run: _Run, root: bool, guarded: bool) -> None:
        self.run, self.root, self.guarded = run, root, guarded

    def pre(self, module: nn.Module, args: tuple) -> None:
        run = self.run
        entered = False
        if run.mode is None:
            if in_backward():
                entered = self._replay(module)
            elif self.root:
                run.current, run.step, run.position = run.step, run.step + 1, 0
                entered = True
            if entered:
                run.mode = FunctionalOpsMode(run)
                run.mode.__enter__()
        if run.mode is not None and not in_backward():
            pending = run.pending.get(module)
            if pending is None:
                pending = run.pending[module] = collections.deque(maxlen=_MAX_PENDING)
            pending.append((run.current, run.position))
        run.guard += self.guarded
        run.frames.append((entered, self.guarded))

    def _replay(self, module: nn.Module) -> bool:
        pending = self.run.pending.get(module)
        if not pending:
            return False
        self.run.current, self.run.position = pending.pop()
        return True

    def post(self, module: nn.Module, args: tuple, output: Any) -> None:
        run = self.run
        if not run.frames:
            return
        entered, guarded = run.frames.pop()
        run.guard -= guarded
        if entered and run.mode is not None:
            mode, run.mode = run.mode, None
            mode.__exit__(None, None, None)


#: most module calls remembered per module for a recompute (as base.MAX_PENDING)
_MAX_PENDING = 256


def install(
    model: nn.Module,
    seed: int,
    prefix: str,
    act_bits: int,
    norm_bits: int,
    leave_alone: Callable[[nn.Module], bool],
) -> list[RemovableHandle]:
    """Hook every module of ``model`` so that its forward runs under :class:`FunctionalOpsMode`,
    except inside converted layers and the modules ``leave_alone`` names; returns the hook
    handles (remove them to uninstall)."""
    run = _Run(seed, ".".join(filter(None, (prefix, "<functional>"))), act_bits, norm_bits)
    handles = []
    for module in model.modules():
        guarded = isinstance(module, ConvertedLayer) or leave_alone(module)
        hook = FunctionalOpsHook(run, module is model, guarded)
        handles.append(module.register_forward_pre_hook(hook.pre))
        handles.append(module.register_forward_hook(hook.post, always_call=True))
    return handles
