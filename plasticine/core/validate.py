"""Argument checks shared by every package: integers, numbers, options and images.

Each raises a one-line :class:`ValueError` that names the argument, what was expected and what
came, and returns the value in its plain type (``int``, ``float``), so a constructor can write
``self.steps = check_int(steps, "steps", minimum=1)``. A ``bool`` is never taken for a number
(``True`` is an ``int`` in Python, but never what a caller meant by ``steps=True``).

Example:
    >>> check_int(3, "steps", minimum=1)
    3
    >>> check_number(0.5, "eta", 0, 1)
    0.5
    >>> check_int(True, "steps", minimum=1)
    Traceback (most recent call last):
        ...
    ValueError: steps: expected an int >= 1, got True
"""

from __future__ import annotations

import inspect
import math
import numbers
from collections.abc import Sequence
from typing import Any, Callable, TypeVar

import torch

from .shapes import check_finite, check_shape

__all__ = ["accepts_keyword", "check_int", "check_number", "check_option", "check_interval", "check_image", "check_values"]

T = TypeVar("T")


def accepts_keyword(call: Callable[..., Any], name: str) -> bool:
    """Whether ``call(..., name=value)`` is a valid call: a parameter ``name`` or ``**kwargs``.

    For an :class:`torch.nn.Module` its ``forward`` is inspected (the module's ``__call__``
    takes anything). A callable whose signature cannot be read counts as not accepting it.

    Args:
        call: a function, a bound method, a module or any callable object.
        name: the keyword.

    Returns:
        True when the keyword is accepted.

    Shape:
        Not applicable.

    Example:
        >>> accepts_keyword(lambda u, spacing=None: u, "spacing"), accepts_keyword(abs, "spacing")
        (True, False)
    """
    target = call.forward if isinstance(call, torch.nn.Module) else call
    try:
        params = inspect.signature(target).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.name == name and p.kind is not inspect.Parameter.POSITIONAL_ONLY or p.kind is inspect.Parameter.VAR_KEYWORD for p in params)


def _bounds(kind: str, minimum: Any, maximum: Any, min_open: bool = False, max_open: bool = False) -> str:
    if minimum is not None and maximum is not None:
        return f"{kind} in {'(' if min_open else '['}{minimum}, {maximum}{')' if max_open else ']'}"
    if minimum is not None:
        return f"{kind} {'>' if min_open else '>='} {minimum}"
    if maximum is not None:
        return f"{kind} {'<' if max_open else '<='} {maximum}"
    return kind


def check_int(value: Any, name: str, minimum: int | None = None, maximum: int | None = None) -> int:
    """An integer (not a bool) in ``[minimum, maximum]`` (either bound may be None).

    Args:
        value: the argument (any integral number, e.g. ``numpy.int64``).
        name: how the argument is called in the error.
        minimum: the smallest allowed value, or None.
        maximum: the largest allowed value, or None.

    Returns:
        ``int(value)``.

    Raises:
        ValueError: ``"{name}: expected an int >= 1, got ..."`` (the bounds as given).

    Shape:
        Not applicable.
    """
    if (
        isinstance(value, bool)
        or not isinstance(value, numbers.Integral)
        or (minimum is not None and value < minimum)
        or (maximum is not None and value > maximum)
    ):
        raise ValueError(f"{name}: expected {_bounds('an int', minimum, maximum)}, got {value!r}")
    return int(value)


def check_number(
    value: Any,
    name: str,
    minimum: float | None = None,
    maximum: float | None = None,
    *,
    min_open: bool = False,
    max_open: bool = False,
) -> float:
    """A finite real number (not a bool) between ``minimum`` and ``maximum``.

    Args:
        value: the argument.
        name: how the argument is called in the error.
        minimum: the lower bound, or None.
        maximum: the upper bound, or None.
        min_open: exclude ``minimum`` itself.
        max_open: exclude ``maximum`` itself.

    Returns:
        ``float(value)``.

    Raises:
        ValueError: ``"{name}: expected a number in [0, 1), got ..."`` (the bounds as given);
            NaN and infinities are refused.

    Shape:
        Not applicable.
    """
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
    if ok and minimum is not None:
        ok = value > minimum if min_open else value >= minimum
    if ok and maximum is not None:
        ok = value < maximum if max_open else value <= maximum
    if not ok:
        kind = "a finite number" if minimum is None and maximum is None else "a number"
        raise ValueError(f"{name}: expected {_bounds(kind, minimum, maximum, min_open, max_open)}, got {value!r}")
    return float(value)


