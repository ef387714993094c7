"""convert / restore: swap eligible layers of a model for their randprop versions, in place.

A converted layer is the same object with its class swapped for a subclass (RADLinear is an
nn.Linear), so parameters, hooks, state_dict keys, device and dtype are untouched and an
optimizer built before conversion keeps working. restore() swaps the classes back.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import operator
from collections.abc import Callable, Mapping, Sequence

from torch import nn

from randprop.config import MethodConfig, parse_method
from randprop.methods.base import RandomizedLayer
from randprop.methods.masks import MASKED

MethodSpec = MethodConfig | str | Mapping[str, MethodConfig | str]

_CONVERTED_ATTRS = ("rp_method", "rp_seed", "rp_layer", "rp_step", "rp_original_class")


@dataclasses.dataclass
class ConversionReport:
    """What convert() did: converted layer names (with their method) and skipped ones with why."""

    converted: list[str] = dataclasses.field(default_factory=list)
    skipped: dict[str, str] = dataclasses.field(default_factory=dict)
    methods: dict[str, str] = dataclasses.field(default_factory=dict)
    kinds: dict[str, str] = dataclasses.field(default_factory=dict)

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
        return "\n".join([*lines, summary])


def _method_for(name: str, method: MethodSpec) -> tuple[MethodConfig | None, str]:
    if isinstance(method, Mapping):
        for pattern, spec in method.items():
            if fnmatch.fnmatchcase(name, pattern):
                return parse_method(spec), ""
        return None, "no pattern in the method dict matches"
    return parse_method(method), ""


def _is_candidate(module: nn.Module) -> bool:
    """Modules worth a line in the report: known layer types and leaves holding parameters."""
    if isinstance(module, (*MASKED, nn.Linear, nn.modules.conv._ConvNd)):
        return True
    has_children = next(module.children(), None) is not None
    return not has_children and next(module.parameters(recurse=False), None) is not None


def convert(
    model: nn.Module,
    method: MethodSpec,
    *,
    module_filter_fn: Callable[[nn.Module, str], bool] | None = None,
    target_modules: str | Sequence[str] | None = None,
    seed: int = 0,
    activation_masks: bool = True,
) -> ConversionReport:
    """Convert the eligible layers of ``model`` in place and report what was done.

    method: a config (``rp.RAD(keep=0.1)``), its string form, or a dict mapping fnmatch
        patterns of module names to methods (first match wins).
    module_filter_fn(module, name) -> bool: convert only where it returns True (as in torchao).
    target_modules: fnmatch patterns of module names to convert (as in PEFT); a single string
        is one pattern.
    seed: run seed of every random draw (with layer index, step and rank): an int.
    activation_masks: swap ReLU / LeakyReLU for their exact 1-bit-mask versions under
        memory-saving methods.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module; got {type(model).__name__}")
    if module_filter_fn is not None and not callable(module_filter_fn):
        raise TypeError(
            "module_filter_fn must be a callable (module, name) -> bool or None; "
            f"got {type(module_filter_fn).__name__}"
        )
    target_modules = _patterns(target_modules)
    if isinstance(seed, bool):
        raise TypeError("seed must be an int; got bool")
    try:
        seed = operator.index(seed)
    except TypeError:
        raise TypeError(f"seed must be an int; got {type(seed).__name__}") from None
    if not isinstance(activation_masks, bool):
        raise TypeError(f"activation_masks must be True or False; got {activation_masks!r}")
    if isinstance(method, Mapping):
        for spec in method.values():
            parse_method(spec)  # fail early on a bad entry
    else:
        method = parse_method(method)
    report = ConversionReport()
    layer_index = 0
    for name, module in model.named_modules():
        if not _is_candidate(module):
            continue
        report.kinds[name] = type(module).__name__
        if isinstance(module, RandomizedLayer) or type(module) in MASKED.values():
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
        new_class, reason = _target_class(module, cfg, activation_masks)
        if new_class is None:
            report.skipped[name] = reason
            continue
        original = type(module)
        module.__class__ = new_class
        module.rp_original_class = original
        if isinstance(module, RandomizedLayer):
            module.rp_method, module.rp_seed, module.rp_layer = cfg, seed, layer_index
            module.rp_step = 0
            layer_index += 1
        report.converted.append(name)
        report.methods[name] = (
            str(cfg) if isinstance(module, RandomizedLayer) else getattr(module, "rp_storage", "")
        )
    return report


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


def _target_class(
    module: nn.Module, cfg: MethodConfig, activation_masks: bool
) -> tuple[type | None, str]:
    kind = type(module)
    if kind in MASKED:
        if not cfg.saves_memory:
            return None, f"{cfg.name} keeps activations exact as stored by PyTorch"
        if not activation_masks:
            return None, "activation_masks=False"
        return MASKED[kind], ""
    new_class = cfg.layer_class(kind)
    if new_class is not None:
        # a layer class may refuse some settings of the module: rp_unsupported(module) -> reason
        unsupported = getattr(new_class, "rp_unsupported", None)
        reason = unsupported(module) if unsupported is not None else None
        return (None, reason) if reason else (new_class, "")
    base = next((b for b in kind.__mro__[1:] if cfg.layer_class(b) is not None), None)
    if base is not None:
        return None, f"subclass of {base.__name__} with its own forward; kept exact"
    return None, f"{cfg.name} does not support {kind.__name__}; kept exact"


def restore(model: nn.Module) -> list[str]:
    """Give every converted layer of ``model`` its original class back; returns their names."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module; got {type(model).__name__}")
    restored = []
    for name, module in model.named_modules():
        original = getattr(module, "rp_original_class", None)
        if original is None:
            continue
        release = getattr(module, "rp_release", None)
        if release is not None:  # drop estimator state (buffers) a plain layer does not have
            release()
        module.__class__ = original
        for attr in _CONVERTED_ATTRS:
            module.__dict__.pop(attr, None)
        restored.append(name)
    return restored


def method_state(model: nn.Module) -> dict[str, int]:
    """The step counters of the converted layers (the part of the seed stream to checkpoint)."""
    return {n: m.rp_step for n, m in model.named_modules() if isinstance(m, RandomizedLayer)}


def load_method_state(model: nn.Module, state: Mapping[str, int]) -> None:
    """Restore the step counters saved by :func:`method_state`."""
    for name, module in model.named_modules():
        if isinstance(module, RandomizedLayer) and name in state:
            module.rp_step = int(state[name])
