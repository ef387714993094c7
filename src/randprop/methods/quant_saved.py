"""k-bit storage of everything a model saves for backward (GACT style), on saved-tensor hooks.

``quantize_saved(model, bits=4)`` hooks the model so that, while it runs forward, each
floating-point tensor autograd saves is stored as :func:`randprop.quantize.quantize` codes
(``bits`` per element, one float32 scale and minimum per ``group`` elements, stochastic rounding)
and is dequantized when backward reads it. The forward pass is unchanged. This covers the ops
randprop does not convert (activations, normalisations, attention's matmuls and softmax, ...).

Bias. Stochastic rounding is unbiased, E[Q(x)] = x, so a backward that is linear in the saved
tensor stays unbiased: the weight gradient g^T x of Linear / matmul / conv on its saved input,
a product's gradient. A backward nonlinear in it is biased: tanh's (1 - y^2) g has expectation
(1 - y^2 - Var Q(y)) g; sigmoid, softmax, GELU, SiLU and LayerNorm likewise; ReLU's mask
1[Q(y) > 0] drops the outputs that round to zero. benchmarks/results/quant/saved-bias.md gives
the measured bias per op and width (|E g - g| / |g| at 2 bits: tanh 4%, GELU 4%, SiLU 2%; at 4
bits 0.2% or less; ReLU 22%, 11% and 2.5% at 2, 4 and 8 bits); ``deny`` such modules (or use
randprop's compact exact layers, e.g. the 1-bit ReLU mask) where it matters.

Never quantized: the model's parameters and buffers and any tensor sharing storage with one
(F.linear saves the weight: it stays exact), other nn.Parameters, non-floating tensors (masks,
indices), tensors under ``min_numel`` elements or that the codes would not shrink, and, unless
``converted=True``, what randprop's converted layers save (their stored form is already their
method's choice; a method's own ``bits`` is the unbiased way to shrink it further).

Saved tensors already held by an enclosing saved-tensor hook (``rp.track_saved``,
``torch.autograd.graph.save_on_cpu``) still go through it: the hook here hands the codes, scales
and minima (or the unquantized tensor) to the enclosing pair, so ``track_saved`` around the
model's call counts the quantized bytes. torch applies only the innermost pair of hooks and has
no public way to read the enclosing one: this reads it with
``torch._C._autograd._top_saved_tensors_default_hooks`` (what torch's AOT autograd uses).
Double backward (``create_graph=True``) through a quantized model is not supported.
"""

from __future__ import annotations

import fnmatch
import math
import weakref
from collections import defaultdict
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

import torch
from torch import nn

from randprop.config import check_seed
from randprop.methods.base import ConvertedLayer
from randprop.quantize import QuantizedTensor, check_bits, quantize
from randprop.random import SUBSEED_QUANT, current_rank, derive_seed, generator, name_id, subseed

#: an allow / deny entry: an fnmatch pattern of module qualified names, or a module class
Pattern = str | type[nn.Module]

#: models with an active handle (one handle per model)
_ACTIVE: weakref.WeakKeyDictionary[nn.Module, SavedQuantization] = weakref.WeakKeyDictionary()


class _Scope(NamedTuple):
    """Where a tensor is saved: the innermost running module and what its ancestors allow."""

    name: str
    allowed: bool
    denied: bool
    converted: bool


class _Quantized:
    """A saved tensor in codes: the enclosing hook's packed codes, scales and minima."""

    __slots__ = ("meta", "pieces", "unpack", "__weakref__")

    def __init__(self, meta: tuple, pieces: tuple, unpack: Callable[[Any], torch.Tensor]) -> None:
        self.meta, self.pieces, self.unpack = meta, pieces, unpack


class _Passed:
    """A saved tensor left exact, as the enclosing hook packed it."""

    __slots__ = ("value", "unpack")

    def __init__(self, value: Any, unpack: Callable[[Any], torch.Tensor]) -> None:
        self.value, self.unpack = value, unpack


def _identity(x: Any) -> Any:
    return x


def _enclosing_hooks() -> tuple[Callable, Callable] | None:
    """The saved-tensor hooks in force now (None: none)."""
    return torch._C._autograd._top_saved_tensors_default_hooks(False)


def _storage_key(t: torch.Tensor) -> tuple:
    storage = t.untyped_storage()
    return (t.device, storage.data_ptr(), storage.nbytes())


