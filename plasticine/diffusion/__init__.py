"""Noise schedules, samplers, the noise-prediction loss and the weight average of the diffusion model.

See :mod:`plasticine.diffusion.schedules`, :mod:`plasticine.diffusion.samplers` and
:mod:`plasticine.diffusion.training`.
"""

from .conditioning import ConcatConditioning, LearnedConditioning, structure_condition
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
from .unet import ConditionalUNet, UNetConfig, log_snr, noise_level_embedding

__all__ = [
    "AncestralSampler",
    "ConcatConditioning",
    "ConditionalUNet",
    "CosineSchedule",
    "DDIMSampler",
    "DPMSolverPP",
    "DiscreteSchedule",
    "EMA",
    "LearnedConditioning",
    "LinearSchedule",
    "NoisePredictionLoss",
    "PlanSampler",
    "SampleResult",
    "ScheduleFromBetas",
    "Spacing",
    "UNetConfig",
    "diffuse",
    "log_snr",
    "noise_level_embedding",
    "noise_prediction_loss",
    "posterior_coefficients",
    "sample_noise_level",
    "step_plan",
    "structure_condition",
]
