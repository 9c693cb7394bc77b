"""Pre-training evaluation (paper section 2.4.1): teacher-forced next-concept predictions and the
embedding-space metrics l2, contrastive accuracy (CA) and paraphrasing (PAR)."""

from .metrics import contrastive_accuracy, l2_distance, paraphrasing, prediction_metrics
from .scorer import teacher_forced_predictions

__all__ = ["contrastive_accuracy", "l2_distance", "paraphrasing", "prediction_metrics", "teacher_forced_predictions"]
