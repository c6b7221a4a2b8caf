r"""Piecewise-constant Potts partitions, one concern per module.

* :mod:`~plasticine.segmentation.potts_model.energy`: the (weighted, vector-valued) L2-Potts energy
  (:func:`potts_energy`);
* :mod:`~plasticine.segmentation.potts_model.neighborhoods`: the neighbourhoods (``"axes"``,
  ``"diagonals"``) and the lines of an image along each of their directions;
* :mod:`~plasticine.segmentation.potts_model.line_solver`: the exact 1-D solver by dynamic
  programming (:func:`potts_1d`), on CPU tensors by default through the compiled loop of
  :mod:`~plasticine.segmentation.potts_model.line_kernel` (numba, optional; :func:`line_backend`);
* :mod:`~plasticine.segmentation.potts_model.admm`: the image solver, Storath and Weinmann's ADMM
  splitting into 1-D problems (:func:`potts`);
* :mod:`~plasticine.segmentation.potts_model.regions`: the final refit of connected regions and the
  greedy merging of adjacent regions;
* :mod:`~plasticine.segmentation.potts_model.extractor`: the size-independent penalty
  (:func:`pixel_gamma`), the structure map (:func:`potts_structure_map`) and the extractor
  (:class:`PottsExtractor`).

References:
    M. Storath, A. Weinmann, "Fast partitioning of vector-valued images", SIAM J. Imaging Sci.
    7(3), 1826-1852, 2014. M. Storath, A. Weinmann, J. Frikel, M. Unser, "Joint image
    reconstruction and segmentation using the Potts model", Inverse Problems 31(2), 025003, 2015.
    F. Friedrich, A. Kempe, V. Liebscher, G. Winkler, "Complexity penalized M-estimation: fast
    computation", J. Comput. Graph. Stat. 17(1), 2008 (the 1-D dynamic programme).
"""

from .admm import potts
from .energy import potts_energy
from .extractor import REFERENCE_SIZE, PottsExtractor, pixel_gamma, potts_structure_map
from .line_solver import LineBackend, line_backend, potts_1d
from .neighborhoods import Neighborhood

__all__ = [
    "LineBackend",
    "line_backend",
    "Neighborhood",
    "REFERENCE_SIZE",
    "pixel_gamma",
    "potts_1d",
    "potts",
    "potts_energy",
    "potts_structure_map",
    "PottsExtractor",
]
