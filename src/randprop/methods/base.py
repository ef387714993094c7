"""What every converted layer shares: the layer protocol (:class:`ConvertedLayer`), its method
config and seed stream (:class:`RandomizedLayer`), estimator state across steps
(:class:`LayerState`), autocast and padding handling, and the convolution forward."""

from __future__ import annotations

import collections
import operator
import weakref
from collections.abc import Callable
from typing import Any, ClassVar, TypeVar

import torch
import torch.nn.functional as F
from torch import nn

from randprop.config import METHODS, MethodConfig, check_seed, parse_method
from randprop.quantize import BITS, check_bits
from randprop.random import current_rank, derive_seed, name_id, next_seed

ConfigT = TypeVar("ConfigT", bound=MethodConfig)
LayerT = TypeVar("LayerT", bound="ConvertedLayer")


def method_config(
    method: MethodConfig | str,
    allowed: type[ConfigT] | tuple[type[ConfigT], ...],
    owner: str,
) -> ConfigT:
    """``method`` (a config or its string form) as a config of an ``allowed`` class; a
    TypeError naming ``owner`` and the allowed config types otherwise."""
    allowed = allowed if isinstance(allowed, tuple) else (allowed,)
    cfg = parse_method(method)
    if not isinstance(cfg, allowed):
        raise TypeError(
            f"{owner}: method must be a {' or '.join(c.__name__ for c in allowed)} config or "
            f"its string form (e.g. {allowed[0].name!r}); got {cfg}"
        )
    return cfg


def torch_class(cls: type) -> type:
    """The torch layer class a randprop layer class replaces: the class after ConvertedLayer in
    its MRO (``torch_class(RADLinear) is nn.Linear``; mixins such as LayerState come before)."""
    mro = cls.__mro__
    return mro[mro.index(ConvertedLayer) + 1]


class ConvertedLayer(nn.Module):
    """The layer protocol: what ``rp.convert`` / ``rp.restore`` / ``rp.method_state`` use of a
    class they swap into a model. Every layer class a method registers (and every compact exact
    layer, and FA's layers) derives from it, first, before the torch class it replaces
    (``class RADLinear(RandomizedLayer, nn.Linear)``); the defaults here are what a class gets
    by not overriding a hook.

    A converted layer is the torch layer itself with its class swapped: it keeps the parameters
    and state_dict keys, and may only add attributes that :meth:`rp_release` removes again.
    Subclasses define no ``__init__``: the one here takes the torch class's own signature
    (``MaskedReLU(inplace=True)``), and :meth:`from_module` converts an existing layer.
    """

    #: what the layer stores for backward, as the conversion report shows it (a RandomizedLayer
    #: shows its method config instead)
    rp_storage: ClassVar[str] = ""
    #: names of the non-persistent buffers holding estimator state across steps (see
    #: :class:`LayerState`); non-empty makes ``rp.method_state`` save them with the step
    rp_buffers: ClassVar[tuple[str, ...]] = ()
    #: the learning rule that swapped this class in and owns the layer's backward pass (FA:
    #: "rp.rules.FA"; rp.convert refuses such layers), or "" for a converted layer
    rp_rule: ClassVar[str] = ""
    #: the class the layer had before conversion; set on the instance by the swap, removed by
    #: restore
    rp_original_class: type

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        """Build the layer as its torch class does from the same arguments."""
        super().__init__(*args, **kwargs)
        self._rp_check(self)
        self.rp_original_class = torch_class(type(self))

    @classmethod
    def from_module(cls: type[LayerT], module: nn.Module) -> LayerT:
        """A layer of this class sharing ``module``'s parameters, buffers and hooks (``module``
        itself is left as it is); what ``rp.convert`` does to one layer, in place."""
        base = torch_class(cls)
        if isinstance(module, ConvertedLayer) or type(module) is not base:
            raise TypeError(
                f"{cls.__name__}.from_module takes a {base.__name__}; got "
                f"{type(module).__name__} (rp.convert also converts subclasses)"
            )
        cls._rp_check(module)
        layer = cls.__new__(cls)
        layer.__dict__.update(
            {k: v.copy() if isinstance(v, (dict, list)) else v for k, v in module.__dict__.items()}
        )
        layer.rp_original_class = base
        return layer

    @classmethod
    def _rp_check(cls, module: nn.Module) -> None:
        reason = cls.rp_unsupported(module)
        if reason:
            raise ValueError(f"{cls.__name__}: {reason.removesuffix('; kept exact')}")

    @staticmethod
    def rp_unsupported(module: nn.Module) -> str | None:
        """Called by convert before swapping ``module``'s class to this one: the reason to keep
        it as it is (a setting this class does not handle), shown in the report; or None to
        convert it. Default: None."""
        return None

    def rp_release(self) -> None:
        """Called by restore just before the original class comes back: remove what a plain
        layer does not have (state buffers, attributes). Default: nothing to remove."""

    def rp_state(self) -> dict[str, torch.Tensor]:
        """Called by ``rp.method_state``: copies of the estimator state. Default: none."""
        return {}

    def rp_load_state(self, state: dict[str, torch.Tensor]) -> None:
        """Called by ``rp.load_method_state`` with what :meth:`rp_state` returned. Default:
        nothing to load."""


