"""The paper's MI coherence metric (section 2.4.1): how much a causal LM's log-likelihood of a generated
sentence rises when the LM also reads the ground-truth sentences before it.

    MI(s | c) = (log p_LM(s | c) - log p_LM(s)) / |s|      (nats per token of s; higher = more coherent)

The paper prints the two terms the other way round, but describes MI as unconditional minus conditional
perplexity, and its tables (positive for coherent models, growing with guidance) use this sign. As in the
paper, a newline is prepended to ``s`` so that its first token has a probability, the context is the
previous k = 10 sentences, and a dataset's MI averages sentences weighted by their token counts. The paper
uses GPT-2; any Hugging Face causal LM directory works. It is never downloaded: ``model_dir=`` or
``LCM_FAST_MI_MODEL`` names a local copy.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Sequence

import torch
from torch import Tensor
from tqdm.auto import tqdm

#: a local causal-LM directory (e.g. a download of openai-community/gpt2) turns MI on in ``lcm-fast eval``
MI_MODEL_ENV = "LCM_FAST_MI_MODEL"
#: the paper conditions on the previous k = 10 ground-truth sentences
CONTEXT_SENTENCES = 10


class MutualInformation:
    """Scores sentences against their contexts with a local causal LM (``transformers``).

    ``max_tokens`` defaults to the LM's context window; longer contexts lose their oldest tokens.
    Sequences are left-padded into batches of ``batch_size`` so that only the sentences' logits are
    computed (``logits_to_keep``), never a [batch, length, vocab] tensor over the contexts.
    """

    def __init__(self, model_dir: Optional[str | Path] = None, *, device: str | torch.device = "cpu",
                 batch_size: int = 16, max_tokens: Optional[int] = None) -> None:
        model_dir = model_dir or os.environ.get(MI_MODEL_ENV)
        if not model_dir:
            raise ValueError(f"MI needs a local causal LM: pass model_dir= (lcm-fast eval --mi-model DIR) or set "
                             f"{MI_MODEL_ENV}; the paper uses GPT-2 (e.g. `hf download openai-community/gpt2 "
                             f"--local-dir DIR` on a machine with network access)")
        if not (Path(model_dir) / "config.json").is_file():
            raise FileNotFoundError(f"no causal LM at {model_dir} (expected a Hugging Face model directory with "
                                    f"config.json, weights and tokenizer files, e.g. a download of openai-community/gpt2)")
        try:
            from transformers import AutoModelForCausalLM, AutoTokenizer
        except ImportError:
            raise ImportError("the MI metric needs transformers: pip install 'lcm-fast[mi]'") from None
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True).to(device).eval()
        self.device = torch.device(device)
        self.batch_size = batch_size
        config = self.model.config
        window = getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None)
        self.max_tokens = max_tokens or window or self.tokenizer.model_max_length
        # the newline that gives the sentence's first token a probability; tokenizers that drop whitespace
        # (WordPiece) get the LM's begin-of-sequence token instead
        self.prefix = self._ids("\n") or [t for t in (self.tokenizer.bos_token_id, self.tokenizer.eos_token_id)
                                          if t is not None][:1]
        if not self.prefix:
            raise ValueError(f"the tokenizer of {model_dir} encodes '\\n' to nothing and has no BOS/EOS token")

    def _ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False).input_ids if text else []

    def score(self, sentences: Sequence[str], contexts: Sequence[Sequence[str]]) -> tuple[Tensor, Tensor]:
        """sentences: N strings; contexts: N lists of the sentences before each (only the last
        ``CONTEXT_SENTENCES`` are read). Returns (mi [N] float64 nats per token, tokens [N] int64);
        a sentence with no tokens scores 0 with weight 0."""
        if len(sentences) != len(contexts):
            raise ValueError(f"{len(sentences)} sentences but {len(contexts)} contexts")
        sequences, spans = [], []
        for sentence, context in zip(sentences, contexts):
            target = self._ids(sentence)[: self.max_tokens - len(self.prefix)]
            head = self._ids(" ".join(context[-CONTEXT_SENTENCES:]))
            head = head[max(0, len(head) + len(self.prefix) + len(target) - self.max_tokens):]
            spans.append(len(target))
            sequences += [head + self.prefix + target, self.prefix + target]
        logp = self._target_log_probs(sequences, [n for n in spans for _ in range(2)])
        tokens = torch.tensor(spans, dtype=torch.int64)
        mi = (logp[0::2] - logp[1::2]) / tokens.clamp(min=1)
        return mi, tokens

    @torch.no_grad()
    def _target_log_probs(self, sequences: list[list[int]], targets: list[int]) -> Tensor:
        """Sum of log p over the last ``targets[i]`` tokens of each sequence -> [len(sequences)] float64."""
        out = torch.zeros(len(sequences), dtype=torch.float64)
        order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))  # similar lengths share a batch
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.prefix[0]
        # progress shown on terminals only (tqdm's disable=None)
        for start in tqdm(range(0, len(order), self.batch_size), desc="MI", unit="batch", disable=None, leave=False):
            rows = [i for i in order[start:start + self.batch_size] if targets[i] > 0]
            if not rows:
                continue
            length = max(len(sequences[i]) for i in rows)
            keep = max(targets[i] for i in rows)
            ids = torch.full((len(rows), length), pad, dtype=torch.long)
            mask = torch.zeros((len(rows), length), dtype=torch.long)
            for r, i in enumerate(rows):  # left padding: every row's target ends at the last position
                ids[r, length - len(sequences[i]):] = torch.tensor(sequences[i])
                mask[r, length - len(sequences[i]):] = 1
            positions = (mask.cumsum(-1) - 1).clamp(min=0)
            # logits at position j predict token j + 1: the last `keep` targets need keep + 1 logits
            logits = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                                position_ids=positions.to(self.device), logits_to_keep=keep + 1).logits
            logits = logits[:, :-1].float()  # log p(token) = logit - logsumexp: no [rows, keep, vocab] log-softmax
            next_ids = ids[:, length - keep:, None].to(self.device)
            picked = (logits.gather(-1, next_ids).squeeze(-1) - logits.logsumexp(-1)).double().cpu()
            for r, i in enumerate(rows):
                out[i] = picked[r, keep - targets[i]:].sum()
        return out


def weighted_mean(mi: Tensor, tokens: Tensor) -> float:
    """The dataset MI: sentences weighted by their token counts (0.0 when there are no tokens)."""
    total = tokens.sum().item()
    return (mi * tokens).sum().item() / total if total else 0.0
