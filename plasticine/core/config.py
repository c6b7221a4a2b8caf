r"""Configuration declared where each class is defined: constructor arguments captured once, as JSON.

A component class inherits :class:`Configurable`. Its constructor arguments are then captured once,
when an instance is built (bound to the signature of ``__init__``, defaults filled in), and kept as
``obj.config``, a read-only :class:`Config` mapping; ``Class.from_config(obj.config)`` builds an
equal component (fresh weights for a network: weights travel in the checkpoint's tensors, see
:mod:`plasticine.checkpoint`). The class is registered under its name when it is defined, so that a
file can name it; nothing else has to list it.

**One meaning of config.** On every plasticine component, ``obj.config`` is this mapping of the
constructor arguments (not a method, not a dataclass). A group of settings passed as one frozen
dataclass (``UNetConfig``, ``RegistrationNetConfig``, ...) is one of those arguments, ``config``,
and the object keeps the settings it uses as ``obj.settings``. Such dataclasses are registered with
:func:`register_settings`.

**Read-only arguments.** Once built, an attribute named after a captured argument cannot be
assigned (``translator.sampler = ...`` raises :class:`AttributeError`), so the config never goes
stale: build a new object instead (``TraceableTranslator.replace``, or
``Class.from_config({**obj.config, "steps": 20})``).

**JSON.** :func:`to_json` writes a component as ``{"class": <registered name>, "config": {...}}``
and :func:`from_json` rebuilds it, recursively. Values are written as

=====================================  ==========================================================
argument value                         JSON
=====================================  ==========================================================
None, bool, int, str, finite float     itself
list                                   a list of the written items
tuple                                  ``{"tuple": [...]}``
dict (string keys)                     ``{"dict": {...}}``
NaN or infinite float                  ``{"float": "nan" | "inf" | "-inf"}``
:class:`torch.dtype`                   ``{"dtype": "float32"}``
:class:`torch.Tensor` (small, values)  ``{"tensor": {"dtype": ..., "shape": [...], "values": [...]}}``
a component or a registered dataclass  ``{"class": <name>, "config": {...}}``
=====================================  ==========================================================

so tuples come back as tuples and nested components (a registration backend's network and
integrator, a U-Net's condition encoder) come back as components. :func:`from_json` only calls the
constructors of registered classes with these plain values: reading a config never runs code from
the file.

Example:
    >>> class Threshold(Configurable):
    ...     def __init__(self, level: float = 0.5, classes: tuple[int, ...] = (0, 1)):
    ...         self.level, self.classes = level, classes
    >>> t = Threshold(0.25)
    >>> t.config
    Config(level=0.25, classes=(0, 1))
    >>> to_json(t)
    {'class': 'Threshold', 'config': {'level': 0.25, 'classes': {'tuple': [0, 1]}}}
    >>> from_json(to_json(t)).config == t.config
    True
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import math
import numbers
from collections.abc import Iterator, Mapping
from typing import Any, TypeVar

import torch

__all__ = ["Config", "ConfigError", "Configurable", "register_settings", "registered_classes", "to_json", "from_json"]

T = TypeVar("T")

_CLASSES: dict[str, type] = {}  # registered name -> class
_NAMES: dict[type, str] = {}  # class -> registered name


class ConfigError(ValueError):
    """A configuration could not be captured, written or rebuilt (names the place and the value).

    Shape:
        Not applicable.
    """


class Config(Mapping):
    """The constructor arguments of a component: a read-only mapping, in signature order.

    Compares equal to any mapping with the same items; nested components are the objects
    themselves (``config["network"] is obj.network`` when the class stores its argument).

    Shape:
        Not applicable.
    """

    __slots__ = ("_items",)

    def __init__(self, items: Mapping[str, Any] = ()) -> None:
        object.__setattr__(self, "_items", dict(items))

    def __getitem__(self, key: str) -> Any:
        return self._items[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("Config is read-only; build a new object with Class.from_config({**obj.config, name: value})")

    def __reduce__(self) -> tuple[Any, ...]:
        return (Config, (self._items,))

    def __repr__(self) -> str:
        return "Config(" + ", ".join(f"{k}={v!r}" for k, v in self._items.items()) + ")"


def _register(cls: type, name: str) -> None:
    old = _CLASSES.get(name)
    if old is not None and old is not cls and (old.__module__, old.__qualname__) != (cls.__module__, cls.__qualname__):
        raise ConfigError(
            f"{cls.__module__}.{cls.__qualname__}: the config name {name!r} is already registered for "
            f"{old.__module__}.{old.__qualname__}; give the class another one (class {cls.__name__}(..., config_name='...'))"
        )
    if old is not None:  # the same class defined again (a module reloaded): the new definition wins
        _NAMES.pop(old, None)
    _CLASSES[name] = cls
    _NAMES[cls] = name


def register_settings(cls: type[T] | None = None, *, name: str | None = None) -> Any:
    """Register a frozen dataclass of settings, so that a config holding one can be written and read.

    Its JSON form is ``{"class": name, "config": {field: value}}`` (the fields given to
    ``__init__``), rebuilt as ``cls(**fields)``. Usable as ``@register_settings`` or
    ``@register_settings(name="...")``.

    Args:
        cls: a dataclass.
        name: the registered name (default: the class's qualified name); unique.

    Returns:
        ``cls`` (or a decorator, when called without it).

    Raises:
        ConfigError: for a class that is not a dataclass, or a name taken by another class.

    Shape:
        Not applicable.
    """

    def apply(c: type[T]) -> type[T]:
        if not (isinstance(c, type) and dataclasses.is_dataclass(c)):
            raise ConfigError(f"register_settings: expected a dataclass, got {c!r}")
        _register(c, name if name is not None else c.__qualname__)
        return c

    return apply if cls is None else apply(cls)


def registered_classes() -> dict[str, type]:
    """Every registered class by name: the :class:`Configurable` components and the settings dataclasses.

    A class is registered when its module is imported.

    Returns:
        ``{name: class}``.

    Shape:
        Not applicable.
    """
    return dict(_CLASSES)


def _signature_of(init: Any, owner: type) -> inspect.Signature:
    sig = inspect.signature(init)
    for p in list(sig.parameters.values())[1:]:
        if p.kind is p.POSITIONAL_ONLY:
            raise ConfigError(f"{owner.__qualname__}.__init__: the positional-only argument {p.name!r} cannot be rebuilt by keyword; make it a normal argument")
    return sig


def _capture(cls: type, sig: inspect.Signature, self: Any, args: tuple, kwargs: dict) -> Config:
    bound = sig.bind(self, *args, **kwargs)
    bound.apply_defaults()
    ignore = cls._config_ignore  # type: ignore[attr-defined]
    items: dict[str, Any] = {}
    for p in list(sig.parameters.values())[1:]:
        value = bound.arguments.get(p.name)
        if p.kind is p.VAR_POSITIONAL:
            if value:
                raise ConfigError(f"{cls.__qualname__}: {len(value)} extra positional argument(s) cannot be recorded in a config; pass them by name")
        elif p.kind is p.VAR_KEYWORD:
            items.update({k: v for k, v in (value or {}).items() if k not in ignore})
        elif p.name not in ignore:
            items[p.name] = value
    return Config({k: v.detach().clone() if isinstance(v, torch.Tensor) else v for k, v in items.items()})


def _capturing(init: Any, sig: inspect.Signature, names: frozenset[str]) -> Any:
    """``init`` wrapped so that the outermost call records its arguments first and seals them after."""

    @functools.wraps(init)
    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        outer = "_config" not in self.__dict__
        if outer:
            object.__setattr__(self, "_config", _capture(type(self), sig, self, args, kwargs))
        init(self, *args, **kwargs)
        if outer:
            object.__setattr__(self, "_config_sealed", True)

    __init__._captures_config = True  # type: ignore[attr-defined]
    __init__._config_arguments = names  # type: ignore[attr-defined]
    return __init__


class Configurable:
    r"""Mixin that captures a component's constructor arguments: ``obj.config``, ``Class.from_config``.

    Subclass it (first, before ``nn.Module``): ``class MySampler(Configurable): ...`` or
    ``class MyLoss(Configurable, nn.Module): ...``. The class statement takes three options:

    * ``config_name="..."``: the name written into files (default: the class's qualified name);
    * ``config_ignore=("generator",)``: arguments that are not recorded (they take their default
      when the object is rebuilt), for what only matters once, such as the generator of the
      initial weights;
    * ``config_abstract=True``: a base class that is not registered (its subclasses are).

    The arguments of the outermost ``__init__`` are captured (a subclass's, not those it passes to
    ``super().__init__``), before it runs; ``**kwargs`` are recorded as their items. An argument
    that is not JSON data, a tuple, a dtype, a tensor or another component fails when the config is
    written (:func:`to_json`), not when the object is built.

    Shape:
        Not applicable.
    """

    _config_ignore: frozenset[str] = frozenset()
    _config_arguments: frozenset[str] = frozenset()

    def __init_subclass__(cls, *, config_name: str | None = None, config_ignore: tuple[str, ...] = (), config_abstract: bool = False, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls._config_ignore = frozenset(getattr(cls, "_config_ignore", frozenset())) | frozenset(config_ignore)
        init = cls.__init__
        if not getattr(init, "_captures_config", False):
            sig = _signature_of(init, cls)
            names = [p.name for p in list(sig.parameters.values())[1:] if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
            for n in cls._config_ignore & set(names):
                if sig.parameters[n].default is inspect.Parameter.empty:
                    raise ConfigError(f"{cls.__qualname__}: config_ignore names {n!r}, which has no default to rebuild with")

            cls.__init__ = _capturing(init, sig, frozenset(names))  # type: ignore[method-assign]
        cls._config_arguments = cls.__init__._config_arguments - cls._config_ignore  # type: ignore[attr-defined]
        if not config_abstract:
            _register(cls, config_name if config_name is not None else cls.__qualname__)

    def __setattr__(self, name: str, value: Any) -> None:
        if name in type(self)._config_arguments and self.__dict__.get("_config_sealed", False):
            cls = type(self).__name__
            raise AttributeError(
                f"{cls}.{name}: a constructor argument, read-only once built (obj.config records it); "
                f"build a new object: {cls}.from_config({{**obj.config, {name!r}: ...}})"
            )
        super().__setattr__(name, value)

    @property
    def config(self) -> Config:
        """The constructor arguments this object was built with (read-only, signature order).

        Shape:
            Not applicable.
        """
        return self.__dict__.get("_config", Config())

    @classmethod
    def from_config(cls: type[T], config: Mapping[str, Any]) -> T:
        """Build an object of this class from constructor arguments (``obj.config`` or any mapping).

        Args:
            config: argument name -> value (objects, not their JSON; see :func:`from_json`).

        Returns:
            ``cls(**config)``.

        Raises:
            ConfigError: for a non-mapping or a name the constructor does not take.
            ValueError: what the constructor raises for a bad value.

        Shape:
            Not applicable.
        """
        if not isinstance(config, Mapping):
            raise ConfigError(f"{cls.__qualname__}.from_config: expected a mapping of constructor arguments, got {type(config).__name__}")
        sig = inspect.signature(cls.__init__)
        if not any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values()):
            unknown = sorted(set(config) - set(list(sig.parameters)[1:]))
            if unknown:
                raise ConfigError(f"{cls.__qualname__}.from_config: unknown argument(s) {unknown}; the constructor takes {list(sig.parameters)[1:]}")
        return cls(**config)


# -- JSON ---------------------------------------------------------------------------------------------

_TAGS = ("tuple", "dict", "float", "dtype", "tensor")


def _name_of(obj: Any, where: str) -> str:
    cls = type(obj)
    name = _NAMES.get(cls)
    if name is None and cls.__qualname__ in _CLASSES and _CLASSES[cls.__qualname__].__module__ == cls.__module__:
        raise ConfigError(f"{where}: {cls.__module__}.{cls.__qualname__} was defined again since this object was built; build it from the new class")
    if name is None or _CLASSES.get(name) is not cls:
        raise ConfigError(
            f"{where}: cannot write a {cls.__module__}.{cls.__qualname__} into a config: a component must inherit "
            "plasticine.core.config.Configurable (class MyPart(Configurable, ...)) and a settings dataclass must be "
            "registered with @register_settings; other values must be JSON data, tuples, dtypes or tensors"
        )
    return name


def _encode_float(x: float) -> Any:
    return x if math.isfinite(x) else {"float": "nan" if math.isnan(x) else ("inf" if x > 0 else "-inf")}


def _encode(value: Any, where: str) -> Any:
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return _encode_float(float(value))
    if isinstance(value, list):
        return [_encode(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, tuple):
        return {"tuple": [_encode(v, f"{where}[{i}]") for i, v in enumerate(value)]}
    if isinstance(value, torch.dtype):
        return {"dtype": str(value).removeprefix("torch.")}
    if isinstance(value, torch.Tensor):
        t = value.detach().cpu()
        flat = [_encode_float(v) if isinstance(v, float) else v for v in t.reshape(-1).tolist()]
        return {"tensor": {"dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape), "values": flat}}
    if isinstance(value, Configurable):
        name = _name_of(value, where)
        return {"class": name, "config": {k: _encode(v, f"{where}.{k}") for k, v in value.config.items()}}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        name = _name_of(value, where)
        fields = {f.name: getattr(value, f.name) for f in dataclasses.fields(value) if f.init}
        return {"class": name, "config": {k: _encode(v, f"{where}.{k}") for k, v in fields.items()}}
    if isinstance(value, Mapping) and not isinstance(value, Config):
        bad = next((k for k in value if not isinstance(k, str)), None)
        if bad is not None:
            raise ConfigError(f"{where}: dict keys in a config must be strings, got {bad!r}")
        return {"dict": {k: _encode(v, f"{where}.{k}") for k, v in value.items()}}
    _name_of(value, where)  # an object of an unregistered class: raises, naming it
    raise AssertionError("unreachable")  # pragma: no cover


def to_json(obj: Any) -> dict[str, Any]:
    """Write a component (or a registered settings dataclass) as JSON data: ``{"class", "config"}``.

    Args:
        obj: a :class:`Configurable` object or a registered dataclass.

    Returns:
        JSON data (dicts, lists, strings, numbers, booleans, None); see the module docstring.

    Raises:
        ConfigError: naming the argument, for a value that cannot be written (an object that is
            not a component, a dict with non-string keys, a class that is not registered).

    Shape:
        Not applicable.
    """
    name = type(obj).__name__
    if not (isinstance(obj, Configurable) or (dataclasses.is_dataclass(obj) and not isinstance(obj, type))):
        raise ConfigError(f"to_json: expected a Configurable component or a registered settings dataclass, got {type(obj).__module__}.{type(obj).__qualname__}")
    return _encode(obj, name)


def _decode_float(x: Any, where: str) -> float:
    if isinstance(x, dict) and set(x) == {"float"} and x["float"] in ("nan", "inf", "-inf"):
        return float(x["float"])
    if isinstance(x, (int, float)) and not isinstance(x, bool):
        return x
    raise ConfigError(f"{where}: expected a number or {{'float': 'nan' | 'inf' | '-inf'}}, got {x!r}")


def _decode_dtype(name: Any, where: str) -> torch.dtype:
    dtype = getattr(torch, name, None) if isinstance(name, str) else None
    if not isinstance(dtype, torch.dtype):
        raise ConfigError(f"{where}: expected the name of a torch dtype (e.g. 'float32'), got {name!r}")
    return dtype


def _decode(data: Any, where: str) -> Any:
    if data is None or isinstance(data, (bool, int, float, str)):
        return data
    if isinstance(data, list):
        return [_decode(v, f"{where}[{i}]") for i, v in enumerate(data)]
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected JSON data, got {type(data).__name__}")
    if set(data) == {"class", "config"}:
        return _build(data, where)
    if len(data) != 1 or next(iter(data)) not in _TAGS:
        raise ConfigError(f"{where}: expected {{'class': name, 'config': {{...}}}} or one of the tags {_TAGS} as the only key, got keys {sorted(data)}")
    tag, body = next(iter(data.items()))
    if tag == "tuple":
        if not isinstance(body, list):
            raise ConfigError(f"{where}: expected a list under 'tuple', got {type(body).__name__}")
        return tuple(_decode(v, f"{where}[{i}]") for i, v in enumerate(body))
    if tag == "dict":
        if not isinstance(body, dict):
            raise ConfigError(f"{where}: expected a dict under 'dict', got {type(body).__name__}")
        return {k: _decode(v, f"{where}.{k}") for k, v in body.items()}
    if tag == "float":
        return _decode_float(data, where)
    if tag == "dtype":
        return _decode_dtype(body, where)
    if not isinstance(body, dict) or set(body) != {"dtype", "shape", "values"} or not isinstance(body["shape"], list) or not isinstance(body["values"], list):
        raise ConfigError(f"{where}: expected {{'dtype', 'shape', 'values'}} under 'tensor', got {body!r:.80}")
    dtype = _decode_dtype(body["dtype"], f"{where}.dtype")
    values = [_decode_float(v, f"{where}.values[{i}]") for i, v in enumerate(body["values"])]
    try:
        return torch.tensor(values, dtype=dtype).reshape(body["shape"])
    except (RuntimeError, TypeError, ValueError) as err:
        raise ConfigError(f"{where}: {len(values)} values do not make a {body['dtype']} tensor of shape {body['shape']}: {err}") from err


def _build(spec: dict[str, Any], where: str) -> Any:
    name, config = spec["class"], spec["config"]
    cls = _CLASSES.get(name) if isinstance(name, str) else None
    if cls is None:
        raise ConfigError(f"{where}: the class {name!r} is not registered; import the module that defines it before reading this config")
    if not isinstance(config, dict):
        raise ConfigError(f"{where}: expected a dict of arguments under 'config' of {name}, got {type(config).__name__}")
    args = {k: _decode(v, f"{where}.{k}") for k, v in config.items()}
    try:
        return cls.from_config(args) if issubclass(cls, Configurable) else cls(**args)
    except ConfigError:
        raise
    except Exception as err:  # whatever the constructor raises on arguments read from a file
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ConfigError(f"{where}: cannot rebuild {name} from its config: {first}") from err


def from_json(data: Mapping[str, Any]) -> Any:
    """Rebuild what :func:`to_json` wrote (a new object; a network gets fresh weights).

    Args:
        data: ``{"class": name, "config": {...}}``, JSON data.

    Returns:
        The object.

    Raises:
        ConfigError: naming the place, for malformed data, a class that is not registered (its
            module not imported) or arguments its constructor refuses.

    Shape:
        Not applicable.
    """
    if not isinstance(data, Mapping) or set(data) != {"class", "config"}:
        shown = sorted(data) if isinstance(data, Mapping) else type(data).__name__
        raise ConfigError(f"from_json: expected {{'class': name, 'config': {{...}}}}, got {shown}")
    name = data["class"] if isinstance(data["class"], str) else "config"
    return _build(dict(data), name)
