"""``lcm-fast eval``: the paper's pre-training metrics on held-out documents, and generation metrics.

Teacher-forced (every position predicted from the true sentences before it): l2, contrastive accuracy
(CA), paraphrasing (PAR), and with an encoder and a decoder the round-trip l2
``|encode(decode(x_hat)) - x|`` (section 2.4.1). Generation (documents that carry their ``sentences``):
the first ``prompt_sentences`` sentences are the prompt, the model generates the next
``generate_sentences`` with the fast engine, the decoder turns them into text, scored against the true
continuation with ROUGE-L, OVL-3 (against the prompt), REP-4 and the word-count ratio, plus the
decoder's mean similarity.
"""

from __future__ import annotations

from typing import Optional, Sequence

import pyarrow.parquet as pq
import torch

from ..evaluation import prediction_metrics, teacher_forced_predictions, text_metrics
from ..inference import GenerationOptions, generate
from ..training import DataConfig, batches
from .encoders import Decoder, Encoder


def _mean(rows: list[dict[str, float]]) -> dict[str, float]:
    return {k: sum(r[k] for r in rows) / len(rows) for k in rows[0]} if rows else {}


@torch.no_grad()
def evaluate(model, files: Sequence[str], *, encoder: Optional[Encoder] = None, decoder: Optional[Decoder] = None,
             max_docs: int = 64, prompt_sentences: int = 3, generate_sentences: int = 3,
             options: Optional[GenerationOptions] = None) -> dict[str, dict[str, float]]:
    """{"teacher_forced": {...}, "generation": {...}} over at most ``max_docs`` documents of ``files``."""
    data = DataConfig(files=list(files), dim=model.sonar_dim, max_concepts=max(64, model.config.max_seq_len),
                      max_sentences=model.config.max_seq_len, shuffle_buffer=1)
    tf_rows, seen = [], 0
    for batch in batches(data):
        if seen >= max_docs:
            break
        pred = teacher_forced_predictions(model, batch.embeddings, batch.seq_lens)
        valid = torch.arange(batch.embeddings.shape[1])[None, :] < batch.seq_lens[:, None]
        scored = valid.clone()
        scored[:, 0] = False
        if not scored.any():
            continue
        row = prediction_metrics(pred.cpu().float(), batch.embeddings.float(), scored, valid)
        if encoder is not None and decoder is not None:
            target = batch.embeddings.float()[scored]
            round_trip = encoder.encode(decoder.decode(pred.cpu().float()[scored]))
            row["l2_r"] = (round_trip - target).norm(dim=-1).mean().item()
        tf_rows.append(row)
        seen += batch.embeddings.shape[0]
    result = {"teacher_forced": _mean(tf_rows), "generation": {}}
    if decoder is None:
        return result
    options = options or GenerationOptions.recommended(seed=0)
    gen_rows, docs = [], 0
    for path in files:
        table = pq.read_table(path)
        if "sentences" not in table.column_names:
            continue
        for sentences, vectors in zip(table.column("sentences").to_pylist(), table.column("embeddings").to_pylist()):
            if docs >= max_docs:
                break
            if len(sentences) < prompt_sentences + 1:
                continue
            prompt = torch.tensor(vectors[:prompt_sentences], dtype=torch.float32)[None]
            out = generate(model, prompt, max_gen_len=generate_sentences, options=options)
            new = out.sequences[0][prompt_sentences:].float()
            texts = decoder.decode(new)
            reference = " ".join(sentences[prompt_sentences:prompt_sentences + generate_sentences])
            row = text_metrics(" ".join(texts), reference, " ".join(sentences[:prompt_sentences]))
            if hasattr(decoder, "decode_with_scores"):
                row["similarity"] = sum(s for _, s in decoder.decode_with_scores(new)) / len(texts)
            gen_rows.append(row)
            docs += 1
    result["generation"] = _mean(gen_rows)
    return result
