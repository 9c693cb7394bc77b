"""Noise schedules, the DDIM scheduler, classifier-free guidance and the guided DDIM chain."""

from .guidance import classifier_free_guidance
from .sampling import GuidedDDIM
from .schedule import NOISE_SCHEDULES, DDIMScheduler, SchedulerOutput, make_betas, named_schedule

__all__ = ["NOISE_SCHEDULES", "DDIMScheduler", "GuidedDDIM", "SchedulerOutput", "classifier_free_guidance", "make_betas",
           "named_schedule"]
