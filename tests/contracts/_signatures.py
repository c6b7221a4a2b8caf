"""Signature comparison for the contract suites: names, kinds, defaults and resolved annotations."""

from __future__ import annotations

import inspect
import typing


def normalised_signature(fn: typing.Callable) -> tuple:
    """What makes two methods interchangeable for a caller: the parameters, their defaults and types.

    Annotations are resolved (``typing.get_type_hints``), so a module with and one without
    ``from __future__ import annotations`` compare equal.
    """
    hints = typing.get_type_hints(fn)
    params = tuple((p.name, p.kind, p.default, hints.get(p.name)) for p in inspect.signature(fn).parameters.values())
    return params, hints.get("return")


def protocol_members(protocol: type) -> list[str]:
    """The public members a protocol declares (methods and properties)."""
    return [name for name in vars(protocol) if not name.startswith("_")]