class RandomizedLayer(ConvertedLayer):
    """Converted layer with a method config and a seed stream; ``convert`` swaps a layer's class
    and sets ``rp_method`` (the config), ``rp_seed`` (the run seed), ``rp_layer`` and
    ``rp_step`` (0). Built directly, it takes the torch class's signature plus the keywords
    ``method`` (a config of the layer's method or its string form; default: that method's
    defaults), ``seed`` and ``name`` (the qualified name hashed into ``rp_layer``):
    ``RADLinear(4, 3, method=rp.RAD(keep=0.1))``, ``RADLinear.from_module(linear, "rad")``.

    The layer keeps its parameters and state_dict keys. A forward call whose gradient the
    method estimates may be needed (grad enabled and the weight requires grad; SparseVJP and
    AOP's input target: also when only the input does) draws a fresh seed
    ``derive_seed(rp_seed, rp_layer, rp_step, rank)`` and advances ``rp_step``; any other call
    (no_grad, inference_mode, a frozen weight) is the plain layer: no seed drawn, nothing
    extra stored. Train / eval mode plays no part: eval() with grad enabled (fine-tuning with
    frozen batch-norm statistics, saliency maps) still estimates. ``rp_layer`` is the stable
    hash of the layer's qualified name (see ``rp.convert``).
    """

    rp_method: MethodConfig
    rp_seed: int = 0
    rp_layer: int = 0

    def __init__(
        self,
        *args: Any,
        method: MethodConfig | str | None = None,
        seed: int = 0,
        name: str = "",
        **kwargs: Any,
    ) -> None:
        """The torch class's own arguments; then the method config, run seed and layer name."""
        super().__init__(*args, **kwargs)
        self._rp_configure(method, seed, name)

    @classmethod
    def from_module(
        cls: type[LayerT],
        module: nn.Module,
        method: MethodConfig | str | None = None,
        seed: int = 0,
        name: str = "",
    ) -> LayerT:
        """A layer of this class with ``method`` sharing ``module``'s parameters (``module``
        itself is left as it is); ``name``: its qualified name in the model, as convert
        would hash it into ``rp_layer``."""
        cls.rp_method_types()  # a clear error for an unregistered class, before anything else
        layer = super().from_module(module)
        layer._rp_configure(method, seed, name)
        return layer

    @classmethod
    def rp_method_types(cls) -> tuple[type[MethodConfig], ...]:
        """The config classes that register this class (or a class it derives from) with
        ``register_layers``: the methods it can run."""
        types = tuple(
            cfg
            for cfg in dict.fromkeys(METHODS.values())
            if any(layer in cfg.layer_types.values() for layer in cls.__mro__)
        )
        if not types:
            raise TypeError(f"{cls.__name__} is not registered with any method (register_layers)")
        return types

    def _rp_configure(self, method: MethodConfig | str | None, seed: int, name: str) -> None:
        types = self.rp_method_types()
        owner = type(self).__name__
        if method is None and len(types) > 1:
            names = ", ".join(t.__name__ for t in types)
            raise TypeError(f"{owner}: give method= (one of the configs {names})")
        cfg = types[0]() if method is None else method_config(method, types, owner)
        seed = check_seed(seed, owner)
        if not isinstance(name, str):
            raise TypeError(f"{owner}: name must be a str; got {type(name).__name__}")
        self.rp_method, self.rp_seed, self.rp_layer = cfg, seed, name_id(name)
        self.rp_step = 0

    @property
    def rp_storage(self) -> str:
        """The method config's string form (what the report shows)."""
        return str(self.rp_method)

    def rp_active(self, x: torch.Tensor) -> bool:
        """Called by forward: whether this call estimates (draws a seed, stores the method's
        compact form) or is the plain layer. Default: :meth:`rp_needs_weight_grad`; a method
        that also acts on the input gradient (SparseVJP) says so here."""
        return self.rp_needs_weight_grad()

    @property
    def rp_step(self) -> int:
        """Forward calls that drew a seed so far; kept in a 0-dim int64 CPU tensor
        (``rp_step_count``) that a compiled graph advances in place (see :meth:`rp_next_seed`)."""
        count = self.__dict__.get("rp_step_count")
        return 0 if count is None else int(count)

    @rp_step.setter
    def rp_step(self, value: int) -> None:
        with torch.inference_mode(False):  # a normal tensor, advanced in place later
            self.__dict__["rp_step_count"] = torch.tensor(int(value), dtype=torch.int64)

    def rp_next_seed(self) -> int | torch.Tensor:
        """The seed of this forward call. Outside a backward pass: a fresh draw (``rp_step``
        advances), also pushed on the layer's record of seeds awaiting a recompute. Inside one,
        the call is an activation-checkpoint recompute (see :func:`replayed_seed`). While
        torch.compile traces: the seed as a 0-dim int64 tensor computed in the graph from the
        step counter, which the graph advances (no recompile per step; checkpoint replay is not
        recorded)."""
        if torch.compiler.is_compiling():
            return next_seed(self.rp_step_count, self.rp_seed, self.rp_layer, current_rank())
        pending = _PENDING.get(self)
        recompute = in_backward()
        if recompute:
            seed = replayed_seed(pending)
            if seed is not None:
                return seed
        count = self.rp_step_count
        seed = derive_seed(self.rp_seed, self.rp_layer, int(count), current_rank())
        count.add_(1)
        if not recompute:
            if pending is None:
                pending = _PENDING[self] = collections.deque(maxlen=MAX_PENDING)
            pending.append(seed)
        return seed

    def rp_needs_weight_grad(self) -> bool:
        """False under no_grad or for a frozen weight (whatever the train / eval mode): then
        the plain forward runs, no seed is drawn and nothing random is stored."""
        return torch.is_grad_enabled() and self.weight.requires_grad

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, method={self.rp_method}"


