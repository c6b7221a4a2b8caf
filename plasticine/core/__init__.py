"""Conventions, grids, warping, deformations, Jacobians, protocols, configuration and argument checks.

See :doc:`/conventions` for the coordinate model every function here follows, and
:doc:`/configuration` for the configuration that every component declares (:class:`Configurable`).
"""

from .config import Config, ConfigError, Configurable, from_json, register_settings, registered_classes, to_json
from .deformation import Deformation
from .filters import gaussian_smooth, resize, resize_field
from .grid import (
    displacement_from_world,
    displacement_to_grid,
    displacement_to_world,
    grid_to_displacement,
    identity_grid,
    voxel_to_world,
    world_to_voxel,
)
from .jacobian import (
    FoldingReport,
    folding_fraction,
    folding_report,
    inverse_consistency_error,
    jacobian_determinant,
    jacobian_matrix,
    non_diffeomorphic_volume,
    one_sided_jacobian_determinants,
    spatial_gradient,
)
from .protocols import (
    ConditionEncoder,
    Denoiser,
    Integrator,
    NoiseSchedule,
    RegistrationBackend,
    Sampler,
    SimilarityLoss,
    StructureExtractor,
    Warper,
)
from .shapes import NonFiniteError, check_finite, check_shape, spacing_tuple
from .validate import accepts_keyword, check_image, check_int, check_number, check_option, check_values
from .warp import GridSampleWarper, compose, sample_at_points, warp

__all__ = [
    "ConditionEncoder",
    "Config",
    "ConfigError",
    "Configurable",
    "Deformation",
    "Denoiser",
    "FoldingReport",
    "GridSampleWarper",
    "Integrator",
    "NoiseSchedule",
    "NonFiniteError",
    "RegistrationBackend",
    "Sampler",
    "SimilarityLoss",
    "StructureExtractor",
    "Warper",
    "accepts_keyword",
    "check_finite",
    "check_image",
    "check_int",
    "check_number",
    "check_option",
    "check_shape",
    "check_values",
    "compose",
    "displacement_from_world",
    "displacement_to_grid",
    "displacement_to_world",
    "folding_fraction",
    "folding_report",
    "from_json",
    "gaussian_smooth",
    "grid_to_displacement",
    "identity_grid",
    "inverse_consistency_error",
    "jacobian_determinant",
    "jacobian_matrix",
    "non_diffeomorphic_volume",
    "one_sided_jacobian_determinants",
    "register_settings",
    "registered_classes",
    "resize",
    "resize_field",
    "sample_at_points",
    "spacing_tuple",
    "spatial_gradient",
    "to_json",
    "voxel_to_world",
    "warp",
    "world_to_voxel",
]
