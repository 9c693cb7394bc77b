"""Checkpoint IO: official ``model_card.yaml`` + ``model.pt`` in, safetensors native format in and out."""

from .native import FORMAT_VERSION, from_pretrained, save_pretrained
from .official import CheckpointError, load_normalizer, load_official

__all__ = ["FORMAT_VERSION", "CheckpointError", "from_pretrained", "load_normalizer", "load_official", "save_pretrained"]
