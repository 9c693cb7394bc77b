"""Noise schedules, the DDIM scheduler and classifier-free guidance."""

from .guidance import classifier_free_guidance
from .schedule import DDIMScheduler, SchedulerOutput, make_betas

__all__ = ["DDIMScheduler", "SchedulerOutput", "classifier_free_guidance", "make_betas"]
