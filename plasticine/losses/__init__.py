"""Registration losses: image similarities (lower is better) and deformation regularisers.

Similarities follow :class:`plasticine.core.SimilarityLoss`: ``(moving, fixed, mask=None) -> scalar``,
the mean over batch and channels, for 2D and 3D images (and 1D for the NCC losses):

* :func:`mutual_information` / :class:`MutualInformation`: minus (normalised) Parzen mutual
  information from a sparse B-spline or Gaussian joint histogram (:func:`joint_histogram`);
* :func:`ncc` / :class:`NCC`: minus the global normalised cross-correlation, in ``[-1, 1]``;
* :func:`local_ncc` / :class:`LocalNCC`: minus the mean windowed NCC, in ``[-1, 1]``.

Regularisers take a displacement ``(B, N, *S)`` in voxels and a voxel spacing:

* :func:`gradient_smoothness` / :class:`GradientSmoothness`: mean squared first differences;
* :func:`bending_energy` / :class:`BendingEnergy`: mean squared second differences, compact stencils.
"""

from .information import MutualInformation, joint_histogram, mutual_information
from .correlation import NCC, LocalNCC, box_sum, local_ncc, ncc
from .regularizers import BendingEnergy, GradientSmoothness, bending_energy, gradient_smoothness

__all__ = [
    "BendingEnergy",
    "GradientSmoothness",
    "LocalNCC",
    "MutualInformation",
    "NCC",
    "bending_energy",
    "box_sum",
    "gradient_smoothness",
    "joint_histogram",
    "local_ncc",
    "mutual_information",
    "ncc",
]
