"""convert / restore: swap eligible layers of a model for their randprop versions, in place.

A converted layer is the same object with its class swapped for a subclass (RADLinear is an
nn.Linear), so parameters, hooks, state_dict keys, device and dtype are untouched and an
optimizer built before conversion keeps working. restore() swaps the classes back. The classes
swapped in keep the layer protocol :class:`randprop.methods.base.ConvertedLayer`, whose hooks
(rp_unsupported, rp_storage, rp_release, rp_buffers, rp_state, rp_load_state) are all that
convert, restore and method_state use of them.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import weakref
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import nn

from randprop.config import CONV1D, METHODS, MethodConfig, check_seed, parse_method
from randprop.methods import activations, functional_ops, norms
from randprop.methods.activations import activation_class, is_activation
from randprop.methods.base import ConvertedLayer, RandomizedLayer
from randprop.methods.exact import Exact
from randprop.methods.masks import MASKED
from randprop.methods.norms import norm_class
from randprop.methods.projections import is_conv1d
from randprop.quantize import BITS
from randprop.random import name_id

MethodSpec = MethodConfig | str | Mapping[str, MethodConfig | str]

_CONVERTED_ATTRS = ("rp_method", "rp_seed", "rp_layer", "rp_step_count", "rp_original_class")


@dataclasses.dataclass
class ConversionReport:
    """What convert() did: converted layer names (with their method) and skipped ones with why."""

    converted: list[str] = dataclasses.field(default_factory=list)
    skipped: dict[str, str] = dataclasses.field(default_factory=dict)
    methods: dict[str, str] = dataclasses.field(default_factory=dict)
    kinds: dict[str, str] = dataclasses.field(default_factory=dict)
    #: with ``functional_ops``: the functional calls redirected and what is not covered
    functional: str = ""

    def __str__(self) -> str:
        rows = [("layer", "type", "action")]
        for name in self.converted:
            rows.append((name or "<root>", self.kinds[name], f"converted: {self.methods[name]}"))
        for name, reason in self.skipped.items():
            rows.append((name or "<root>", self.kinds[name], f"skipped: {reason}"))
        widths = [max(len(r[i]) for r in rows) for i in range(2)]
        lines = [f"{r[0]:<{widths[0]}}  {r[1]:<{widths[1]}}  {r[2]}" for r in rows]
        lines.insert(1, "-" * max(len(line) for line in lines))
        summary = f"{len(self.converted)} converted, {len(self.skipped)} skipped"
        return "\n".join([*lines, summary, *filter(None, [self.functional])])


def _method_for(name: str, method: MethodSpec) -> tuple[MethodConfig | None, str]:
    if isinstance(method, Mapping):
        for pattern, spec in method.items():
            if fnmatch.fnmatchcase(name, pattern):
                return parse_method(spec), ""
        return None, "no pattern in the method dict matches"
    return parse_method(method), ""


def _is_candidate(module: nn.Module) -> bool:
    """Modules worth a line in the report: known layer types and leaves holding parameters."""
    if isinstance(module, (*MASKED, nn.Linear, nn.modules.conv._ConvNd, nn.MultiheadAttention)):
        return True
    if is_conv1d(module) or is_activation(module):
        return True
    has_children = next(module.children(), None) is not None
    if norm_class(module) is not None:  # norms without parameters too
        return True
    return not has_children and next(module.parameters(recurse=False), None) is not None


def convert(
    model: nn.Module,
    method: MethodSpec,
    *,
    module_filter_fn: Callable[[nn.Module, str], bool] | None = None,
    target_modules: str | Sequence[str] | None = None,
    seed: int = 0,
    activation_masks: bool = True,
    functional_ops: bool = False,
    prefix: str = "",
) -> ConversionReport:
    """Convert the eligible layers of ``model`` in place and report what was done.

    method: a config (``rp.RAD(keep=0.1)``), its string form, or a dict mapping fnmatch
        patterns of module names to methods (first match wins).
    module_filter_fn(module, name) -> bool: convert only where it returns True (as in torchao).
    target_modules: fnmatch patterns of module names to convert (as in PEFT); a single string
        is one pattern.
    seed: run seed of every random draw (with layer id, step and rank): an int.
    activation_masks: under memory-saving methods, also swap the activation-like modules for
        compact forms: ReLU / LeakyReLU for exact 1-bit masks, max / average pooling for
        offsets / shapes, dropout for a seeded mask that stores nothing, smooth activations
        (GELU, SiLU, tanh, sigmoid; transformers' by class name) and gated MLPs for k-bit
        derivatives, LayerNorm / RMSNorm / BatchNorm / GroupNorm for a k-bit normalised input
        (unbiased weight gradients; see methods.activations and methods.norms).
    functional_ops: under memory-saving methods, also redirect the functional calls written in
        the model's forwards (F.relu, F.gelu, F.silu, torch.tanh, F.layer_norm, F.dropout, ...)
        to the same compact forms, through a TorchFunctionMode the model enters around its
        forward (methods.functional_ops; the report lists what is and is not covered).
        rp.restore removes it. Off by default: the mode runs Python code at every torch call
        of the forward, and its hooks are pickled with the model.
    prefix: the qualified name of ``model`` inside a larger model, when converting a part of it.

    Layer ids: a layer's draws depend on (seed, id, step, rank), with id the stable 63-bit hash
    :func:`randprop.random.name_id` of the layer's qualified name ``prefix + "." + name``. So
    the ids do not depend on which layers a call converts, and converting ``model.a`` with
    ``prefix="a"`` and ``model.b`` with ``prefix="b"`` gives every layer the id it gets when the
    whole model is converted at once. Without a prefix, two submodules converted on their own
    whose layers have the same relative names (e.g. two copies of one block) draw the same
    patterns: pass the prefix, or convert the whole model with ``target_modules`` or a dict of
    methods. Names in the report (and ``target_modules`` patterns) are relative to ``model``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module; got {type(model).__name__}")
    if module_filter_fn is not None and not callable(module_filter_fn):
        raise TypeError(
            "module_filter_fn must be a callable (module, name) -> bool or None; "
            f"got {type(module_filter_fn).__name__}"
        )
    target_modules = _patterns(target_modules)
    seed = check_seed(seed)
    if not isinstance(activation_masks, bool):
        raise TypeError(f"activation_masks must be True or False; got {activation_masks!r}")
    if not isinstance(functional_ops, bool):
        raise TypeError(f"functional_ops must be True or False; got {functional_ops!r}")
    if isinstance(method, Mapping):
        for spec in method.values():
            parse_method(spec)  # fail early on a bad entry
    else:
        method = parse_method(method)
    if not isinstance(prefix, str):
        raise TypeError(f"prefix must be a str (a module name); got {type(prefix).__name__}")
    _refuse_rules(model)
    report = ConversionReport()
    for name, module in model.named_modules():
        if not _is_candidate(module):
            continue
        report.kinds[name] = type(module).__name__
        if isinstance(module, ConvertedLayer):
            report.skipped[name] = "already converted"
            continue
        if target_modules is not None and not any(
            fnmatch.fnmatchcase(name, p) for p in target_modules
        ):
            report.skipped[name] = "not matched by target_modules"
            continue
        if module_filter_fn is not None and not module_filter_fn(module, name):
            report.skipped[name] = "module_filter_fn returned False"
            continue
        cfg, reason = _method_for(name, method)
        if cfg is None:
            report.skipped[name] = reason
            continue
        parent = model.get_submodule(name.rpartition(".")[0]) if name else None
        new_class, reason = _target_class(module, cfg, activation_masks, parent)
        if new_class is None:
            report.skipped[name] = reason
            continue
        swap_layer(module, new_class)
        if isinstance(module, RandomizedLayer):
            full = ".".join(filter(None, (prefix, name)))
            module.rp_method, module.rp_seed, module.rp_layer = cfg, seed, name_id(full)
            module.rp_step = 0
        report.converted.append(name)
        report.methods[name] = module.rp_storage
    if functional_ops:
        report.functional = _install_functional(model, method, seed, prefix)
    return report


def _install_functional(model: nn.Module, method: MethodSpec, seed: int, prefix: str) -> str:
    """Install methods.functional_ops on ``model``; the report's line about it."""
    configs = list(method.values()) if isinstance(method, Mapping) else [method]
    configs = [parse_method(c) for c in configs]
    if not any(c.saves_memory for c in configs):
        return "functional ops: not redirected (no method here saves memory)"
    if _FUNCTIONAL_HANDLES.get(model):
        return "functional ops: already redirected by an earlier rp.convert"
    bits = {getattr(c, "bits", None) for c in configs if c.saves_memory}
    width = bits.pop() if len(bits) == 1 and next(iter(bits)) in BITS else None
    handles = functional_ops.install(
        model,
        seed,
        prefix,
        width or activations.DEFAULT_BITS,
        width or norms.DEFAULT_BITS,
        lambda m: _compact_class(m) is not None,
    )
    _FUNCTIONAL_HANDLES[model] = handles
    return (
        f"functional ops redirected inside the forward: {functional_ops.INTERCEPTED_NAMES}. "
        f"Not covered: {functional_ops.NOT_COVERED}."
    )


#: the hook handles of methods.functional_ops per converted model, for rp.restore
_FUNCTIONAL_HANDLES: weakref.WeakKeyDictionary[nn.Module, list] = weakref.WeakKeyDictionary()


def swap_layer(module: nn.Module, layer_class: type[ConvertedLayer]) -> None:
    """Give ``module`` the class ``layer_class`` (a ConvertedLayer subclass of its class, or a
    :func:`combined_class`), remembering the original for :func:`restore_layer`."""
    if not (issubclass(layer_class, ConvertedLayer) and issubclass(layer_class, type(module))):
        raise TypeError(
            f"layer_class must be a ConvertedLayer subclass of {type(module).__name__}; "
            f"got {layer_class.__name__}"
        )
    original = type(module)
    module.__class__ = layer_class
    module.rp_original_class = original


def restore_layer(module: nn.Module) -> bool:
    """Undo :func:`swap_layer` on ``module`` (its ``rp_release`` hook first); False if it was
    not swapped."""
    if not isinstance(module, ConvertedLayer) or "rp_original_class" not in module.__dict__:
        return False
    module.rp_release()  # drop estimator state (buffers) a plain layer does not have
    module.__class__ = module.rp_original_class
    for attr in _CONVERTED_ATTRS:
        module.__dict__.pop(attr, None)
    return True


def _patterns(target_modules: str | Sequence[str] | None) -> tuple[str, ...] | None:
    """target_modules as a tuple of fnmatch patterns (a single string is one pattern)."""
    if target_modules is None:
        return None
    if isinstance(target_modules, str):
        return (target_modules,)
    try:
        patterns = tuple(target_modules)
    except TypeError:
        raise TypeError(
            "target_modules must be a string or a list of strings (fnmatch patterns of module "
            f"names) or None; got {type(target_modules).__name__}"
        ) from None
    for pattern in patterns:
        if not isinstance(pattern, str):
            raise TypeError(
                "target_modules entries must be strings (fnmatch patterns of module names); "
                f"got {pattern!r} ({type(pattern).__name__})"
            )
    return patterns


#: why convert leaves a layer type (and its subclasses) alone whatever the method
_NOTHING_TO_COMPRESS = {
    nn.Embedding: "Embedding: backward keeps only the int indices; nothing to compress",
}


def _compact_class(module: nn.Module) -> tuple[type | None, str] | None:
    """The compact form of an activation-like module (1-bit masks, pooling offsets, seeded
    dropout, k-bit derivatives of smooth activations, k-bit normalised inputs) with the reason
    where it has none; None for other modules."""
    if type(module) in MASKED:
        return MASKED[type(module)], ""
    norm = norm_class(module)
    return (norm, "") if norm is not None else activation_class(module)


def _target_class(
    module: nn.Module, cfg: MethodConfig, activation_masks: bool, parent: nn.Module | None
) -> tuple[type | None, str]:
    """The class to swap in for ``module`` (a child of ``parent``), or None and the reason."""
    kind = type(module)
    compact = _compact_class(module)
    if compact is not None:
        if not cfg.saves_memory:
            return None, f"{cfg.name} keeps activations exact as stored by PyTorch"
        if not activation_masks:
            return None, "activation_masks=False"
        new_class, reason = compact
        if new_class is None or issubclass(new_class, kind):
            return new_class, reason
        return combined_class(new_class, kind), ""  # a mixin for a class known by duck typing
    if isinstance(cfg, Exact):
        return None, "exact: kept as plain PyTorch"
    for layer_type, reason in _NOTHING_TO_COMPRESS.items():
        if isinstance(module, layer_type):
            return None, reason
    if is_conv1d(module):
        mixin = cfg.layer_types.get(CONV1D)
        if mixin is None:
            return None, f"{cfg.name} does not support transformers' Conv1D; kept exact"
        new_class, reason = _target_class_of(module, mixin)
        return (None, reason) if new_class is None else (combined_class(new_class, kind), "")
    if isinstance(parent, nn.MultiheadAttention) and module is parent.out_proj:
        if not isinstance(parent, ConvertedLayer):
            return None, (
                "MultiheadAttention uses this Linear's weight directly unless it is converted "
                f"too ({cfg.name} does not convert it here); kept exact"
            )
    new_class = cfg.layer_class(kind)
    if new_class is not None:
        return _target_class_of(module, new_class)
    base = next((b for b in kind.__mro__[1:] if cfg.layer_class(b) is not None), None)
    if base is None:
        return None, f"{cfg.name} does not support {kind.__name__}; kept exact"
    if kind.forward is not base.forward:
        return None, f"subclass of {base.__name__} with its own forward; kept exact"
    new_class, reason = _target_class_of(module, cfg.layer_class(base))
    return (None, reason) if new_class is None else (combined_class(new_class, kind), "")


def _target_class_of(module: nn.Module, new_class: type) -> tuple[type | None, str]:
    if not issubclass(new_class, ConvertedLayer):
        raise TypeError(
            f"layer class {new_class.__qualname__} for {type(module).__name__} does not derive "
            "from randprop.methods.base.ConvertedLayer (the layer protocol)"
        )
    reason = new_class.rp_unsupported(module)  # a setting of the module it does not handle
    return (None, reason) if reason else (new_class, "")


_COMBINED: dict[tuple[type, type], type] = {}


def combined_class(layer_class: type, subclass: type) -> type:
    """The randprop ``layer_class`` mixed into a user's subclass of the layer it replaces (one
    that does not override forward): the converted layer stays an instance of ``subclass``.
    Created once per pair; its instances pickle as (layer_class, subclass)."""
    key = (layer_class, subclass)
    if key not in _COMBINED:
        attrs = {"__module__": subclass.__module__, "__reduce_ex__": _reduce_combined}
        _COMBINED[key] = type(f"{layer_class.__name__}_{subclass.__name__}", key, attrs)
    return _COMBINED[key]


def new_combined(layer_class: type, subclass: type) -> nn.Module:
    """Unpickling helper: an empty instance of :func:`combined_class` (state set by pickle)."""
    cls = combined_class(layer_class, subclass)
    return cls.__new__(cls)


def _reduce_combined(self: nn.Module, protocol: int):
    layer_class, subclass = type(self).__bases__
    return new_combined, (layer_class, subclass), self.__getstate__()


def _refuse_rules(model: nn.Module) -> None:
    """A learning rule that swapped layer classes (FA: ``rp_rule``) owns their backward pass."""
    ruled = {
        name or "<root>": m.rp_rule
        for name, m in model.named_modules()
        if isinstance(m, ConvertedLayer) and m.rp_rule
    }
    if ruled:
        raise ValueError(
            f"layers {', '.join(ruled)} are under the learning rule "
            f"{', '.join(sorted(set(ruled.values())))}, which replaces their backward pass; "
            "call the rule's .remove() before rp.convert"
        )


def restore(model: nn.Module) -> list[str]:
    """Give every converted layer of ``model`` (by rp.convert, or by a rule such as rp.rules.FA)
    its original class back and remove convert's ``functional_ops`` hooks; returns the names of
    the layers."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module; got {type(model).__name__}")
    for handle in _FUNCTIONAL_HANDLES.pop(model, []):
        handle.remove()
    return [name for name, module in model.named_modules() if restore_layer(module)]


LayerMethodState = int | dict[str, int | torch.Tensor]


def method_state(model: nn.Module) -> dict[str, LayerMethodState]:
    """What the converted layers hold beyond the state_dict, to checkpoint beside it: per layer
    its step counter (the position in its seed stream), or for a layer with estimator state
    (AOP memory, CRS estimate) a dict {"step": counter, buffer name: copy of the buffer}."""
    state: dict[str, LayerMethodState] = {}
    for name, module in model.named_modules():
        if isinstance(module, RandomizedLayer):
            step = module.rp_step
            state[name] = {"step": step, **module.rp_state()} if module.rp_buffers else step
    return state


def load_method_state(model: nn.Module, state: Mapping[str, LayerMethodState]) -> None:
    """Restore what :func:`method_state` saved (call it after ``load_state_dict``, which resets
    the estimator state)."""
    for name, module in model.named_modules():
        if not isinstance(module, RandomizedLayer) or name not in state:
            continue
        entry = state[name]
        if isinstance(entry, Mapping):
            module.rp_step = int(entry["step"])
            module.rp_load_state({k: v for k, v in entry.items() if k != "step"})
        else:
            module.rp_step = int(entry)


def _subclasses(cls: type) -> list[type]:
    return [c for sub in cls.__subclasses__() for c in (sub, *_subclasses(sub))]


def safe_globals() -> list:
    """randprop's classes in a pickled converted model: method configs, layer classes and the
    unpickling helper of combined classes. Registered with torch.serialization.add_safe_globals
    when this module is imported (the first use of rp.convert, rp.restore or rp.method_state, or
    ``import randprop.convert`` in a process that only loads), so ``torch.load(path)`` (weights_only=True) reads a whole converted model
    whenever it would read the plain one (for which PyTorch needs the model's own classes
    allowed, e.g. with ``torch.serialization.safe_globals``); a state_dict needs nothing."""
    layers = [c for c in _subclasses(RandomizedLayer) if c not in _COMBINED.values()]
    return [*METHODS.values(), *layers, *MASKED.values(), new_combined]


torch.serialization.add_safe_globals(safe_globals())