def _patterns(value: object, name: str) -> tuple[Pattern, ...] | None:
    """``value`` (None, one pattern, or an iterable of them) as a tuple of patterns."""
    if value is None:
        return None
    items = [value] if isinstance(value, (str, type)) else value
    try:
        items = list(items)
    except TypeError:
        items = [items]
    for item in items:
        if not isinstance(item, str) and not (
            isinstance(item, type) and issubclass(item, nn.Module)
        ):
            raise TypeError(
                f"{name} must be None, or fnmatch patterns of module names (str) and nn.Module "
                f"classes; got {item!r}"
            )
    return tuple(items)


def _matches(patterns: tuple[Pattern, ...], name: str, module: nn.Module) -> bool:
    return any(
        fnmatch.fnmatchcase(name, p) if isinstance(p, str) else isinstance(module, p)
        for p in patterns
    )


class SavedQuantization:
    """Store every floating tensor ``model``'s forward saves for backward in ``bits``-bit codes
    (1, 2, 4 or 8; stochastic rounding, E[Q(x)] = x), until ``remove()`` or the end of a
    ``with`` block around the handle (public name: ``rp.quantize_saved``).

    group: elements per scale and minimum (None: one per row, the last dimension).
    allow, deny: fnmatch patterns of module qualified names (as ``model.named_modules()`` gives
        them, "" the model itself) or nn.Module classes; a tensor is quantized when it is saved
        inside (at any depth) a module that ``allow`` matches (None: every module) and no
        module that ``deny`` matches. A string pattern matching no name is an error.
    min_numel: smaller tensors stay exact.
    converted: also quantize what randprop's converted layers save (default: left alone).
    seed: run seed of the rounding draws, independent of the converted layers' draws.

    Gradients through ops whose backward is linear in what they save (Linear, conv, matmul) stay
    unbiased; through nonlinear ones (tanh, sigmoid, softmax, GELU, LayerNorm, ReLU) they are
    biased: see the module docstring.

    .quantized: {module name: tensors quantized while it was the innermost running module},
    counted over all forwards since the hooks went on (a tensor saved twice counts once).
    .step: forward passes run with gradients enabled (the draws of pass t come from
    (seed, t, rank, device)).
    """

    def __init__(
        self,
        model: nn.Module,
        bits: int = 4,
        group: int | None = None,
        *,
        allow: Pattern | Iterable[Pattern] | None = None,
        deny: Pattern | Iterable[Pattern] | None = None,
        min_numel: int = 1024,
        converted: bool = False,
        seed: int = 0,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module; got {type(model).__name__}")
        self.bits = check_bits(bits)
        if group is not None and (
            isinstance(group, bool) or not isinstance(group, int) or group < 1
        ):
            raise ValueError(f"group must be a positive int or None (per row); got {group!r}")
        self.group = group
        self.allow = _patterns(allow, "allow")
        self.deny = _patterns(deny, "deny")
        if isinstance(min_numel, bool) or not isinstance(min_numel, int) or min_numel < 0:
            raise ValueError(f"min_numel must be an int >= 0; got {min_numel!r}")
        self.min_numel = min_numel
        if not isinstance(converted, bool):
            raise TypeError(f"converted must be True or False; got {converted!r}")
        self.converted = converted
        self.seed = check_seed(seed)
        modules = dict(model.named_modules())
        for label, patterns in (("allow", self.allow), ("deny", self.deny)):
            for p in patterns or ():
                if isinstance(p, str) and not any(fnmatch.fnmatchcase(n, p) for n in modules):
                    raise ValueError(
                        f"{label} pattern {p!r} matches no module name of the model; names: "
                        f"{', '.join(repr(n) for n in list(modules)[:12])}"
                        f"{', ...' if len(modules) > 12 else ''}"
                    )
        if model in _ACTIVE:
            raise ValueError("model already has quantize_saved hooks: remove() them first")
        self.model = model
        self.quantized: dict[str, int] = defaultdict(int)
        self.step = 0
        self._quant_seed = subseed(seed, SUBSEED_QUANT)
        self._stack: list[_Scope] = []
        self._depth = 0
        self._context: torch.autograd.graph.saved_tensors_hooks | None = None
        self._outer: tuple[Callable, Callable] = (_identity, _identity)
        self._state: set[tuple] = set()
        self._generators: dict[torch.device, torch.Generator] = {}
        self._rank = 0
        self._cache: dict[tuple, tuple[weakref.ref, weakref.ref]] = {}
        self._handles = []
        for name, module in modules.items():
            own = (
                self.allow is None or _matches(self.allow, name, module),
                self.deny is not None and _matches(self.deny, name, module),
                isinstance(module, ConvertedLayer),
            )
            root = module is model
            pre = self._enter_root if root else self._enter
            self._handles.append(module.register_forward_pre_hook(pre(name, *own)))
            post = self._leave_root if root else self._leave
            self._handles.append(module.register_forward_hook(post, always_call=True))
        _ACTIVE[model] = self

    # -- scopes: which module is running
    def _scope(self, name: str, allowed: bool, denied: bool, converted: bool) -> _Scope:
        if self._stack:
            parent = self._stack[-1]
            # a pattern matching a module covers everything that runs inside it
            allowed, denied = allowed or parent.allowed, denied or parent.denied
            converted = converted or parent.converted
        return _Scope(name, allowed, denied, converted)

    def _enter(self, name: str, allowed: bool, denied: bool, converted: bool):
        def hook(module: nn.Module, args: Any) -> None:
            if self._depth:
                self._stack.append(self._scope(name, allowed, denied, converted))

        return hook

    def _leave(self, module: nn.Module, args: Any, output: Any) -> None:
        if self._depth and len(self._stack) > 1:
            self._stack.pop()

    def _enter_root(self, name: str, allowed: bool, denied: bool, converted: bool):
        def hook(module: nn.Module, args: Any) -> None:
            if not self._depth:
                self._begin()
            self._depth += 1
            self._stack.append(self._scope(name, allowed, denied, converted))

        return hook

    def _leave_root(self, module: nn.Module, args: Any, output: Any) -> None:
        if not self._depth:  # an earlier pre-hook raised before ours ran
            return
        if self._stack:
            self._stack.pop()
        self._depth -= 1
        if not self._depth:
            self._end()

    def _begin(self) -> None:
        """Start of a forward: fresh draws, the state to leave exact, the hooks pushed."""
        if torch.is_grad_enabled():
            self.step += 1
        self._rank = current_rank()
        self._generators = {}
        self._state = {_storage_key(t) for t in (*self.model.parameters(), *self.model.buffers())}
        outer = _enclosing_hooks()
        self._outer = outer if outer is not None else (_identity, _identity)
        self._context = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
        self._context.__enter__()

    def _end(self) -> None:
        if self._context is not None:
            self._context.__exit__(None, None, None)
        self._context = None
        self._stack.clear()
        self._cache.clear()
        self._outer = (_identity, _identity)

    # -- saved tensors
    def _quantizes(self, t: torch.Tensor) -> bool:
        scope = self._stack[-1]
        if not scope.allowed or scope.denied or (scope.converted and not self.converted):
            return False
        if type(t) is not torch.Tensor or t.layout != torch.strided:
            return False  # nn.Parameter and other subclasses, sparse layouts
        if not t.is_floating_point() or t.numel() < max(self.min_numel, 1):
            return False
        if _storage_key(t) in self._state or isinstance(t._base, nn.Parameter):
            return False
        group = self.group or (max(t.shape[-1], 1) if t.dim() else 1)
        compact = math.ceil(t.numel() * self.bits / 8) + 8 * math.ceil(t.numel() / group)
        return compact < t.numel() * t.element_size()

    def _generator(self, device: torch.device) -> torch.Generator:
        gen = self._generators.get(device)
        if gen is None:
            seed = derive_seed(self._quant_seed, name_id(str(device)), self.step, self._rank)
            gen = self._generators[device] = generator(seed, device)
        return gen

    def _pack(self, t: torch.Tensor) -> Any:
        pack, unpack = self._outer
        if not self._quantizes(t):
            return _Passed(pack(t), unpack)
        # a tensor saved twice (y * y, an output saved by its op and the next) is stored once
        key = (_storage_key(t), t.storage_offset(), t.shape, t.stride(), t._version)
        hit = self._cache.get(key)
        if hit is not None and hit[0]() is t and hit[1]() is not None:
            return hit[1]()
        codes = quantize(t, self.bits, self.group, generator=self._generator(t.device))
        packed = _Quantized(codes.meta, tuple(pack(p) for p in codes.tensors), unpack)
        self._cache[key] = (weakref.ref(t), weakref.ref(packed))
        self.quantized[self._stack[-1].name] += 1
        return packed

    @staticmethod
    def _unpack(packed: _Quantized | _Passed) -> torch.Tensor:
        if isinstance(packed, _Passed):
            return packed.unpack(packed.value)
        tensors = tuple(packed.unpack(p) for p in packed.pieces)
        return QuantizedTensor.rebuild(tensors, packed.meta).dequantize()

    # -- life cycle
    def remove(self) -> None:
        """Take the hooks off: the model saves plain tensors again."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        if _ACTIVE.get(self.model) is self:
            del _ACTIVE[self.model]
        self.quantized = dict(self.quantized)

    def __enter__(self) -> SavedQuantization:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


#: the public name: ``rp.quantize_saved(model, bits=4, ...)`` returns the handle
quantize_saved = SavedQuantization
