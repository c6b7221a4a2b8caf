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

import math
import numbers
from typing import Any, Sequence

import torch

__all__ = ["NonFiniteError", "check_shape", "check_finite", "spatial_dims", "spacing_tuple"]


class NonFiniteError(ValueError):
    """A tensor that must hold finite values holds a NaN or an infinity.

    A :class:`ValueError`, so code that catches ``ValueError`` sees it; raised by
    :func:`check_finite` at the library's boundaries (see :doc:`/conventions`).

    Shape:
        Not applicable.
    """


def _fail(name: str, pattern: str, shape: tuple[int, ...], why: str) -> ValueError:
    return ValueError(f"{name}: expected shape ({', '.join(pattern.split())}), got {tuple(shape)}: {why}")


def check_shape(
    tensor: Any,
    pattern: str,
    name: str = "tensor",
    *,
    bindings: dict[str, Any] | None = None,
    spatial: tuple[int, ...] = (2, 3),
    floating: bool = False,
) -> dict[str, Any]:
    """Check that ``tensor`` has the shape ``pattern`` (and a floating dtype) and return the bound sizes.

    A batch dimension (named ``B``) and every spatial size of ``*S`` must be at least 1: an
    empty batch or an image without voxels is refused, never computed on.

    Args:
        tensor: the tensor to check (anything with ``.shape``; a non-tensor is an error).
        pattern: dimension names separated by spaces, e.g. ``"B N *S"``. ``*S`` matches the
            spatial dimensions, whose count must be one of ``spatial``.
        name: how the tensor is called in the error message.
        bindings: sizes already bound by an earlier check (updated in place), so that, for
            example, an image and a displacement must share ``B`` and ``S``.
        spatial: allowed numbers of spatial dimensions for ``*S``.
        floating: also require a floating-point dtype (float16, bfloat16, float32, float64).

    Returns:
        The bindings: each name mapped to its size, ``S`` to the tuple of spatial sizes and
        ``N`` (if not named in the pattern) to the number of spatial dimensions.

    Raises:
        TypeError: if ``tensor`` is not a tensor.
        ValueError: naming the expected pattern and the actual shape (or the expected and the
            actual dtype).

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
    if "B" in flat and dims[flat.index("B")] == 0:
        raise _fail(name, pattern, shape, "an empty batch (B = 0); pass at least one item")
    if star and 0 in sizes:
        raise _fail(name, pattern, shape, f"{tokens[star[0]][1:]}={tuple(sizes)} has no voxels")
    if floating and not tensor.is_floating_point():
        raise ValueError(f"{name}: expected a floating-point tensor, got dtype {tensor.dtype}")
    return bound


def check_finite(tensor: torch.Tensor, name: str, cause: str = "") -> None:
    """Raise :class:`NonFiniteError` if ``tensor`` holds a NaN or an infinity.

    For the library's boundaries only (constructing a :class:`~plasticine.core.Deformation`,
    reading and writing files, loading checkpoints, the translator's outputs): it reads a flag
    from the device, one host synchronisation. Computations propagate non-finite values instead
    (see :doc:`/conventions`). Integer and bool tensors are always finite.

    Args:
        tensor: the tensor to check.
        name: how the tensor is called in the error message.
        cause: an optional likely cause, added to the message in parentheses.

    Raises:
        TypeError: if ``tensor`` is not a tensor.
        NonFiniteError: naming ``name``, the number of non-finite values and the shape.

    Shape:
        tensor: any.

    Example:
        >>> check_finite(torch.tensor([1.0, float("nan")]), "forward")
        Traceback (most recent call last):
            ...
        plasticine.core.shapes.NonFiniteError: forward: expected finite values, found 1 NaN or infinite value(s) in a tensor of shape (2,)
    """
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(tensor).__name__}")
    if not (tensor.is_floating_point() or tensor.is_complex()) or bool(torch.isfinite(tensor).all()):
        return
    bad = int((~torch.isfinite(tensor)).sum())
    why = f" ({cause})" if cause else ""
    raise NonFiniteError(f"{name}: expected finite values, found {bad} NaN or infinite value(s) in a tensor of shape {tuple(tensor.shape)}{why}")


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


def spacing_tuple(spacing: float | Sequence[float] | None, n: int, name: str = "spacing") -> tuple[float, ...]:
    """One positive, finite voxel size per spatial axis, from None, one number or ``n`` numbers.

    The voxel size is in the tensor's axis order (``(h_y, h_x)`` in 2D, ``(h_z, h_y, h_x)`` in
    3D), usually millimetres: the column norms of an image's voxel-to-world affine. ``None`` (and
    ``1``) mean voxel units, ``(1.0,) * n``. A bool, a string, NaN, an infinity, zero or a
    negative number is refused, never clamped.

    Args:
        spacing: None, one number for every axis, or a sequence of ``n`` numbers (a tensor or
            an array of ``n`` values too).
        n: the number of spatial dimensions.
        name: how the argument is called in the error.

    Returns:
        ``n`` floats.

    Raises:
        ValueError: ``"spacing: expected None, one positive finite number or 2 of them (one per
            spatial axis), got ..."``.

    Shape:
        out: ``(n,)`` tuple.

    Example:
        >>> spacing_tuple(None, 2), spacing_tuple(2, 3), spacing_tuple((1.0, 0.5), 2)
        ((1.0, 1.0), (2.0, 2.0, 2.0), (1.0, 0.5))
    """
    if spacing is None:
        return (1.0,) * n
    error = ValueError(f"{name}: expected None, one positive finite number or {n} of them (one per spatial axis), got {spacing!r}")
    if isinstance(spacing, torch.Tensor):
        spacing = spacing.detach().cpu().reshape(-1).tolist() if spacing.dim() else spacing.item()
    elif hasattr(spacing, "tolist") and not isinstance(spacing, (str, bytes)):  # numpy arrays and scalars
        spacing = spacing.tolist()
    if isinstance(spacing, numbers.Real) and not isinstance(spacing, bool):
        spacing = (spacing,) * n
    if isinstance(spacing, (str, bytes)) or not isinstance(spacing, Sequence):
        raise error
    values = tuple(spacing)
    if len(values) != n or not all(isinstance(s, numbers.Real) and not isinstance(s, bool) and math.isfinite(s) and s > 0 for s in values):
        raise error
    return tuple(float(s) for s in values)
