"""Noise schedules, samplers, the noise-prediction loss and the weight average of the diffusion model.

See :mod:`plasticine.diffusion.schedules`, :mod:`plasticine.diffusion.samplers`, :mod:`plasticine.diffusion.prediction`,
:mod:`plasticine.diffusion.training`, :mod:`plasticine.diffusion.ddib` (the DDIB translation baseline) and
:mod:`plasticine.diffusion.patchwise` (a denoiser run on overlapping patches of large volumes).
"""

from .conditioning import ConcatConditioning, LearnedConditioning, structure_condition
from .ddib import DDIBTranslator
from .patchwise import PatchwiseDenoiser
from .prediction import Prediction, min_snr_weight, prediction_target, split_prediction, threshold_x0
from .samplers import AncestralSampler, DDIMSampler, DPMSolverPP, PlanSampler, SampleResult, Spacing, ddim_encode, step_plan
from .schedules import CosineSchedule, DiscreteSchedule, LinearSchedule, ScheduleFromBetas, noise_like
from .training import EMA, NoisePredictionLoss, noise_prediction_loss
from .unet import ConditionalUNet, UNetConfig, log_snr, noise_level_embedding

__all__ = [
    "AncestralSampler",
    "ConcatConditioning",
    "ConditionalUNet",
    "CosineSchedule",
    "DDIBTranslator",
    "DDIMSampler",
    "DPMSolverPP",
    "DiscreteSchedule",
    "EMA",
    "LearnedConditioning",
    "LinearSchedule",
    "NoisePredictionLoss",
    "PatchwiseDenoiser",
    "PlanSampler",
    "Prediction",
    "SampleResult",
    "ScheduleFromBetas",
    "Spacing",
    "UNetConfig",
    "ddim_encode",
    "log_snr",
    "min_snr_weight",
    "noise_level_embedding",
    "noise_like",
    "noise_prediction_loss",
    "prediction_target",
    "split_prediction",
    "step_plan",
    "structure_condition",
    "threshold_x0",
]
