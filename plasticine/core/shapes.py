"""Shape checks whose errors name the expected pattern and the actual shape.

A pattern is a space-separated list of dimension names. A name binds to the size it first meets
and must match that size wherever it appears again (also across calls that share ``bindings``);
a decimal number must match exactly; ``*S`` stands for the 2 or 3 spatial dimensions of an image
(or ``*S1`` for exactly one spatial dimension up to 3, see ``spatial``).

Example:
    >>> import torch
    >>> dims = check_shape(torch.zeros(2, 1, 8, 9), "B C *S", "image")
    >>> dims["B"], dims["S"]
    (2, (8, 9))
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

__all__ = ["check_shape", "spatial_dims", "spacing_tuple"]


def _fail(name: str, pattern: str, shape: tuple[int, ...], why: str) -> ValueError:
    return ValueError(f"{name}: expected shape ({', '.join(pattern.split())}), got {tuple(shape)}: {why}")


def check_shape(
    tensor: Any,
    pattern: str,
    name: str = "tensor",
    *,
    bindings: dict[str, Any] | None = None,
    spatial: tuple[int, ...] = (2, 3),
) -> dict[str, Any]:
    """Check that ``tensor`` has the shape ``pattern`` and return the bound sizes.

    Args:
        tensor: the tensor to check (anything with ``.shape``; a non-tensor is an error).
        pattern: dimension names separated by spaces, e.g. ``"B N *S"``. ``*S`` matches the
            spatial dimensions, whose count must be one of ``spatial``.
        name: how the tensor is called in the error message.
        bindings: sizes already bound by an earlier check (updated in place), so that, for
            example, an image and a displacement must share ``B`` and ``S``.
        spatial: allowed numbers of spatial dimensions for ``*S``.

    Returns:
        The bindings: each name mapped to its size, ``S`` to the tuple of spatial sizes and
        ``N`` (if not named in the pattern) to the number of spatial dimensions.

    Raises:
        ValueError: naming the expected pattern and the actual shape.

    Shape:
        Any; described by ``pattern``.
    """
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor of shape ({', '.join(pattern.split())}), got {type(tensor).__name__}")
    shape = tuple(tensor.shape)
    tokens = pattern.split()
    bound: dict[str, Any] = bindings if bindings is not None else {}
    star = [i for i, t in enumerate(tokens) if t.startswith("*")]
    if len(star) > 1:
        raise ValueError(f"pattern {pattern!r} has more than one starred group")
    if star:
        i = star[0]
        nstar = len(shape) - (len(tokens) - 1)
        if nstar not in spatial:
            allowed = " or ".join(str(s) for s in spatial)
            raise _fail(name, pattern, shape, f"{tokens[i]} must be {allowed} spatial dimensions, found {max(nstar, 0)}")
        sizes = shape[i : i + nstar]
        key = tokens[i][1:]
        if key in bound and tuple(bound[key]) != tuple(sizes):
            raise _fail(name, pattern, shape, f"{key}={tuple(sizes)} does not match {key}={tuple(bound[key])} seen before")
        bound[key] = tuple(sizes)
        if "N" not in tokens:
            bound.setdefault("N", nstar)
        flat = tokens[:i] + tokens[i + 1 :]
        dims = shape[:i] + shape[i + nstar :]
    else:
        if len(shape) != len(tokens):
            raise _fail(name, pattern, shape, f"{len(tokens)} dimensions expected, found {len(shape)}")
        flat, dims = tokens, shape
    for tok, size in zip(flat, dims):
        if tok.isdigit():
            if int(tok) != size:
                raise _fail(name, pattern, shape, f"a dimension of size {tok} expected, found {size}")
        elif tok in bound:
            if bound[tok] != size:
                raise _fail(name, pattern, shape, f"{tok}={size} does not match {tok}={bound[tok]} seen before")
        else:
            bound[tok] = size
    if star and "N" in bound and bound["N"] != len(bound[tokens[star[0]][1:]]):
        raise _fail(name, pattern, shape, f"N={bound['N']} vector components but {len(bound[tokens[star[0]][1:]])} spatial dimensions")
    return bound


def spatial_dims(tensor: torch.Tensor) -> int:
    """Number of spatial dimensions N of a ``(B, C, *S)`` tensor (2 or 3).

    Args:
        tensor: an image-like tensor.

    Returns:
        ``len(S)``.

    Raises:
        ValueError: if the tensor is not ``(B, C, *S)`` with 2 or 3 spatial dimensions.

    Shape:
        tensor: ``(B, C, *S)`` with ``len(S)`` in {2, 3}.
    """
    return check_shape(tensor, "B C *S", "tensor")["N"]


def spacing_tuple(spacing: float | Sequence[float], n: int) -> tuple[float, ...]:
    """One positive voxel size per spatial axis, from one number or ``n`` numbers.

    Raises:
        ValueError: naming the expected count and the value given.

    Shape:
        out: ``(n,)`` tuple.
    """
    if isinstance(spacing, (int, float)):
        spacing = (float(spacing),) * n
    spacing = tuple(float(s) for s in spacing)
    if len(spacing) != n or min(spacing) <= 0:
        raise ValueError(f"spacing: expected one positive number or {n} positive numbers, got {spacing}")
    return spacing
