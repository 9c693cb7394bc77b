"""Evaluation (paper section 2.4): teacher-forced next-concept predictions, the embedding-space
metrics l2, contrastive accuracy (CA) and paraphrasing (PAR), and the text metrics of generations."""

from .metrics import contrastive_accuracy, l2_distance, paraphrasing, prediction_metrics
from .scorer import teacher_forced_predictions
from .text_metrics import ovl3, rep4, rouge_l, text_metrics, word_count_ratio

__all__ = [
    "contrastive_accuracy", "l2_distance", "ovl3", "paraphrasing", "prediction_metrics", "rep4", "rouge_l",
    "teacher_forced_predictions", "text_metrics", "word_count_ratio",
]
