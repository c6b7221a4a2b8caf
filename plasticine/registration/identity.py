r"""The identity registration backend: :math:`\phi = \mathrm{Id}`, the "no deformation" baseline.

``translator.replace(registration=IdentityRegistration())`` translates without a deformation: the
structure map, the start and the result stay in the source's geometry, and tracing is the identity
(what ``plasticine translate --no-registration`` runs, and the paper's "phi = identity" baseline).
"""

from __future__ import annotations

import torch

from ..core.config import Configurable
from ..core.deformation import Deformation
from ..core.shapes import check_shape

__all__ = ["IdentityRegistration"]


class IdentityRegistration(Configurable):
    r"""A registration backend that returns the identity deformation (zero displacements both ways).

    Satisfies :class:`~plasticine.core.RegistrationBackend`; it has no settings and no weights.

    Shape:
        source: ``(B, C, *S)``; target: ``(B, C', *S)`` or None; out: a
        :class:`~plasticine.core.Deformation` whose fields ``(B, N, *S)`` are all zero, in the
        source's dtype and on its device.

    Example:
        >>> d = IdentityRegistration().register(torch.rand(2, 1, 8, 6))
        >>> d.forward.shape, float(d.forward.abs().max())
        (torch.Size([2, 2, 8, 6]), 0.0)
    """

    def __init__(self) -> None:
        super().__init__()

    def register(self, source: torch.Tensor, target: torch.Tensor | None = None, *, cue: torch.Tensor | None = None) -> Deformation:
        """The identity deformation on the source's grid.

        Args:
            source: the image to register.
            target: optional; only its batch and spatial sizes are checked against the source's.
            cue: must be None (the identity reads no cue).

        Returns:
            ``Deformation(0, 0)``: :math:`\\phi = \\phi^{-1} = \\mathrm{Id}`.

        Raises:
            ValueError: for a bad shape, a target of another size, or a cue.

        Shape:
            source: ``(B, C, *S)``; target: ``(B, C', *S)``; fields: ``(B, N, *S)``.
        """
        if cue is not None:
            raise ValueError("cue: IdentityRegistration reads no cue; pass cue=None")
        dims = check_shape(source, "B C *S", "source", floating=True)
        if target is not None:
            check_shape(target, "B Ct *S", "target", bindings={"B": dims["B"], "S": dims["S"], "N": dims["N"]})
        zero = source.new_zeros(dims["B"], dims["N"], *dims["S"])
        return Deformation(zero, zero.clone())
