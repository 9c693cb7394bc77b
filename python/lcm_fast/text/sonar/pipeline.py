"""SONAR text -> embedding and embedding -> text from the user's weight files, in lcm_fast's process.

A weights directory holds Meta's files under their names (``sonar_text_encoder.pt``, ``sonar_text_decoder.pt``,
``sentencepiece.source.256000.model``; CC-BY-NC-4.0, never shipped) and, for a model of another shape (the test
fixtures), a ``config.json`` with ``encoder`` / ``decoder`` shapes and the tokenizer's ``langs``.
``LCM_FAST_SONAR_DIR`` names a default directory.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Optional, Sequence

import torch
from torch import Tensor

from .beam_search import Hypothesis, beam_search
from .model import SonarConfig, SonarTextDecoder, SonarTextEncoder, load_sonar_checkpoint
from .tokenizer import PAD, SONAR_LANGS, SonarTokenizer

FILES = {"encoder": "sonar_text_encoder.pt", "decoder": "sonar_text_decoder.pt",
         "tokenizer": "sentencepiece.source.256000.model"}
HELP = ("SONAR's text weights (CC-BY-NC-4.0) are not shipped: download sonar_text_encoder.pt, "
        "sonar_text_decoder.pt and sentencepiece.source.256000.model from Meta's SONAR release into one directory "
        "and pass it (--sonar-weights DIR, weights_dir=DIR or LCM_FAST_SONAR_DIR)")


def _weights_dir(weights_dir: Optional[str | Path], kind: str) -> tuple[Path, dict]:
    """The directory holding ``kind``'s checkpoint and the tokenizer, and its config.json (or {})."""
    weights_dir = weights_dir or os.environ.get("LCM_FAST_SONAR_DIR")
    if weights_dir is None:
        raise FileNotFoundError(f"no SONAR weights directory given. {HELP}")
    weights_dir = Path(weights_dir)
    missing = [FILES[k] for k in (kind, "tokenizer") if not (weights_dir / FILES[k]).is_file()]
    if missing:
        raise FileNotFoundError(f"{weights_dir} lacks {missing}. {HELP}")
    config = weights_dir / "config.json"
    return weights_dir, json.loads(config.read_text()) if config.is_file() else {}


def _load(weights_dir, kind: str, device, dtype):
    weights_dir, config = _weights_dir(weights_dir, kind)
    langs = config.get("langs", SONAR_LANGS)
    tokenizer = SonarTokenizer(weights_dir / FILES["tokenizer"], langs, config.get("default_lang", "eng_Latn"))
    shape = SonarConfig.from_dict(config[kind], tokenizer.vocab_size) if kind in config else None
    device = torch.device(device)
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = load_sonar_checkpoint(weights_dir / FILES[kind], kind, shape, device, dtype)
    if model.config.vocab_size != tokenizer.vocab_size:
        raise ValueError(f"{weights_dir / FILES[kind]} has {model.config.vocab_size} token embeddings, the tokenizer "
                         f"{tokenizer.vocab_size} tokens ({len(langs)} languages): files of two different models")
    return model, tokenizer