#: per layer, the seeds drawn by forward calls that a checkpoint may recompute (newest last);
#: held outside the module so that it never reaches a state_dict, a pickle or a deepcopy
_PENDING: weakref.WeakKeyDictionary[nn.Module, collections.deque[int]] = weakref.WeakKeyDictionary()
#: most seeds remembered per layer (calls awaiting their recompute in one forward); older ones
#: are forgotten, and a recompute of such a call draws afresh
MAX_PENDING = 256


class QuantizedLayer(RandomizedLayer):
    """Base of the compact layers that store k-bit codes for every memory-saving method (the
    activations and norms): a seed stream as every RandomizedLayer has and the code width
    :meth:`rp_bits`. ``rp_method`` is the config of the conversion (None when built directly);
    the layer reads only its ``bits``, if it has one."""

    rp_method: MethodConfig | None = None
    #: the width given by ``bits=`` (None: the method's, else ``rp_default_bits``)
    rp_bits_given: int | None = None
    rp_default_bits: ClassVar[int] = 4

    def __init__(
        self,
        *args: Any,
        bits: int | None = None,
        method: MethodConfig | str | None = None,
        seed: int = 0,
        name: str = "",
        **kwargs: Any,
    ) -> None:
        """The torch class's own arguments; then the code width, method, run seed and name."""
        super().__init__(*args, method=method, seed=seed, name=name, **kwargs)
        self._set_bits(bits)

    @classmethod
    def from_module(
        cls,
        module: nn.Module,
        method: MethodConfig | str | None = None,
        seed: int = 0,
        name: str = "",
        bits: int | None = None,
    ):
        """A layer of this class sharing ``module``'s state (``module`` is left as it is)."""
        layer = super().from_module(module, method, seed, name)
        layer._set_bits(bits)
        return layer

    @classmethod
    def rp_method_types(cls) -> tuple[type[MethodConfig], ...]:
        """Every memory-saving method converts these layers."""
        return tuple(c for c in dict.fromkeys(METHODS.values()) if c.saves_memory)

    def _rp_configure(self, method: MethodConfig | str | None, seed: int, name: str) -> None:
        owner = type(self).__name__
        if not isinstance(name, str):
            raise TypeError(f"{owner}: name must be a str; got {type(name).__name__}")
        self.rp_method = None if method is None else parse_method(method)
        self.rp_seed, self.rp_layer = check_seed(seed, owner), name_id(name)
        self.rp_step = 0

    def _set_bits(self, bits: int | None) -> None:
        if bits is not None:
            self.rp_bits_given = check_bits(bits)

    def rp_bits(self) -> int:
        """Code width: ``bits=`` if given, else the method's ``bits`` (when it has a k-bit
        one), else ``rp_default_bits``."""
        if self.rp_bits_given is not None:
            return self.rp_bits_given
        bits = getattr(self.rp_method, "bits", None)
        return bits if isinstance(bits, int) and bits in BITS else self.rp_default_bits

    def rp_release(self) -> None:
        self.__dict__.pop("rp_bits_given", None)

    def extra_repr(self) -> str:
        plain = super(RandomizedLayer, self).extra_repr()  # the torch class's
        return ", ".join(filter(None, (plain, f"bits={self.rp_bits()}")))


