r"""torchio and MONAI images in and out of plasticine, keeping their geometry.

plasticine works on tensors ``(B, C, *S)`` with a ``(4, 4)`` voxel-to-world affine (RAS,
millimetres) beside them (:func:`plasticine.io.read_affine`, :doc:`/conventions`). Users of torchio
and MONAI hold images that carry both: a :class:`torchio.ScalarImage` or
:class:`torchio.LabelMap` (``.data`` is ``(C, W, H, D)``, ``.affine`` is RAS), a
:class:`torchio.Subject` of named images, or a MONAI ``MetaTensor`` (channel first, ``.affine``
in the space named by ``meta["space"]``, RAS unless it says ``"LPS"``).

* :func:`to_tensor` turns any of them (or a plain ``(C, *S)`` tensor, identity affine) into a
  float32 ``(1, C, *S)`` tensor and its float64 RAS affine. The axes are the object's own, never
  reordered, exactly as :func:`plasticine.io.read_image` keeps the array axes of a NIfTI file, so
  a file read by either gives the same tensor and affine; a volume with one slice, ``(C, W, H, 1)``
  (how torchio stores a 2D image), becomes the 2D ``(1, C, W, H)``, as ``read_image`` does. An
  LPS affine is turned to RAS: :math:`A_{RAS} = \mathrm{diag}(-1, -1, 1, 1)\, A_{LPS}`.
* :func:`from_tensor` wraps a result (a translation, a traced mask, a structure map) back into the
  type of the input with the input's geometry: a torchio ``ScalarImage`` (or ``LabelMap`` with
  ``label=True``) with its affine, a ``MetaTensor`` with its metadata and affine (in its own space),
  a plain tensor for a plain tensor. Results of :meth:`~plasticine.translator.TraceableTranslator.translate`
  are on the source's voxel grid, so the source's affine describes them.
* :func:`translate_image` is the two steps around a translation.

Both packages are optional (``pip install 'plasticine[torchio]'``, ``pip install
'plasticine[monai]'``) and imported only when one of their objects is passed; plasticine never
needs them otherwise.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from .core.shapes import check_finite, check_shape
from .io import Normalization, normalize_intensity

if TYPE_CHECKING:
    from .translator import TraceableTranslator, TranslationResult

__all__ = ["from_tensor", "to_tensor", "translate_image"]

_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
_EXPECTED = "a torchio.ScalarImage or LabelMap, a torchio.Subject (with key), a MONAI MetaTensor or a (C, *S) torch.Tensor"


def _package(obj: Any) -> str | None:
    """``"torchio"`` or ``"monai"`` when a class of ``obj`` comes from that package (no import needed)."""
    for cls in type(obj).__mro__:
        root = cls.__module__.split(".")[0]
        if root in ("torchio", "monai"):
            return root
    return None


def _import(package: str) -> Any:
    try:
        return importlib.import_module(package)
    except ImportError as err:  # pragma: no cover - an object of the package implies the package
        raise ImportError(f"this needs the {package} package: pip install 'plasticine[{package}]' (or pip install {package})") from err


def _resolve(obj: Any, key: str | None, name: str) -> tuple[Any, str | None]:
    """The image behind ``obj`` (a Subject's ``key``) and its package."""
    package = _package(obj)
    if package == "torchio":
        tio = _import("torchio")
        if isinstance(obj, tio.Subject):
            images = list(obj.get_images_dict(intensity_only=False))
            if key is None or key not in images:
                raise ValueError(
                    f"key: expected the name of an image of the torchio.Subject given as {name} ({', '.join(map(repr, images)) or 'none'}), got {key!r}"
                )
            return obj[key], package
        if not isinstance(obj, tio.Image):
            raise ValueError(f"{name}: expected {_EXPECTED}, got {type(obj).__name__}")
    elif package == "monai":
        if not isinstance(obj, _import("monai.data").MetaTensor):
            raise ValueError(f"{name}: expected {_EXPECTED}, got {type(obj).__name__}")
    elif not isinstance(obj, torch.Tensor):
        raise ValueError(f"{name}: expected {_EXPECTED}, got {type(obj).__name__}")
    if key is not None:
        raise ValueError(f"key: only a torchio.Subject takes a key, got key={key!r} for a {type(obj).__name__}")
    return obj, package


def _ras(affine: Any, space: str, name: str) -> np.ndarray:
    a = np.asarray(torch.as_tensor(affine).detach().cpu().to(torch.float64))
    if a.shape == (3, 3):  # a 2D affine: embed it, the third axis across the plane
        a = np.array([[a[0, 0], a[0, 1], 0.0, a[0, 2]], [a[1, 0], a[1, 1], 0.0, a[1, 2]], [0.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, 1.0]])
    if a.shape != (4, 4) or not np.isfinite(a).all() or abs(np.linalg.det(a[:3, :3])) < 1e-12:
        raise ValueError(f"{name}: expected a finite, invertible 4 x 4 (or 3 x 3 in 2D) affine, got {np.round(a, 6).tolist()}")
    if space not in ("RAS", "LPS"):
        raise ValueError(f"{name}: expected meta['space'] 'RAS' or 'LPS', got {space!r}")
    return _LPS_TO_RAS @ a if space == "LPS" else a


def to_tensor(obj: Any, *, key: str | None = None, normalization: Normalization = "none") -> tuple[torch.Tensor, np.ndarray]:
    r"""A torchio or MONAI image (or a plain tensor) as a plasticine batch of one and its RAS affine.

    See the module docstring for the axis order and the spaces: the axes are never reordered, an
    LPS ``MetaTensor`` affine becomes :math:`\mathrm{diag}(-1, -1, 1, 1)\, A`, a trailing spatial
    axis of size 1 is dropped (torchio's 2D images), a plain tensor gets the identity.

    Args:
        obj: a ``torchio.ScalarImage`` / ``LabelMap``, a ``torchio.Subject`` (with ``key``), a
            channel-first MONAI ``MetaTensor`` or a ``torch.Tensor``.
        key: the name of the image in a ``Subject``; only for a ``Subject``.
        normalization: applied per channel, see :func:`plasticine.io.normalize_intensity`
            (``"none"`` keeps the values; the shipped translators expect ``"percentile"``).

    Returns:
        ``(image, affine)``: the float32 image and the float64 voxel-to-world (RAS, mm) affine of
        its axes.

    Raises:
        ValueError: naming the argument, for another type, a missing or unexpected key, a shape
            without a channel axis and 2 or 3 spatial axes (a batched ``MetaTensor`` included),
            non-finite values (:class:`~plasticine.core.NonFiniteError`), or an affine that is not
            finite and invertible.

    Shape:
        obj: ``(C, *S)`` (torchio: ``(C, W, H, D)``); image: ``(1, C, *S)``; affine: ``(4, 4)``.
    """
    image, package = _resolve(obj, key, "obj")
    if package == "torchio":
        data, affine = image.data, _ras(image.affine, "RAS", "obj")
    elif package == "monai":
        if image.is_batch or image.affine.ndim != 2:
            raise ValueError(f"obj: expected one channel-first MetaTensor (C, *S), got a batch of shape {tuple(image.shape)} (pass one item, obj[i])")
        data = image.as_tensor()
        affine = _ras(image.affine, str(image.meta.get("space", "RAS")).upper(), "obj")
    else:
        data, affine = image, np.eye(4)
    data = torch.as_tensor(data)
    check_shape(data, "C *S", "obj", spatial=(2, 3))
    if data.ndim == 4 and data.shape[-1] == 1:
        data = data[..., 0]
    data = data.detach().to(torch.float32)
    check_finite(data, "obj")
    data = normalize_intensity(data, normalization).to(torch.float32)
    return data[None].contiguous(), affine


def from_tensor(tensor: torch.Tensor, like: Any, *, key: str | None = None, label: bool = False) -> Any:
    """Wrap a result on the voxel grid of ``like`` into the type of ``like``, with its geometry.

    Args:
        tensor: one item of a result (a translation, a traced mask), on ``like``'s grid; its channel
            count may differ from ``like``'s.
        like: what :func:`to_tensor` was given: a torchio ``Image`` or ``Subject`` (with ``key``), a
            MONAI ``MetaTensor`` or a tensor.
        key: the name of the image in a ``Subject``; only for a ``Subject``.
        label: a torchio ``LabelMap`` instead of a ``ScalarImage`` (for masks and label maps).

    Returns:
        A ``torchio.ScalarImage`` / ``LabelMap`` with ``like``'s affine (a 2D result gets the
        trailing axis of size 1 back), a ``MetaTensor`` with a copy of ``like``'s metadata and its
        affine (in ``like``'s space), or a ``(C, *S)`` tensor for a tensor ``like``.

    Raises:
        ValueError: naming the argument, for a tensor that is not one item on ``like``'s spatial
            grid, or a ``like`` of another type.

    Shape:
        tensor: ``(1, C, *S)`` with ``S`` the spatial size :func:`to_tensor` gives for ``like``;
        out: ``(C, *S)`` (torchio: ``(C, W, H, D)``).
    """
    image, package = _resolve(like, key, "like")
    data = torch.as_tensor(image.data if package == "torchio" else image)
    check_shape(data, "C *S", "like", spatial=(2, 3))
    squeezed = data.ndim == 4 and data.shape[-1] == 1
    grid = tuple(data.shape[1:-1] if squeezed else data.shape[1:])
    check_shape(tensor, "B C *S", "tensor", bindings={"B": 1, "S": grid}, spatial=(len(grid),))
    out = tensor.detach()[0]
    if package == "torchio":
        tio = _import("torchio")
        cls = tio.LabelMap if label else tio.ScalarImage
        return cls(tensor=out[..., None] if squeezed else out, affine=np.array(image.affine, dtype=np.float64))
    if package == "monai":
        meta = dict(image.meta)
        meta.pop("affine", None)
        return type(image)(out[..., None] if squeezed else out, affine=image.affine.clone(), meta=meta)
    return out[..., None] if squeezed else out


def translate_image(
    translator: TraceableTranslator, obj: Any, *, key: str | None = None, normalization: Normalization = "percentile", **kwargs: Any
) -> tuple[Any, TranslationResult]:
    """Translate a torchio or MONAI image and return the translation in the same type and geometry.

    ``image, affine = to_tensor(obj, key=key, normalization=normalization)``, then
    ``result = translator.translate(image, **kwargs)`` and ``from_tensor(result.image, obj, key=key)``.
    Traced masks and the other fields of the result are on the same grid: wrap them with
    :func:`from_tensor` (``label=True`` for masks).

    Args:
        translator: the translator.
        obj: see :func:`to_tensor`.
        key: the name of the image in a ``Subject``.
        normalization: of the input, see :func:`plasticine.io.normalize_intensity`; the default is
            the scale the shipped translators are trained on.
        **kwargs: passed to :meth:`~plasticine.translator.TraceableTranslator.translate`.

    Returns:
        ``(translation, result)``: the translation as ``obj``'s type with its geometry, and the
        full :class:`~plasticine.translator.TranslationResult`.

    Raises:
        ValueError: as :func:`to_tensor` and ``translate``.

    Shape:
        obj: ``(C, *S)``; translation: as ``obj``.
    """
    image, _ = to_tensor(obj, key=key, normalization=normalization)
    result = translator.translate(image, **kwargs)
    return from_tensor(result.image, obj, key=key), result
