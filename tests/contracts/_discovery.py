"""What the contract suites share: which exported classes implement a protocol, and their call signatures.

An exported class implements a callable protocol (``__call__``) when the method that runs on a
call (``forward`` for an ``nn.Module``, else ``__call__``) takes the protocol's positional
parameters, by name and in order; it implements a protocol with a named method (``register``)
when it defines that method with the protocol's positional parameters. The suites use this to
fail when a component exported by a package is missing from their implementations list.
"""

from __future__ import annotations

import importlib
import inspect
import typing

import pytest
import torch

from ._signatures import normalised_signature

PACKAGES = ("plasticine.core", "plasticine.diffusion", "plasticine.registration", "plasticine.losses", "plasticine.segmentation")
"""The packages whose ``__all__`` lists the shipped components."""

_POSITIONAL = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)


def exported_classes() -> list[type]:
    """Every class named in the ``__all__`` of :data:`PACKAGES`, protocols excluded."""
    out: list[type] = []
    for name in PACKAGES:
        module = importlib.import_module(name)
        for attr in module.__all__:
            obj = getattr(module, attr)
            if inspect.isclass(obj) and not getattr(obj, "_is_protocol", False) and obj not in out:
                out.append(obj)
    return out


def called_function(cls: type, method: str = "__call__") -> typing.Callable | None:
    """The function that runs when ``method`` is called on an instance (``forward`` of an ``nn.Module``)."""
    fn = cls.forward if method == "__call__" and issubclass(cls, torch.nn.Module) else getattr(cls, method, None)
    return fn if inspect.isfunction(fn) else None


def _parameters(fn: typing.Callable) -> list[inspect.Parameter]:
    return list(inspect.signature(fn).parameters.values())[1:]  # without self


def positional_names(fn: typing.Callable) -> tuple[str, ...]:
    """Names of the positional parameters of a method, ``self`` left out."""
    return tuple(p.name for p in _parameters(fn) if p.kind in _POSITIONAL)


def implementations(protocol: type, method: str = "__call__") -> set[type]:
    """Exported classes whose ``method`` takes the protocol's positional parameters."""
    want = positional_names(getattr(protocol, method))
    found = set()
    for cls in exported_classes():
        fn = called_function(cls, method)
        if fn is not None and positional_names(fn) == want:
            found.add(cls)
    return found


def factories(params: list) -> list[typing.Callable]:
    """The factories of an implementations list of ``pytest.param`` entries."""
    return [p.values[0] for p in params]


def check_listed(instances: list, protocol: type, method: str = "__call__") -> None:
    """Fail when a shipped implementation of ``protocol`` is not the class of one of ``instances``.

    ``instances``: one object built by each factory of the implementations list.
    """
    listed = {type(obj) for obj in instances}
    missing = sorted(c.__qualname__ for c in implementations(protocol, method) - listed)
    assert not missing, f"exported {protocol.__name__} implementations missing from IMPLEMENTATIONS: {missing}"


def check_uniform(instances: list, protocol: type, method: str = "__call__") -> None:
    """One call signature for the classes of ``instances``, and it accepts the protocol's call.

    Extra parameters beyond the protocol's are allowed only as keyword-only ones with a default.
    """
    classes = sorted({type(obj) for obj in instances}, key=lambda c: c.__qualname__)
    sigs = {c.__qualname__: normalised_signature(called_function(c, method)) for c in classes}
    first = classes[0].__qualname__
    differ = [name for name, sig in sigs.items() if sig != sigs[first]]
    assert not differ, f"{protocol.__name__}.{method}: {differ} differ from {first}: {sigs}"
    params_ = _parameters(called_function(classes[0], method))
    want = positional_names(getattr(protocol, method))
    assert tuple(p.name for p in params_[: len(want)]) == want, (want, params_)
    extra = params_[len(want) :]
    bad = [p.name for p in extra if p.kind != inspect.Parameter.KEYWORD_ONLY or p.default is inspect.Parameter.empty]
    assert not bad, f"{protocol.__name__}.{method}: extra parameters {bad} must be keyword-only with a default"


def param(factory: typing.Callable, name: str, *marks) -> typing.Any:
    """One implementations-list entry."""
    return pytest.param(factory, id=name, marks=list(marks))
