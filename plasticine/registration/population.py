r"""The systematic deformation between two domains, estimated from unpaired sets by their templates.

When both domains hold subjects that vary alike (head size, ventricle shape, position) and differ by
one systematic change (the paper's disease-progression setting: an atrophy, an enlargement, the
distortion of a scanner), a registration trained on *unpaired* (source, randomly drawn target)
pairs cannot tell a subject's own anatomy from the change: towards a random target, the best field
for :math:`x_i = T \circ \psi_i` is :math:`\psi_i^{-1} \circ \psi_j \circ \phi_E`, and predicted
from :math:`x_i` alone its average over the targets, :math:`\psi_i^{-1} \circ \phi_E`, which undoes
the subject's own deformation :math:`\psi_i` instead of keeping it. The change :math:`\phi_E` is
what the two *populations* differ by. Their templates, the voxel-wise means

.. math::

    \bar x = \frac1n \sum_i x_i, \qquad \bar y = \frac1m \sum_j y_j,

average the subject variation out (about equally in both domains), and the registration of
:math:`\bar x` to :math:`\bar y` by any backend (by default
:class:`~plasticine.registration.IterativeRegistration`: symmetric normalised mutual information,
coarse to fine, so the contrasts may differ; twice its per-pair iterations) estimates :math:`\phi_E`.
:class:`PopulationRegistration` stores that one deformation and returns it for every image.

It needs no paired information (no true field, no subject seen in both domains), only images of
one grid in each domain. It is the right model when the change is the same for every subject; a
change that depends on the subject needs a per-image backend.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn

from ..core.config import Configurable
from ..core.deformation import Deformation
from ..core.shapes import check_finite, check_shape

__all__ = ["PopulationRegistration"]

#: Iterations per level (4x, 2x, 1x) of the default backend: it runs once, so it can afford more than
#: a per-pair registration; on the T1 -> PD case of ``benchmarks/crossmodal.py`` (80, 50, 20) traced
#: the ventricles with Dice 0.947 where the per-pair default (40, 25, 10) gave 0.897.
_ITERATIONS = (80, 50, 20)


def _stack(images: torch.Tensor | Sequence[torch.Tensor], name: str) -> torch.Tensor:
    stack = images if isinstance(images, torch.Tensor) else torch.stack(list(images)) if len(images) else None
    if stack is None or stack.shape[0] == 0:
        raise ValueError(f"{name}: expected at least one image, got none")
    check_shape(stack, "n C *S", name, floating=True)
    return stack


class PopulationRegistration(Configurable, nn.Module):
    r"""One deformation for every image: the registration of the source template to the target template.

    :meth:`fit` computes the templates :math:`\bar x`, :math:`\bar y` (voxel-wise means of the
    source and the target images) and stores :math:`\phi = \mathrm{backend}(\bar x, \bar y)` with
    its inverse as buffers (saved with the weights); :meth:`register` returns them for each item of
    a batch (see the module docstring for when this is the right model). Before :meth:`fit` it
    refuses to register.

    Args:
        shape: the spatial grid of every image, ``(H, W)`` or ``(D, H, W)``.
        backend: the registration of the templates, ``register(source, target) -> Deformation``;
            default :class:`~plasticine.registration.IterativeRegistration` with
            ``iterations=(80, 50, 20)`` (it runs once, so it affords twice the per-pair default).

    Shape:
        source: ``(B, C, *shape)``; returned Deformation fields ``(B, N, *shape)``, the same for
        every item; buffers ``forward``, ``inverse``: ``(1, N, *shape)``.

    Example:
        >>> reg = PopulationRegistration((16, 12))
        >>> _ = reg.fit(torch.rand(3, 1, 16, 12), torch.rand(5, 1, 16, 12))
        >>> reg.register(torch.rand(2, 1, 16, 12)).forward.shape
        torch.Size([2, 2, 16, 12])
    """

    def __init__(self, shape: tuple[int, ...], backend: object | None = None):
        super().__init__()
        shape = tuple(shape)
        if len(shape) not in (2, 3) or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 2 for s in shape):
            raise ValueError(f"shape: expected 2 or 3 ints >= 2, got {shape!r}")
        if backend is None:
            from .iterative import IterativeRegistration

            backend = IterativeRegistration(iterations=_ITERATIONS)
        if not callable(getattr(backend, "register", None)):
            raise ValueError(f"backend: expected a registration backend with register(source, target), got {backend!r}")
        self.shape, self.backend = shape, backend
        n = len(shape)
        self.register_buffer("forward_field", torch.zeros(1, n, *shape))
        self.register_buffer("inverse_field", torch.zeros(1, n, *shape))
        self.register_buffer("fitted", torch.zeros((), dtype=torch.bool))

    def fit(self, sources: torch.Tensor | Sequence[torch.Tensor], targets: torch.Tensor | Sequence[torch.Tensor]) -> dict[str, float]:
        r"""Estimate the systematic deformation from unpaired sets (in place).

        :math:`\bar x = \mathrm{mean}_i\, x_i`, :math:`\bar y = \mathrm{mean}_j\, y_j`,
        :math:`\phi = \mathrm{backend}(\bar x, \bar y)`; the buffers take its forward and inverse
        displacements, in their dtype.

        Args:
            sources: source-domain images.
            targets: target-domain images (unpaired; any number).

        Returns:
            ``{"max_displacement": max |u|, "mean_displacement": mean |u|}`` in voxels.

        Raises:
            ValueError: for an empty set, images off :attr:`shape`, different channel counts, or
                non-finite images (:class:`~plasticine.core.NonFiniteError`, also for a non-finite
                field from the backend; the buffers are then left as they were).

        Shape:
            sources: ``(n, C, *shape)`` (or a sequence of ``(C, *shape)``); targets:
            ``(m, C, *shape)``.
        """
        x, y = _stack(sources, "sources"), _stack(targets, "targets")
        check_finite(x, "sources")
        check_finite(y, "targets")
        for name, t in (("sources", x), ("targets", y)):
            if tuple(t.shape[2:]) != self.shape:
                raise ValueError(f"{name}: expected images on the grid {self.shape}, got {tuple(t.shape[2:])}")
        if x.shape[1] != y.shape[1]:
            raise ValueError(f"targets: expected {x.shape[1]} channel(s) like the sources, got {y.shape[1]}")
        with torch.no_grad():
            mx, my = x.mean(0, keepdim=True), y.to(x.dtype).mean(0, keepdim=True)
        d = self.backend.register(mx, my)
        check_finite(d.forward, "fit: the template registration's forward field", f"the backend {type(self.backend).__name__} diverged")
        check_finite(d.inverse, "fit: the template registration's inverse field")
        with torch.no_grad():
            self.forward_field.copy_(d.forward.to(self.forward_field.dtype))
            self.inverse_field.copy_(d.inverse.to(self.inverse_field.dtype))
            self.fitted.fill_(True)
            norm = self.forward_field.norm(dim=1)
        return {"max_displacement": float(norm.max()), "mean_displacement": float(norm.mean())}

    def register(self, source: torch.Tensor, target: torch.Tensor | None = None, *, cue: torch.Tensor | None = None) -> Deformation:
        """The stored deformation, once per item of ``source``.

        Args:
            source: the images (only their batch size, grid, dtype and device are used).
            target: optional, ignored apart from its shape check (the deformation is the population's).
            cue: must be None.

        Raises:
            ValueError: before :meth:`fit`, for a grid other than :attr:`shape`, or a cue.

        Shape:
            source: ``(B, C, *shape)``; fields ``(B, N, *shape)``.
        """
        if cue is not None:
            raise ValueError("cue: PopulationRegistration reads no cue; pass cue=None")
        dims = check_shape(source, "B C *S", "source", floating=True)
        if tuple(dims["S"]) != self.shape:
            raise ValueError(f"source: expected images on the grid {self.shape} the deformation was fitted on, got {tuple(dims['S'])}")
        if target is not None:
            check_shape(target, "B Ct *S", "target", bindings={"B": dims["B"], "S": dims["S"], "N": dims["N"]})
        if not bool(self.fitted):
            raise ValueError("PopulationRegistration: not fitted; call fit(sources, targets) first (or load fitted weights)")
        B = dims["B"]
        expand = (B, -1) + (-1,) * len(self.shape)
        fwd = self.forward_field.to(source.dtype).expand(*expand).contiguous()
        inv = self.inverse_field.to(source.dtype).expand(*expand).contiguous()
        return Deformation(fwd, inv)
