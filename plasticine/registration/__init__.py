"""Registration: SVF integrators, the registration network and swappable registration backends.

Backends share :class:`~plasticine.core.RegistrationBackend`: :class:`LearnedRegistration` (the
paper's network plus an integrator; :class:`PatchwiseRegistration` runs it on overlapping patches of
a large volume), :class:`IterativeRegistration` (per-pair SVF optimisation by an
optimiser strategy: :class:`GradientDescent`, :class:`Adam`, :class:`LBFGS`) and
:class:`~plasticine.registration.ants.AntsRegistration` (ANTs SyN, optional extra ``ants``; its module
imports ANTs only when it registers) and :class:`IdentityRegistration` (phi = identity, the baseline
without a deformation); :class:`PopulationRegistration` holds one deformation for every image, the
registration of the source template to the target template (a systematic change learned from
unpaired sets).
"""

from .ants import AntsRegistration
from .identity import IdentityRegistration
from .integrators import RK4, Euler, ScalingAndSquaring, auto_squaring_steps, integrate_euler, integrate_rk4, scaling_and_squaring
from .iterative import IterativeConfig, IterativeRegistration
from .network import LearnedRegistration, PatchwiseRegistration, RegistrationNet, RegistrationNetConfig, RegistrationOutput, registration_objective
from .optimizers import LBFGS, Adam, GradientDescent, OptimizerStrategy
from .population import PopulationRegistration

__all__ = [
    "LBFGS",
    "RK4",
    "Adam",
    "AntsRegistration",
    "Euler",
    "GradientDescent",
    "IdentityRegistration",
    "IterativeConfig",
    "IterativeRegistration",
    "LearnedRegistration",
    "OptimizerStrategy",
    "PatchwiseRegistration",
    "PopulationRegistration",
    "RegistrationNet",
    "RegistrationNetConfig",
    "RegistrationOutput",
    "ScalingAndSquaring",
    "auto_squaring_steps",
    "integrate_euler",
    "integrate_rk4",
    "registration_objective",
    "scaling_and_squaring",
]
