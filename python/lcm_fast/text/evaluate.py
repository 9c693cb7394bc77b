"""``lcm-fast eval``: the paper's pre-training metrics on held-out documents, and generation metrics.

Teacher-forced (every position predicted from the true sentences before it): l2, contrastive accuracy
(CA), paraphrasing (PAR), and with an encoder and a decoder the round-trip l2
``|encode(decode(x_hat)) - x|`` (section 2.4.1), and with a local causal LM the mutual information (MI)
between each decoded prediction and the true sentences before it (documents that carry their
``sentences``; ``mutual_information.py``). Generation (documents that carry their ``sentences``):
the first ``prompt_sentences`` sentences are the prompt, the model generates the next
``generate_sentences`` with the fast engine, the decoder turns them into text, scored against the true
continuation with ROUGE-L, OVL-3 (against the prompt), REP-4 and the word-count ratio, plus the
decoder's mean similarity.
"""

from __future__ import annotations

import itertools
from typing import Optional, Sequence

import pyarrow.parquet as pq
import torch

from ..evaluation import prediction_metrics, teacher_forced_predictions, text_metrics
from ..inference import GenerationOptions, generate
from ..training import DataConfig, batches
from .encoders import Decoder, Encoder
from .mutual_information import MutualInformation, weighted_mean
from .retrieval import warn_on_leak


def prepared_documents(files: Sequence[str]):
    """(sentences, embeddings) of every document that carries its text (``lcm-fast prepare`` output)."""
    for path in files:
        table = pq.read_table(path)
        if "sentences" in table.column_names:
            yield from zip(table.column("sentences").to_pylist(), table.column("embeddings").to_pylist())


def _mutual_information(model, files: Sequence[str], decoder: Decoder, scorer: MutualInformation,
                        max_docs: int) -> float:
    """Token-weighted MI of the decoded teacher-forced prediction of every sentence after the first."""
    sentences, contexts, docs = [], [], 0
    for doc, vectors in prepared_documents(files):
        if docs >= max_docs:
            break
        n = min(len(doc), model.config.max_seq_len)
        if n < 2:
            continue
        x = torch.tensor(vectors[:n], dtype=torch.float32)[None]
        sentences += decoder.decode(teacher_forced_predictions(model, x, torch.tensor([n]))[0, 1:].cpu().float())
        contexts += [doc[:i] for i in range(1, n)]
        docs += 1
    return weighted_mean(*scorer.score(sentences, contexts))


def _mean(rows: list[dict[str, float]]) -> dict[str, float]:
    return {k: sum(r[k] for r in rows) / len(rows) for k in rows[0]} if rows else {}


@torch.no_grad()
def evaluate(model, files: Sequence[str], *, encoder: Optional[Encoder] = None, decoder: Optional[Decoder] = None,
             max_docs: int = 64, prompt_sentences: int = 3, generate_sentences: int = 3,
             options: Optional[GenerationOptions] = None,
             mutual_information: Optional[MutualInformation] = None) -> dict[str, dict[str, float]]:
    """{"teacher_forced": {...}, "generation": {...}} over at most ``max_docs`` documents of ``files``, and with a
    decoder {"decoder": {"bank_overlap": ...}}: the share of the evaluated sentences that a sentence bank holds
    (warned about when > 0: those metrics leak). ``decoder``: a sentence bank or a generating decoder (SONAR).

    ``teacher_forced["mi"]`` is computed when ``mutual_information`` is given (it needs ``decoder``);
    ``generate_sentences=0`` skips the generation section (the pre-training metrics only)."""
    if mutual_information is not None and decoder is None:
        raise ValueError("the MI metric scores decoded sentences: pass a decoder (a sentence bank) as well")
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
        if batch.roles is not None:  # an LPCM's data: its break and plan concepts are not sentences to score
            scored &= batch.roles == 0
        if not scored.any():
            continue
        row = prediction_metrics(pred.cpu().float(), batch.embeddings.float(), scored, valid)
        if encoder is not None and decoder is not None:
            target = batch.embeddings.float()[scored]
            round_trip = encoder.encode(decoder.decode(pred.cpu().float()[scored]))
            row["l2_r"] = (round_trip - target).norm(dim=-1).mean().item()
        tf_rows.append(row)
        seen += batch.embeddings.shape[0]
    if not tf_rows:
        raise ValueError(f"no document of {', '.join(map(str, files))} has two sentences or more: nothing to score")
    result = {"teacher_forced": _mean(tf_rows), "generation": {}}
    if decoder is None:
        return result
    evaluated = [s for doc, _ in itertools.islice(prepared_documents(files), max_docs) for s in doc]
    result["decoder"] = {"bank_overlap": warn_on_leak(decoder, evaluated, "evaluate")}
    if mutual_information is not None:
        result["teacher_forced"]["mi"] = _mutual_information(model, files, decoder, mutual_information, max_docs)
    if generate_sentences == 0:
        return result
    options = options or GenerationOptions.paper(model, seed=0)
    gen_rows, docs = [], 0
    for sentences, vectors in prepared_documents(files):
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
    if not gen_rows:
        raise ValueError(f"no document has more than {prompt_sentences} sentences (the prompt and one to compare "
                         "with): lower the prompt sentences (--prompt-sentences)")
    result["generation"] = _mean(gen_rows)
    return result
