"""Text in, text out: segment a prompt, encode it, continue it with an LCM, decode the new concepts."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import torch
from torch import Tensor

from ..inference import GenerationOptions, generate
from ..inference.planning import PLAN, ROLE_NAMES, SENTENCE
from .encoders import Decoder, Encoder
from .segment import segment

#: the shipped demo: a small Two-Tower trained on the offline corpus, lcm_fast.text.corpus (scripts/make_demo.py)
DEMO_DIR = Path(__file__).resolve().parents[1] / "data" / "demo"


def continue_text(text: str, model, encoder: Encoder, decoder: Decoder, *, n_sentences: int = 3,
                  options: Optional[GenerationOptions] = None, engine: str = "fast",
                  weights: Optional[str] = None, break_vec: Optional[Tensor] = None) -> dict[str, Any]:
    """``{"prompt": [sentences], "sentences": [{"text", "similarity"}, ...]}``: the prompt's sentences
    and ``n_sentences`` generated concepts, decoded; ``similarity`` is the decoder's cosine to its bank
    sentence (None for decoders without one, e.g. SONAR). weights: the decode step's weight format
    (:class:`~lcm_fast.Generator`). break_vec: an LPCM's break concept: its breaks and plans are left out of
    ``sentences``; ``"roles"`` names every generated concept's role and ``"plans"`` holds the decoded plans."""
    sentences = segment(text)
    if not sentences:
        raise ValueError("the prompt has no sentences (empty text)")
    for name, dim in (("encoder", encoder.dim), ("decoder", decoder.dim)):
        if dim != model.sonar_dim:
            raise ValueError(f"the model works on {model.sonar_dim}-d embeddings but the {name} on {dim}-d ones: "
                             "use the encoder and sentence bank the model was trained with")
    if len(sentences) + n_sentences > model.config.max_seq_len:
        raise ValueError(f"{len(sentences)} prompt + {n_sentences} new sentences exceed the model's "
                         f"max_seq_len={model.config.max_seq_len}")
    options = options or GenerationOptions.recommended(seed=0)
    out = generate(model, encoder.encode(sentences)[None], max_gen_len=n_sentences, options=options, engine=engine,
                   weights=weights, break_vec=break_vec)
    new = out.sequences[0][len(sentences):].float()
    roles = out.roles[0][len(sentences):] if out.roles is not None else torch.zeros(len(new), dtype=torch.int8)
    decode = decoder.decode_with_scores if hasattr(decoder, "decode_with_scores") else (
        lambda x: [(t, None) for t in decoder.decode(x)])
    result: dict[str, Any] = {"prompt": sentences,
                              "sentences": [{"text": t, "similarity": s} for t, s in decode(new[roles == SENTENCE])]}
    if out.roles is not None:
        result["roles"] = [ROLE_NAMES[int(r)] for r in roles]
        result["plans"] = [t for t, _ in decode(new[roles == PLAN])] if (roles == PLAN).any() else []
    return result
