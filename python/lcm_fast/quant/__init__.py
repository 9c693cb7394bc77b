"""Residual vector quantization of concept embeddings (paper section 2.3.5): codebooks, their
training (PyTorch or faiss) and the fused encode/decode ops behind them."""

from .kmeans import kmeans, prefix_errors, train_residual_kmeans
from .rvq import ResidualQuantizer

__all__ = ["ResidualQuantizer", "kmeans", "prefix_errors", "train_residual_kmeans"]