class SonarEncoder:
    """SONAR text encoder: sentences -> float32 [N, model_dim] (1024-d) embeddings, as sonar-space's
    ``TextToEmbeddingModelPipeline``. ``source_lang``: an NLLB code such as ``eng_Latn``. dtype: bf16 on CUDA,
    fp32 elsewhere, unless given."""

    name = "sonar"

    def __init__(self, device: str | torch.device = "cpu", weights_dir: Optional[str | Path] = None,
                 source_lang: str = "eng_Latn", dtype: Optional[torch.dtype] = None) -> None:
        self.model: SonarTextEncoder
        self.model, self.tokenizer = _load(weights_dir, "encoder", device, dtype)
        self.tokenizer.lang_id(source_lang)  # an unknown language fails here, not at the first batch
        self.source_lang, self.dim = source_lang, self.model.config.model_dim

    @torch.inference_mode()
    def encode(self, sentences: Sequence[str], *, batch_size: int = 32, progress: bool = False,
               source_lang: Optional[str] = None) -> Tensor:
        """float32 [N, dim] on the CPU. Sentences over the model's positions are truncated (with a warning), as
        sonar-space does; an empty sentence encodes its language tag and end token, as sonar-space does."""
        if isinstance(sentences, str):
            raise TypeError("encode takes a list of sentences, not one string (segment the text first)")
        for i, s in enumerate(sentences):
            if not isinstance(s, str):
                raise TypeError(f"sentence {i} is a {type(s).__name__}, not a str")
        lang = source_lang or self.source_lang
        limit = self.model.max_tokens
        tokens = [self.tokenizer.encode(s, lang) for s in sentences]
        truncated = sum(t.numel() > limit for t in tokens)
        if truncated:
            warnings.warn(f"{truncated} sentence(s) exceed SONAR's {limit} tokens and were truncated", stacklevel=2)
        tokens = [t[:limit] for t in tokens]
        order = sorted(range(len(tokens)), key=lambda i: tokens[i].numel())  # batches of similar lengths
        out = torch.empty(len(tokens), self.dim)
        device = self.model.layer_norm.weight.device
        from tqdm.auto import tqdm

        for start in tqdm(range(0, len(order), batch_size), disable=not progress, desc="SONAR encode", unit="batch"):
            index = order[start : start + batch_size]
            lengths = torch.tensor([tokens[i].numel() for i in index])
            ids = torch.full((len(index), int(lengths.max())), PAD, dtype=torch.int64)
            for row, i in enumerate(index):
                ids[row, : lengths[row]] = tokens[i]
            out[index] = self.model(ids.to(device), lengths.to(device)).float().cpu()
        return out


class SonarDecoder:
    """SONAR text decoder: float [N, model_dim] embeddings -> texts, as sonar-space's
    ``EmbeddingToTextModelPipeline``: beam search of ``beam_size`` (5; 1 is greedy) with fairseq2's rules
    (:func:`lcm_fast.text.sonar.beam_search`). ``target_lang``: an NLLB code."""

    def __init__(self, device: str | torch.device = "cpu", weights_dir: Optional[str | Path] = None,
                 target_lang: str = "eng_Latn", dtype: Optional[torch.dtype] = None, beam_size: int = 5) -> None:
        self.model: SonarTextDecoder
        self.model, self.tokenizer = _load(weights_dir, "decoder", device, dtype)
        self.tokenizer.lang_id(target_lang)
        self.target_lang, self.beam_size, self.dim = target_lang, beam_size, self.model.config.model_dim

    def generate(self, embeddings: Tensor, *, target_lang: Optional[str] = None, batch_size: int = 16,
                 progress: bool = False, **options) -> list[list[Hypothesis]]:
        """Per embedding its hypotheses, best first. ``options``: :func:`beam_search`'s (beam_size,
        min_gen_len, max_gen_len, max_seq_len, len_penalty, unk_penalty, normalize_scores)."""
        embeddings = torch.as_tensor(embeddings)
        if embeddings.ndim != 2 or embeddings.shape[1] != self.dim:
            raise ValueError(f"SONAR's decoder takes [N, {self.dim}] embeddings, got {tuple(embeddings.shape)}")
        options.setdefault("beam_size", self.beam_size)
        prefix = self.tokenizer.target_prefix(target_lang or self.target_lang)
        from tqdm.auto import tqdm

        out: list[list[Hypothesis]] = []
        for start in tqdm(range(0, len(embeddings), batch_size), disable=not progress, desc="SONAR decode", unit="batch"):
            out += beam_search(self.model, embeddings[start : start + batch_size], prefix, **options)
        return out

    def decode(self, embeddings: Tensor, **options) -> list[str]:
        """Texts of embeddings [N, dim]: each one's best hypothesis (options: :meth:`generate`'s)."""
        return [self.tokenizer.decode(hypotheses[0].tokens) for hypotheses in self.generate(embeddings, **options)]