def needs_grad(*tensors: torch.Tensor | None) -> bool:
    """Whether autograd records: grad mode on and one of ``tensors`` requires grad."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def in_backward() -> bool:
    """True while the autograd engine runs a backward pass on this thread.

    A converted layer's forward running then is an activation-checkpoint recompute
    (torch.utils.checkpoint recomputes inside backward in both modes). torch has no public
    query for this; torch.utils.checkpoint itself uses the same private call.
    """
    return torch._C._current_graph_task_id() != -1


def replayed_seed(pending: collections.deque[int] | None) -> int | None:
    """The seed a recompute replays: the newest seed still awaiting one, removed from the record.

    Non-reentrant checkpoint: the original forward drew and recorded the seed, and backward
    recomputes the latest region first, so the newest record is this call's (exact for a layer
    called once per checkpointed region, shared across regions included; a layer called several
    times inside one region gets its draws back in reverse order). Reentrant checkpoint: the
    original forward ran under no_grad and drew nothing, so nothing is recorded and the
    recompute draws the fresh seed itself, the one a plain forward would have drawn (None).
    """
    return pending.pop() if pending else None


def autocast_dtype(device_type: str) -> torch.dtype | None:
    """The autocast dtype active for ``device_type``, or None when autocast is off."""
    try:
        if torch.is_autocast_enabled(device_type):
            return torch.get_autocast_dtype(device_type)
    except TypeError:  # torch < 2.4
        if device_type == "cpu" and torch.is_autocast_cpu_enabled():
            return torch.get_autocast_cpu_dtype()
        if device_type == "cuda" and torch.is_autocast_enabled():
            return torch.get_autocast_gpu_dtype()
    return None


def autocast_inputs(*tensors: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
    """Cast floating tensors to the active autocast dtype, as autocast does for matmul and conv.

    The casts are differentiable, so gradients reach the original (e.g. float32) tensors.
    """
    first = next(t for t in tensors if t is not None)
    dtype = autocast_dtype(first.device.type)
    if dtype is None:
        return tensors
    return tuple(t.to(dtype) if t is not None and t.is_floating_point() else t for t in tensors)


def weight_to_save(ctx, weight: torch.Tensor) -> torch.Tensor | None:
    """The weight, saved only when the input gradient (D W) needs its values, as F.linear and
    conv do: under autocast it is a cast copy that would otherwise stay alive for nothing.
    Records ctx.weight_shape for :func:`saved_weight`."""
    ctx.weight_shape = weight.shape
    return weight if ctx.needs_input_grad[0] else None


def saved_weight(ctx, weight: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    """The saved weight, or a zero-stride stand-in of its shape (and ``like``'s dtype) where
    only its shape is read."""
    return like.new_zeros(()).expand(ctx.weight_shape) if weight is None else weight


#: (stride, padding, dilation, output_padding, groups) as aten.convolution takes them
ConvArgs = tuple[list[int], list[int], list[int], list[int], int]


def conv_forward(ctx, x, weight, bias, stride, padding, dilation, groups) -> torch.Tensor:
    """The exact convolution (1d/2d/3d by the rank of ``x``); records on ``ctx`` what a converted
    convolution's backward needs: ctx.conv, ctx.x_shape, ctx.bias_shape."""
    zeros = [0] * (x.dim() - 2)
    ctx.conv = (stride, padding, dilation, zeros, groups)
    ctx.x_shape = x.shape
    ctx.bias_shape = None if bias is None else list(bias.shape)
    return torch.ops.aten.convolution(
        x, weight, bias, stride, padding, dilation, False, zeros, groups
    )


def conv_backward(grad, x, x_shape, weight, bias_shape, conv: ConvArgs, mask):
    """aten.convolution_backward. When ``x`` is None (no weight gradient: the input and bias
    gradients never read the input's values) the input gradient is the transposed convolution
    of ``grad`` to ``x_shape`` and the bias gradient the sum of ``grad``, so that no
    input-sized stand-in for ``x`` is made (convolution_backward would materialise one)."""
    stride, padding, dilation, zeros, groups = conv
    if x is None:
        if mask[1]:
            raise ValueError("conv_backward: the weight gradient needs the input x, got None")
        grad_x = grad_b = None
        if mask[0]:
            sizes = zip(
                x_shape[2:],
                grad.shape[2:],
                stride,
                padding,
                dilation,
                weight.shape[2:],
                strict=True,
            )
            extra = [n - ((g - 1) * s - 2 * p + d * (k - 1) + 1) for n, g, s, p, d, k in sizes]
            grad_x = torch.convolution(
                grad, weight, None, stride, padding, dilation, True, extra, groups
            )
        if mask[2]:
            grad_b = grad.sum([0, *range(2, grad.dim())])
        return grad_x, None, grad_b
    return torch.ops.aten.convolution_backward(
        grad, x, weight, bias_shape, stride, padding, dilation, False, zeros, groups, mask
    )


def explicit_padding(conv: nn.modules.conv._ConvNd, x: torch.Tensor):
    """(input, padding) with non-zero padding modes and 'same' applied to the input by F.pad,
    so that the convolution itself only ever sees symmetric zero padding."""
    if conv.padding_mode != "zeros":
        x = F.pad(x, conv._reversed_padding_repeated_twice, mode=conv.padding_mode)
        return x, (0,) * (x.dim() - 2)
    if isinstance(conv.padding, str):
        if conv.padding == "valid":
            return x, (0,) * (x.dim() - 2)
        return F.pad(x, conv._reversed_padding_repeated_twice), (0,) * (x.dim() - 2)
    return x, conv.padding


_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
#: a method's batched convolution: (x, weight, bias, stride, padding, dilation, groups) with
#: lists of ints and symmetric zero padding
ConvCore = Callable[..., torch.Tensor]


def conv_nd(
    core: ConvCore,
    dims: int | None,
    input: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    stride: int | tuple[int, ...],
    padding: str | int | tuple[int, ...],
    dilation: int | tuple[int, ...],
    groups: int,
) -> torch.Tensor:
    """``core`` called with the arguments of ``F.conv{dims}d`` (dims None: by the weight's
    rank) made explicit as F.conv does: ints repeated per spatial dim, unbatched input given a
    batch of one, 'valid' as no padding and 'same' as padding (d (k - 1)) // 2 on both sides
    plus, where d (k - 1) is odd, one zero column more on the right, added by F.pad. Arguments
    F.conv rejects get its own error."""
    dims = weight.dim() - 2 if dims is None else dims
    shapes_ok = dims in _CONV and weight.dim() == dims + 2 and input.dim() in (dims + 1, dims + 2)
    if not shapes_ok or padding not in ("valid", "same") and isinstance(padding, str):
        return _CONV.get(dims, F.conv2d)(input, weight, bias, stride, padding, dilation, groups)
    stride, dilation = _ntuple(stride, dims), _ntuple(dilation, dims)
    unbatched = input.dim() == dims + 1
    x = input.unsqueeze(0) if unbatched else input
    if padding == "valid":
        padding = [0] * dims
    elif padding == "same":
        if any(s != 1 for s in stride):  # F.conv's error
            return _CONV[dims](input, weight, bias, stride, padding, dilation, groups)
        total = [d * (k - 1) for d, k in zip(dilation, weight.shape[2:], strict=True)]
        padding = [t // 2 for t in total]
        extra = [t % 2 for t in reversed(total)]  # F.pad lists the last dim first
        if any(extra):
            x = F.pad(x, [p for e in extra for p in (0, e)])
    else:
        padding = _ntuple(padding, dims)
    out = core(x, weight, bias, stride, padding, dilation, groups)
    return out.squeeze(0) if unbatched else out


def _ntuple(value: int | tuple[int, ...], dims: int) -> list[int]:
    return (
        [operator.index(v) for v in value] if isinstance(value, (tuple, list)) else [value] * dims
    )


class RandomizedConvNd(RandomizedLayer):
    """Forward shared by converted convolutions: the plain convolution when no estimate is
    needed, else a non-zero padding mode applied by F.pad and then the method's functional
    convolution ``rp_conv`` (the signature of F.conv2d, any rank, with keywords ``method`` and
    ``seed``)."""

    #: the method's functional convolution (1d/2d/3d by the rank of its weight)
    rp_conv: staticmethod

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() not in (self.weight.dim() - 1, self.weight.dim()) or not self.rp_active(x):
            return self._conv_forward(x, self.weight, self.bias)
        padding = self.padding
        if self.padding_mode != "zeros":
            x = F.pad(x, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            padding = 0
        conv = type(self).rp_conv
        return conv(x, self.weight, self.bias, self.stride, padding, self.dilation, self.groups,
                    method=self.rp_method, seed=self.rp_next_seed())  # fmt: skip


# --- estimator state across steps --------------------------------------------------------------


class LayerState(nn.Module):
    """Mixin (listed before RandomizedLayer): estimator state in non-persistent buffers named in
    ``rp_buffers``, created on first use, plus plain attributes named in ``rp_counters``
    (counts kept with it). The state_dict keeps the plain layer's keys; loading one resets the
    state (the weights it was built on are replaced), except that buffers found in it (as saved
    before they became non-persistent) are restored. :meth:`rp_state` /
    :meth:`rp_load_state` carry it for ``rp.method_state``. Also the holder of state for a
    method's functional form (``AOPMemory``, ``CRSState``)."""

    rp_buffers: ClassVar[tuple[str, ...]] = ()
    rp_counters: ClassVar[tuple[str, ...]] = ()

    def reset_memory(self) -> None:
        """Forget the state (the buffers are deleted and created afresh on the next forward)."""
        for name in self.rp_buffers:
            self._buffers.pop(name, None)
        for name in self.rp_counters:
            self.__dict__.pop(name, None)

    def rp_release(self) -> None:
        """Called by rp.restore: a plain layer has no estimator state."""
        self.reset_memory()

    def rp_state(self) -> dict[str, torch.Tensor]:
        """Copies of the state buffers that exist."""
        return {n: self._buffers[n].detach().clone() for n in self.rp_buffers if n in self._buffers}

    def rp_load_state(self, state: dict[str, torch.Tensor]) -> None:
        """Replace the state by ``state`` (from :meth:`rp_state`), on the weight's device."""
        self.reset_memory()
        weight = getattr(self, "weight", None)
        for name in self.rp_buffers:
            if name in state:
                value = state[name].detach().clone()
                value = value if weight is None else value.to(weight.device)
                self.register_buffer(name, value, persistent=False)

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errors
    ) -> None:
        keys = {prefix + name: name for name in self.rp_buffers}
        self.rp_load_state({keys[k]: v for k, v in state_dict.items() if k in keys})
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errors
        )
        unexpected_keys[:] = [k for k in unexpected_keys if k not in keys]


def reset_memory(model: nn.Module) -> list[str]:
    """Forget the estimator state (AOP memory, CRS gradient-norm estimates) of every layer of
    ``model``; returns the names of the layers reset."""
    names = []
    for name, module in model.named_modules():
        if isinstance(module, LayerState):
            module.reset_memory()
            names.append(name)
    return names


class Handoff:
    """dL/dY of one call, passed by the layer's main backward node to its :class:`WeightNode`."""

    __slots__ = ("grad_out",)

    def __init__(self) -> None:
        self.grad_out: torch.Tensor | None = None


class WeightNode(torch.autograd.Function):
    """The weight-gradient half of a layer's backward, where the layer state is updated.

    ``WeightNode.apply(weight, handoff, grad_fn, *saved)`` returns a 0-dim token that the main
    Function takes as an input. Autograd runs this node after the main one (which stores dL/dY
    in ``handoff`` and sends the token a zero) and only when the weight's gradient is needed in
    that backward pass: ``grad_fn(grad_out, *saved)`` then gives the weight gradient and commits
    the state. ``torch.autograd.grad(loss, x)`` never runs it: no state changes.
    """

    @staticmethod
    def forward(ctx, weight, handoff: Handoff, grad_fn, *saved):
        ctx.save_for_backward(*saved)
        ctx.handoff, ctx.grad_fn = handoff, grad_fn
        return weight.new_zeros(())

    @staticmethod
    def backward(ctx, _):
        grad_out, ctx.handoff.grad_out = ctx.handoff.grad_out, None
        saved = ctx.saved_tensors  # unpacked once (a checkpoint recompute allows no second)
        return ctx.grad_fn(grad_out, *saved), None, None, *(None for _ in saved)


def weight_node(
    weight: torch.Tensor, grad_fn: Callable[..., torch.Tensor], *saved: torch.Tensor
) -> tuple[torch.Tensor, Handoff]:
    """A layer call's :class:`WeightNode`, computing ``grad_fn(dL/dY, *saved)`` as the weight
    gradient: (its token, the :class:`Handoff` for dL/dY), both for the call's main Function."""
    handoff = Handoff()
    return WeightNode.apply(weight, handoff, grad_fn, *saved), handoff
