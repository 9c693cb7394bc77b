"""Training: parquet embedding data, the variants' losses, and a resumable trainer."""

from .data import Batch, DataConfig, DataError, batches, read_documents, write_documents
from .losses import LOSSES
from .trainer import TrainConfig, Trainer

__all__ = ["LOSSES", "Batch", "DataConfig", "DataError", "TrainConfig", "Trainer", "batches", "read_documents",
           "write_documents"]
