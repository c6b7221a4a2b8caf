"""Noise schedules, samplers, the noise-prediction loss and the weight average of the diffusion model.

See :mod:`plasticine.diffusion.schedules`, :mod:`plasticine.diffusion.samplers` and
:mod:`plasticine.diffusion.training`.
"""

from .samplers import AncestralSampler, DDIMSampler, DPMSolverPP, PlanSampler, SampleResult, Spacing, step_plan
from .schedules import (
    CosineSchedule,
    DiscreteSchedule,
    LinearSchedule,
    ScheduleFromBetas,
    diffuse,
    posterior_coefficients,
    sample_noise_level,
)
from .training import EMA, NoisePredictionLoss, noise_prediction_loss

__all__ = [
    "AncestralSampler",
    "CosineSchedule",
    "DDIMSampler",
    "DPMSolverPP",
    "DiscreteSchedule",
    "EMA",
    "LinearSchedule",
    "NoisePredictionLoss",
    "PlanSampler",
    "SampleResult",
    "ScheduleFromBetas",
    "Spacing",
    "diffuse",
    "noise_prediction_loss",
    "posterior_coefficients",
    "sample_noise_level",
    "step_plan",
]
