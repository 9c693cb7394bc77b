"""Noise schedules, the DDIM scheduler and classifier-free guidance."""

from .guidance import classifier_free_guidance
from .schedule import NOISE_SCHEDULES, DDIMScheduler, SchedulerOutput, make_betas, named_schedule

__all__ = ["NOISE_SCHEDULES", "DDIMScheduler", "SchedulerOutput", "classifier_free_guidance", "make_betas", "named_schedule"]
