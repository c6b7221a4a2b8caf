"""The :class:`Deformation`: a map phi and its inverse, and everything that traces through them."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

from .jacobian import (
    FoldingReport,
    folding_fraction,
    folding_report,
    inverse_consistency_error,
    jacobian_determinant,
)
from .grid import working_dtype
from .shapes import check_finite, check_shape
from .warp import Mode, Padding, sample_at_points, warp

__all__ = ["Deformation"]


class Deformation:
    r"""A diffeomorphism :math:`\phi` between source and target, stored as two displacements.

    ``forward`` is the displacement of :math:`\phi` (:math:`\phi(p) = p + u(p)`), ``inverse`` that of
    :math:`\phi^{-1}`. Images are pulled back: the source seen in the target geometry is
    ``source o phi`` (:meth:`to_target`); a target image seen in the source geometry is
    ``target o phi^-1`` (:meth:`to_source`). Points move the other way: a source point ``p`` sits at
    :math:`\phi^{-1}(p)` in the target (:meth:`points_to_target`), a target point ``q`` at
    :math:`\phi(q)` in the source (:meth:`points_to_source`).

    :func:`plasticine.io.write_itk_deformation` writes phi and phi^-1 as the ITK / ANTs
    displacement fields ``Warp`` / ``InverseWarp`` that ANTs and SimpleITK apply, and
    :func:`plasticine.io.read_itk_deformation` reads them (see :doc:`/conventions`).

    Construction is a boundary of the library (see :doc:`/conventions`): the fields must be
    floating and finite; a NaN or an infinity raises :class:`~plasticine.core.NonFiniteError` (a
    ``ValueError``) naming the field. The check reads one flag per field from the device.

    Args:
        forward: displacement of phi in voxels, channel ``i`` along axis ``i``.
        inverse: displacement of phi^-1.
        velocity: optional stationary velocity with ``phi = exp(velocity)``.

    Raises:
        ValueError: for a wrong shape, a non-floating dtype, fields on different dtypes or devices,
            or a non-finite value (:class:`~plasticine.core.NonFiniteError`).

    Shape:
        forward, inverse, velocity: ``(B, N, *S)``.
    """

    def __init__(self, forward: torch.Tensor, inverse: torch.Tensor, velocity: torch.Tensor | None = None):
        dims = check_shape(forward, "B N *S", "forward", floating=True)
        check_shape(inverse, "B N *S", "inverse", bindings=dims, floating=True)
        if velocity is not None:
            check_shape(velocity, "B N *S", "velocity", bindings=dims, floating=True)
        if forward.dtype != inverse.dtype or forward.device != inverse.device:
            raise ValueError(
                f"forward and inverse must share dtype and device, got {forward.dtype}/{forward.device} and {inverse.dtype}/{inverse.device}"
            )
        for name, field in (("forward", forward), ("inverse", inverse), ("velocity", velocity)):
            if field is not None:
                check_finite(field, name, "a Deformation holds finite fields")
        self.forward = forward
        self.inverse = inverse
        self.velocity = velocity

    # -- geometry -------------------------------------------------------------------------
    @property
    def shape(self) -> tuple[int, ...]:
        """Spatial size ``S``."""
        return tuple(self.forward.shape[2:])

    @property
    def ndim(self) -> int:
        """Number of spatial dimensions N."""
        return self.forward.shape[1]

    def to(self, *args, **kwargs) -> Deformation:
        """Move or cast every field (arguments as :meth:`torch.Tensor.to`).

        Returns:
            A new :class:`Deformation`; ``self`` is unchanged.
        """
        v = None if self.velocity is None else self.velocity.to(*args, **kwargs)
        return Deformation(self.forward.to(*args, **kwargs), self.inverse.to(*args, **kwargs), v)

    def inverted(self) -> Deformation:
        """The deformation of :math:`\\phi^{-1}` (fields swapped, velocity negated).

        Returns:
            A :class:`Deformation` sharing this one's tensors.
        """
        out = Deformation.__new__(Deformation)  # the fields are already checked
        out.forward, out.inverse = self.inverse, self.forward
        out.velocity = None if self.velocity is None else -self.velocity
        return out

    def __repr__(self) -> str:
        return f"Deformation(shape={self.shape}, batch={self.forward.shape[0]}, dtype={self.forward.dtype}, velocity={self.velocity is not None})"

    # -- images -----------------------------------------------------------------------------
    def to_target(self, image: torch.Tensor, mode: Mode = "linear", padding: Padding = "border") -> torch.Tensor:
        """Source image in target geometry: ``image o phi``.

        Args:
            image: an image in source geometry (floating; the field is cast to its dtype, to
                float32 for a float16/bfloat16 image, see :func:`~plasticine.core.warp`).
            mode: interpolation, as in :func:`~plasticine.core.warp`.
            padding: extension outside the grid, as in :func:`~plasticine.core.warp`.

        Returns:
            The image resampled on the target grid.

        Shape:
            image: ``(B, C, *S)``; out: ``(B, C, *S)``.
        """
        check_shape(image, "B C *S", "image", floating=True)
        return warp(image, self.forward.to(working_dtype(image.dtype)), mode, padding)

    def to_source(self, image: torch.Tensor, mode: Mode = "linear", padding: Padding = "border") -> torch.Tensor:
        """Target image in source geometry: ``image o phi^-1``.

        Args:
            image: an image in target geometry (floating; the field is cast to its dtype, to
                float32 for a float16/bfloat16 image, see :func:`~plasticine.core.warp`).
            mode: interpolation, as in :func:`~plasticine.core.warp`.
            padding: extension outside the grid, as in :func:`~plasticine.core.warp`.

        Returns:
            The image resampled on the source grid.

        Shape:
            image: ``(B, C, *S)``; out: ``(B, C, *S)``.
        """
        check_shape(image, "B C *S", "image", floating=True)
        return warp(image, self.inverse.to(working_dtype(image.dtype)), mode, padding)

    # -- labels -----------------------------------------------------------------------------
    def labels_to_target(
        self, labels: torch.Tensor, num_classes: int | None = None, method: Literal["linear", "nearest"] = "linear"
    ) -> torch.Tensor:
        """Trace a label map from source to target geometry (``labels o phi``).

        ``method="linear"`` warps one-hot channels linearly and takes the argmax (smooth
        boundaries, no label can appear where none was); ``"nearest"`` samples the nearest label.

        Args:
            labels: integer label map in source geometry, values in ``[0, num_classes)`` for
                ``"linear"``.
            num_classes: number of classes for the one-hot encoding (default: ``max + 1``). The
                ``"linear"`` method reads the label range from the device to check it (one
                host synchronisation); ``"nearest"`` does not.
            method: ``"linear"`` (one-hot, linear warp, argmax) or ``"nearest"``.

        Returns:
            The label map in target geometry.

        Shape:
            labels: ``(B, 1, *S)`` integer; out: ``(B, 1, *S)`` int64.
        """
        return _trace_labels(labels, self.forward, num_classes, method)

    def labels_to_source(
        self, labels: torch.Tensor, num_classes: int | None = None, method: Literal["linear", "nearest"] = "linear"
    ) -> torch.Tensor:
        """Trace a label map from target to source geometry (``labels o phi^-1``).

        Args:
            labels: integer label map in target geometry.
            num_classes: number of classes for the one-hot encoding (default: ``max + 1``).
            method: ``"linear"`` (one-hot, linear warp, argmax) or ``"nearest"``.

        Returns:
            The label map in source geometry.

        Shape:
            labels: ``(B, 1, *S)`` integer; out: ``(B, 1, *S)`` int64.
        """
        return _trace_labels(labels, self.inverse, num_classes, method)

    # -- points -----------------------------------------------------------------------------
    def points_to_target(self, points: torch.Tensor) -> torch.Tensor:
        """Where source points sit in the target: :math:`\\phi^{-1}(p) = p + u^{-1}(p)`.

        ``u^{-1}`` is interpolated linearly at the points (border padding).

        Args:
            points: voxel coordinates in source geometry, tensor axis order.

        Returns:
            The same points in target voxel coordinates.

        Shape:
            points: ``(B, P, N)`` voxel coordinates in axis order; out: ``(B, P, N)``.
        """
        check_shape(points, "B P N", "points", bindings={"N": self.ndim}, spatial=(), floating=True)
        return points + sample_at_points(self.inverse.to(points.dtype), points)

    def points_to_source(self, points: torch.Tensor) -> torch.Tensor:
        """Where target points sit in the source: :math:`\\phi(q) = q + u(q)`.

        Args:
            points: voxel coordinates in target geometry, tensor axis order.

        Returns:
            The same points in source voxel coordinates.

        Shape:
            points: ``(B, P, N)`` voxel coordinates in axis order; out: ``(B, P, N)``.
        """
        check_shape(points, "B P N", "points", bindings={"N": self.ndim}, spatial=(), floating=True)
        return points + sample_at_points(self.forward.to(points.dtype), points)

    # -- quality ----------------------------------------------------------------------------
    def jacobian_determinant(self) -> torch.Tensor:
        """Jacobian determinant of phi, see :func:`plasticine.core.jacobian_determinant`.

        Returns:
            :math:`\\det J_\\phi` per voxel.

        Shape:
            out: ``(B, 1, *S)``.
        """
        return jacobian_determinant(self.forward)

    def folding_fraction(self, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Fraction of voxels where phi folds (det J <= 0), see :func:`plasticine.core.folding_fraction`.

        Args:
            mask: optional region to count in.

        Returns:
            The folded fraction per batch element.

        Shape:
            mask: ``(B, 1, *S)`` or None; out: ``(B,)``.
        """
        return folding_fraction(self.forward, mask)

    def folding_report(self, mask: torch.Tensor | None = None) -> FoldingReport:
        """Central-difference folding beside the one-sided count and the non-diffeomorphic volume of phi.

        See :func:`plasticine.core.folding_report`.

        Args:
            mask: optional region to count in.

        Returns:
            A :class:`~plasticine.core.FoldingReport` of three ``(B,)`` fractions.

        Shape:
            mask: ``(B, 1, *S)`` or None; out: three ``(B,)``.
        """
        return folding_report(self.forward, mask)

    def inverse_consistency(self, mask: torch.Tensor | None = None, reduction: Literal["mean", "max"] = "mean") -> torch.Tensor:
        """Mean (or max) distance of phi o phi^-1 and phi^-1 o phi from the identity, in voxels.

        See :func:`plasticine.core.inverse_consistency_error`.

        Args:
            mask: optional region to average over.
            reduction: ``"mean"`` or ``"max"`` over the voxels.

        Returns:
            The error per batch element.

        Shape:
            mask: ``(B, 1, *S)`` or None; out: ``(B,)``.
        """
        return inverse_consistency_error(self.forward, self.inverse, mask, reduction)


