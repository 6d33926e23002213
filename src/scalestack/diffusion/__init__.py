"""Diffusion inference: a flow-matching sampler and step caches around a transformer's block stack
(none, fixed interval, TeaCache, MagCache and SenCache), for our DiT and diffusers transformers."""

from .calibration import Calibration, calibrate, calibrate_diffusers
from .flow import evaluations, flow_matching_loss, sample, timesteps
from .magcache import MagCache
from .metrics import DigitClassifier, frechet_distance, psnr, ssim, train_digit_classifier
from .sencache import SenCache
from .stack import CachedStack, CacheStats, apply_step_cache, apply_step_cache_diffusers, reset_step_cache
from .step_cache import FixedInterval, NoCache, StepCache, StepSignals
from .teacache import TeaCache

__all__ = [
    "CacheStats", "CachedStack", "Calibration", "DigitClassifier", "FixedInterval", "MagCache", "NoCache", "SenCache",
    "StepCache", "StepSignals", "TeaCache", "apply_step_cache", "apply_step_cache_diffusers", "calibrate",
    "calibrate_diffusers", "evaluations", "flow_matching_loss", "frechet_distance", "psnr", "reset_step_cache",
    "sample", "ssim", "timesteps", "train_digit_classifier",
]  # fmt: skip
