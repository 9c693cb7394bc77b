"""``model.save_pretrained(dir)`` for every LCM family (the format lives in ``lcm_fast.io.native``)."""

from __future__ import annotations

from pathlib import Path


class SavePretrainedMixin:
    def save_pretrained(self, directory: str | Path) -> Path:
        """Writes ``config.json`` + ``model.safetensors``; read back with ``lcm_fast.from_pretrained``."""
        from ..io.native import save_pretrained  # io depends on models, not the reverse

        return save_pretrained(self, directory)  # type: ignore[arg-type]