def _trace_labels(labels: torch.Tensor, displacement: torch.Tensor, num_classes: int | None, method: str) -> torch.Tensor:
    check_shape(labels, "B 1 *S", "labels", bindings={"S": tuple(displacement.shape[2:])})
    if displacement.shape[0] not in (1, labels.shape[0]):
        raise ValueError(
            f"labels: expected batch size {displacement.shape[0]} to match the deformation {tuple(displacement.shape)}, got {tuple(labels.shape)}"
        )
    if labels.is_floating_point() or labels.is_complex():
        raise ValueError(f"labels: expected an integer tensor, got {labels.dtype}")
    dtype = displacement.dtype
    if method == "nearest":
        out = warp(labels.to(dtype), displacement.expand(labels.shape[0], *displacement.shape[1:]), mode="nearest")
        return out.round().long()
    if method != "linear":
        raise ValueError(f"method: expected 'linear' or 'nearest', got {method!r}")
    if num_classes is None:
        num_classes = int(labels.max().item()) + 1
    if labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(f"labels: expected values in [0, {num_classes}), got [{int(labels.min())}, {int(labels.max())}]")
    onehot = F.one_hot(labels[:, 0].long(), num_classes).movedim(-1, 1).to(dtype)
    return warp(onehot, displacement.expand(labels.shape[0], *displacement.shape[1:])).argmax(1, keepdim=True)