def check_option(value: T, name: str, options: Sequence[Any]) -> T:
    """One of ``options`` (compared by ``==``; a bool never matches an int option).

    Args:
        value: the argument.
        name: how the argument is called in the error.
        options: the allowed values.

    Returns:
        ``value``.

    Raises:
        ValueError: ``"{name}: expected one of (...), got ..."``.

    Shape:
        Not applicable.
    """
    ok = any(isinstance(value, bool) == isinstance(o, bool) and _equal(value, o) for o in options)
    if not ok:
        raise ValueError(f"{name}: expected one of {tuple(options)}, got {value!r}")
    return value


def check_interval(value: Any, name: str) -> tuple[float, float] | None:
    """None, or a ``(low, high)`` pair of finite numbers with ``low < high``.

    Args:
        value: the argument.
        name: how the argument is called in the error.

    Returns:
        None, or ``(low, high)`` as floats.

    Raises:
        ValueError: ``"{name}: expected None or a (low, high) pair, got ..."`` or
            ``"{name}: expected low < high, got ..."``.

    Shape:
        Not applicable.
    """
    if value is None:
        return None
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise ValueError(f"{name}: expected None or a (low, high) pair, got {value!r}")
    low, high = check_number(value[0], f"{name}[0]"), check_number(value[1], f"{name}[1]")
    if not low < high:
        raise ValueError(f"{name}: expected low < high, got {tuple(value)!r}")
    return (low, high)


def _equal(a: Any, b: Any) -> bool:
    try:
        return bool(a == b)
    except (TypeError, ValueError, RuntimeError):  # e.g. a tensor compared with a string
        return False


def check_image(image: torch.Tensor, name: str) -> dict[str, Any]:
    """A finite floating ``(B, C, *S)`` image, at a boundary of the library (see :doc:`/conventions`).

    Args:
        image: the tensor.
        name: how it is called in the error.

    Returns:
        The bindings of :func:`~plasticine.core.check_shape` (``B``, ``C``, ``S``, ``N``).

    Raises:
        TypeError: if ``image`` is not a tensor.
        ValueError: for a wrong shape or a non-floating dtype.
        plasticine.core.NonFiniteError: (a ``ValueError``) for a NaN or an infinity.

    Shape:
        image: ``(B, C, *S)``.
    """
    dims = check_shape(image, "B C *S", name, floating=True)
    check_finite(image, name)
    return dims


def check_values(values: torch.Tensor, bad: torch.Tensor, message: Callable[[], str]) -> torch.Tensor:
    """Refuse tensor values flagged in ``bad``: a ``ValueError`` in eager mode, NaN under ``torch.compile``.

    A check on the values of a tensor reads a flag on the host, which a compiled graph cannot do
    without a break. Eagerly this raises ``ValueError(message())`` when any entry of ``bad`` is
    true (``message`` is called only then, so it may read the tensor). While ``torch.compile``
    traces, it returns ``values`` with NaN where ``bad`` holds instead, so that a refused value
    gives a non-finite result, never a finite one (see :doc:`/conventions`).

    Args:
        values: the tensor checked (floating).
        bad: where it is refused, broadcastable to ``values``.
        message: builds the one-line error message.

    Returns:
        ``values`` (eager, all good) or ``where(bad, NaN, values)`` (compiled).

    Raises:
        ValueError: eagerly, if ``bad`` has a true entry.

    Shape:
        values: any; bad: broadcastable to ``values``; out: as ``values``.

    Example:
        >>> g = torch.tensor([0.5, 2.0])
        >>> check_values(g, g > 1, lambda: "gamma: expected values <= 1, got 2.0")
        Traceback (most recent call last):
            ...
        ValueError: gamma: expected values <= 1, got 2.0
    """
    if torch.compiler.is_compiling():
        return torch.where(bad, torch.full_like(values, math.nan), values)
    if bool(bad.any()):
        raise ValueError(message())
    return values
