"""Beam search over SONAR's decoder with fairseq2's ``BeamSearchSeq2SeqGenerator`` semantics, batched.

What sonar-space's ``EmbeddingToTextModelPipeline`` runs, step for step, so that the token ids are the same:

- the prompt ``[</s>, __lang__]`` is decoded one token at a time; the log-probability of the language token
  counts in every hypothesis' score;
- each step: log-softmax in fp32; PAD is never chosen, UNK is penalised by ``unk_penalty``, EOS is banned
  before ``min_gen_len`` tokens and forced at the last position; the 2 x beam best (row, token) pairs of a
  sentence's flattened beam are ranked; EOS among the first ``beam_size`` of them finishes a hypothesis (in
  rank order), and the sentence is done when it has ``beam_size`` hypotheses; the first ``beam_size`` non-EOS
  pairs continue;
- a finished hypothesis scores its cumulative log-probability / (position ** len_penalty), where position
  counts the prompt too (fairseq2's ``seq_len - 1``); hypotheses are ranked by score (stable).
- the generation budget is ``max_gen_len = (a, b)``: ``int(a * source_len + b)`` tokens where fairseq2's
  source length of a batch of sentence vectors [N, dim] is ``dim`` (its layout of a 2-D tensor); total length
  is capped by the decoder's ``max_seq_len``. ``beam_size=1`` is sonar-space's greedy decoding.

All sentences step together (a [N, beam] batch through one decoder call); a finished sentence leaves the batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .model import SonarTextDecoder
from .tokenizer import EOS, PAD, UNK


@dataclass
class Hypothesis:
    """One finished sequence: ``tokens`` int64 [T] (generated tokens, EOS last) and its normalised ``score``."""

    tokens: Tensor
    score: float


@torch.inference_mode()
def beam_search(
    decoder: SonarTextDecoder,
    sentences: Tensor,
    prefix: Tensor,
    *,
    beam_size: int = 5,
    min_gen_len: int = 1,
    max_gen_len: tuple[float, int] = (1.0, 128),
    max_seq_len: int | None = None,
    len_penalty: float = 1.0,
    unk_penalty: float = 0.0,
    normalize_scores: bool = True,
) -> list[list[Hypothesis]]:
    """sentences: [N, dim] embeddings; prefix: int64 [P] prompt (``SonarTokenizer.target_prefix``) ->
    per sentence its ``beam_size`` hypotheses, best first."""
    if sentences.ndim != 2 or sentences.shape[1] != decoder.config.model_dim:
        raise ValueError(f"the decoder takes [N, {decoder.config.model_dim}] sentence embeddings, got {tuple(sentences.shape)}")
    if beam_size < 1 or min_gen_len < 1:
        raise ValueError(f"beam_size and min_gen_len must be >= 1, got {beam_size} and {min_gen_len}")
    if not torch.isfinite(sentences).all():
        bad = (~torch.isfinite(sentences)).any(1).nonzero()[:, 0].tolist()
        raise ValueError(f"sentence embeddings {bad[:5]} hold NaN or infinite values")
    N, B, V = sentences.shape[0], beam_size, decoder.config.vocab_size
    device = decoder.decoder_frontend.embed.weight.device
    P = prefix.numel()
    a, b = max_gen_len
    gen_len = int(a * sentences.shape[1] + b)
    if gen_len < 1 or min_gen_len > gen_len:
        raise ValueError(f"max_gen_len {max_gen_len} allows {gen_len} tokens, fewer than min_gen_len={min_gen_len}")
    limit = min(max_seq_len or decoder.config.max_seq_len, decoder.config.max_seq_len)
    if P >= limit:
        raise ValueError(f"the prompt of {P} tokens leaves no room under max_seq_len={limit}")
    seq_len = min(limit, P + gen_len)
    min_len = min(limit, P + min_gen_len)
    output: list[list[Hypothesis]] = [[] for _ in range(N)]
    if N == 0:
        return output

    # every sentence starts with B rows, all but the first out of the running (score -inf) until step one fans out
    cross = decoder.condition(sentences.to(device)).repeat_interleave(B, dim=1)  # [L, N*B, dim]
    cache = decoder.new_cache(N * B)
    seqs = prefix.to(device).repeat(N * B, 1)  # [rows, P] tokens so far
    first = torch.full((N, B), -torch.inf, device=device)
    first[:, 0] = 0.0
    for position in range(P - 1):  # the prompt: its tokens' log-probabilities count in the score
        lprobs = decoder.step(seqs[:, position], position, cross, cache).float().log_softmax(-1)
        first += lprobs.gather(1, seqs[:, position + 1 : position + 2]).view(N, B)
    scores = first  # [n, B] cumulative log-probability of each row
    active = torch.arange(N, device=device)  # sentence of each block of B rows
    for step in range(P, seq_len):
        n = active.numel()
        lprobs = decoder.step(seqs[:, -1], step - 1, cross, cache).float().log_softmax(-1)  # [n*B, V]
        if step == seq_len - 1:  # the last position: EOS only
            eos = lprobs[:, EOS].clone()
            lprobs.fill_(-torch.inf)
            lprobs[:, EOS] = eos
        else:
            lprobs[:, UNK] -= unk_penalty
            lprobs[:, PAD] = -torch.inf
            if step < min_len - 1:
                lprobs[:, EOS] = -torch.inf
        candidates = (lprobs.view(n, B, V) + scores[:, :, None]).view(n, B * V)
        top, index = candidates.topk(min(2 * B, B * V), dim=1)  # [n, 2B]
        row, token = index // V, index % V
        is_eos = token == EOS
        done = torch.zeros(n, dtype=torch.bool)
        if is_eos[:, :B].any():
            for i, k in is_eos[:, :B].nonzero().tolist():  # rank order within each sentence
                if done[i]:
                    continue
                hypotheses = output[int(active[i])]
                r = i * B + int(row[i, k])
                score = top[i, k] / (step ** len_penalty) if normalize_scores else top[i, k]
                tokens = torch.cat((seqs[r, P:], seqs.new_tensor([EOS])))
                hypotheses.append(Hypothesis(tokens.cpu(), float(score)))
                done[i] = len(hypotheses) == B
        # the first B non-EOS candidates continue (a stable sort puts them first, in rank order)
        keep = torch.argsort(is_eos.to(torch.int8), dim=1, stable=True)[:, :B]
        scores, row, token = top.gather(1, keep), row.gather(1, keep), token.gather(1, keep)
        if done.all():
            break
        if done.any():
            alive = (~done).nonzero()[:, 0].to(device)
            active, scores, row, token = active[alive], scores[alive], row[alive], token[alive]
            base = alive
        else:
            base = torch.arange(n, device=device)
        if B == 1 and not done.any():  # greedy with every sentence still running: nothing moves
            seqs = torch.cat((seqs, token), dim=1)
            continue
        rows = (base[:, None] * B + row).flatten()  # [n'*B] parent rows
        seqs = torch.cat((seqs.index_select(0, rows), token.flatten()[:, None]), dim=1)
        cross = cross.index_select(1, rows)
        cache.reorder(rows)
    for hypotheses in output:
        hypotheses.sort(key=lambda h: h.score, reverse=True)
    return output
