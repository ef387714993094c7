"""Method configs: frozen dataclasses with a string form that round-trips.

``str(RAD(keep=0.1, mode="project"))`` is ``"rad:keep=0.1,mode=project,same_sample=False"`` and
``parse_method`` of that string gives an equal config back. Each method module registers its
config class with :func:`register` and, where its layer classes are defined, which torch layer
type each replaces with :func:`register_layers`.
"""

from __future__ import annotations

import dataclasses
import operator
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from typing import Any, ClassVar, overload

METHODS: dict[str, type[MethodConfig]] = {}

#: key of :func:`register_layers` for transformers' ``Conv1D`` (GPT-2's projections, y = x W + b
#: with W of shape (in, out)), recognised by duck typing so that randprop never imports
#: transformers (see randprop.methods.projections.is_conv1d); its layer class is a mixin that
#: convert combines with the model's own Conv1D class
CONV1D = "Conv1D"


@dataclasses.dataclass(frozen=True)
class MethodConfig:
    """Base of every method config. Subclasses set ``name`` and validate in ``__post_init__``."""

    name: ClassVar[str] = ""
    #: whether the method exists to save activation memory (then 1-bit ReLU masks are swapped in)
    saves_memory: ClassVar[bool] = True
    #: torch layer type -> the randprop class replacing it (filled by :func:`register_layers`;
    #: each config class has its own)
    layer_types: ClassVar[dict[type | str, type]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.layer_types = {}

    def __str__(self) -> str:
        parts = [
            f"{f.name}={_format(getattr(self, f.name))}"
            for f in dataclasses.fields(self)
            if not (f.metadata.get(QUIET) and getattr(self, f.name) == f.default)
        ]
        return self.name + (":" + ",".join(parts) if parts else "")

    def layer_class(self, module_type: type) -> type | None:
        """The randprop class replacing ``module_type``, or None if this method leaves it alone
        (default: the classes registered with :func:`register_layers`)."""
        return self.layer_types.get(module_type)


ConfigT = type[MethodConfig]


@overload
def register(cls: ConfigT, *, aliases: Iterable[str] = ()) -> ConfigT: ...
@overload
def register(cls: None = None, *, aliases: Iterable[str] = ()) -> Callable[[ConfigT], ConfigT]: ...
def register(cls=None, *, aliases=()):
    """Class decorator: make a config available to :func:`parse_method` under ``cls.name`` and
    each of ``aliases`` (``@register`` or ``@register(aliases=("sparsevjp",))``)."""
    aliases = (aliases,) if isinstance(aliases, str) else tuple(aliases)

    def add(cls: ConfigT) -> ConfigT:
        for name in (cls.name, *aliases):
            if not isinstance(name, str) or not name or name != name.strip().lower():
                raise ValueError(f"register: method names must be lower-case words; got {name!r}")
            if METHODS.get(name, cls) is not cls:
                raise ValueError(f"register: {name!r} is already {METHODS[name].__name__}")
            METHODS[name] = cls
        return cls

    return add if cls is None else add(cls)


def register_layers(config_cls: ConfigT, layers: Mapping[type | str, type]) -> None:
    """Make ``config_cls`` convert each torch layer type in ``layers`` to its randprop class
    (a subclass of that type keeping the layer protocol of randprop.methods.base); called once
    per method, where its layer classes are defined. The key :data:`CONV1D` stands for
    transformers' Conv1D, its value a mixin class (not a subclass of Conv1D)."""
    for module_type, layer_cls in layers.items():
        if module_type == CONV1D:
            if not isinstance(layer_cls, type):
                raise TypeError(f"register_layers: {layer_cls!r} for {CONV1D} must be a class")
        elif isinstance(module_type, str):
            raise TypeError(
                f"register_layers: keys must be layer types or {CONV1D!r}; got {module_type!r}"
            )
        elif not (isinstance(layer_cls, type) and issubclass(layer_cls, module_type)):
            raise TypeError(
                f"register_layers: {getattr(layer_cls, '__name__', layer_cls)!r} must be a "
                f"subclass of the layer type it replaces, {module_type.__name__}"
            )
        known = config_cls.layer_types.get(module_type, layer_cls)
        if known is not layer_cls:
            raise ValueError(
                f"register_layers: {config_cls.__name__} already converts "
                f"{getattr(module_type, '__name__', module_type)} to {known.__name__}"
            )
        config_cls.layer_types[module_type] = layer_cls


#: metadata key of the config fields that the string form leaves out at their default
QUIET = "quiet"


def quiet_field(default: Any) -> Any:
    """A config field left out of the string form while it holds ``default`` (for fields added
    after string forms were in use, e.g. ``bits``: the earlier forms stay as they were)."""
    return dataclasses.field(default=default, metadata={QUIET: True})


def _format(value: Any) -> str:
    return "none" if value is None else str(value)


def check_seed(seed: Any, owner: str = "") -> int:
    """``seed`` as an int (any integer type, not bool), or a TypeError naming it."""
    prefix = f"{owner}: " if owner else ""
    if not isinstance(seed, bool):
        try:
            return operator.index(seed)
        except TypeError:
            pass
    raise TypeError(f"{prefix}seed must be an int; got {type(seed).__name__}")


def check_choice(owner: str, field: str, value: Any, allowed: Iterable[Any]) -> None:
    """Raise ValueError naming the field and the allowed values if ``value`` is not one of them."""
    allowed = tuple(allowed)
    if value not in allowed:
        raise ValueError(
            f"{owner}: {field} must be one of {', '.join(map(repr, allowed))}; got {value!r}"
        )


def check_fraction(owner: str, field: str, value: float, allow_one: bool = True) -> None:
    """Raise ValueError unless ``value`` is a number in (0, 1] (or (0, 1) without allow_one)."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    ok = ok and (0 < value <= 1 if allow_one else 0 < value < 1)
    if not ok:
        interval = "(0, 1]" if allow_one else "(0, 1)"
        raise ValueError(f"{owner}: {field} must be a number in {interval}; got {value!r}")


def _parse_value(text: str, annotation: Any, owner: str, field: str) -> Any:
    options = typing.get_args(annotation) if _is_union(annotation) else (annotation,)
    low = text.strip().lower()
    if type(None) in options and low in ("none", "null", ""):
        return None
    for option in options:
        if option is bool:
            if low in ("true", "1", "yes", "on"):
                return True
            if low in ("false", "0", "no", "off"):
                return False
        elif option is int:
            try:
                return int(text)
            except ValueError:
                pass
        elif option is float:
            try:
                return float(text)
            except ValueError:
                pass
        elif option is str:
            return text.strip()
    names = " or ".join(
        "none" if o is type(None) else getattr(o, "__name__", str(o)) for o in options
    )
    raise ValueError(f"{owner}: {field} must be {names}; got {text!r}")


def _is_union(annotation: Any) -> bool:
    return typing.get_origin(annotation) in (typing.Union, types.UnionType)


def parse_method(text: str | MethodConfig) -> MethodConfig:
    """Parse ``"name:field=value,..."`` (or pass a config through) into a method config, among
    the methods registered (all of them once randprop.methods is imported: use
    ``randprop.methods.parse_method`` / ``rp.parse_method``)."""
    if isinstance(text, MethodConfig):
        return text
    if not isinstance(text, str):
        raise TypeError(f"method must be a config object or a string; got {type(text).__name__}")
    name, _, rest = text.strip().partition(":")
    name = name.strip().lower()
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose from {', '.join(sorted(METHODS))}")
    cls = METHODS[name]
    fields = [f.name for f in dataclasses.fields(cls)]
    hints = typing.get_type_hints(cls)  # resolves the modules' postponed (string) annotations
    kwargs: dict[str, Any] = {}
    for item in filter(None, (p.strip() for p in rest.split(","))):
        key, eq, value = item.partition("=")
        key = key.strip()
        if not eq or key not in fields:
            raise ValueError(
                f"{name}: unknown or malformed option {item!r}; options are "
                f"{', '.join(fields) or 'none'}"
            )
        if key in kwargs:
            raise ValueError(f"{name}: option {key!r} given more than once in {text!r}")
        kwargs[key] = _parse_value(value, hints[key], name, key)
    return cls(**kwargs)
