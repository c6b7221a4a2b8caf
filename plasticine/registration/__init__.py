"""Registration: SVF integrators, the registration network and swappable registration backends.

Backends share :class:`~plasticine.core.RegistrationBackend`: :class:`LearnedRegistration` (the
paper's network plus an integrator), :class:`IterativeRegistration` (per-pair SVF optimisation) and
:class:`~plasticine.registration.ants.AntsRegistration` (ANTs SyN, optional extra ``ants``; its module
imports ANTs only when it registers).
"""

from .ants import AntsRegistration
from .integrators import RK4, Euler, ScalingAndSquaring, auto_squaring_steps, integrate_euler, integrate_rk4, scaling_and_squaring
from .iterative import IterativeConfig, IterativeRegistration
from .network import LearnedRegistration, RegistrationNet, RegistrationNetConfig, RegistrationOutput, registration_objective

__all__ = [
    "RK4",
    "AntsRegistration",
    "Euler",
    "IterativeConfig",
    "IterativeRegistration",
    "LearnedRegistration",
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
