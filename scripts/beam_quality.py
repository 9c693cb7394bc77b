"""Beam search over sampled concepts vs sampling one, on the shipped demo model's held-out documents (issue 26).

The demo (a Two-Tower trained on ``lcm_fast.text.corpus``, MiniLM space) continues the held-out documents (about 1
in 20, never trained on) with the paper's sampling (40 steps, w 3, rescale 0.7, initial noise 0.6, epsilon scaling
1.00045) under each search setting, over several seeds:

- **next sentence**: every prefix of up to ``--max-prefix`` sentences of a document predicts the next one (one
  sentence generated); l2 and CA against the true next sentence (paper section 2.4.1; CA over the batch's sentences).
- **continuation**: the first 3 sentences of a document continued by ``--sentences`` concepts; l2 to the true
  sentence at the same position, the coherence proxy of the LPCM ablation (local: cosine of consecutive generated
  sentences; topic: cosine to the prompt's mean), ROUGE-L of the decoded text (demo bank) against the true
  continuation, and the mean denoising-consistency score of the output (what the search maximises).

Each metric is reported with its paired difference to sampling one (the same prefixes, documents and seeds) and that
difference's standard error. Usage: ``python scripts/beam_quality.py [--seeds 3] [--json out.json]`` (about 15
minutes on 2 CPU cores).
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F

import lcm_fast
from lcm_fast.evaluation import contrastive_accuracy, rouge_l
from lcm_fast.inference.beam import Candidates, DenoisingConsistency
from lcm_fast.text import RetrievalDecoder, load_encoder
from lcm_fast.text.corpus import load_corpus
from lcm_fast.text.pipeline import DEMO_DIR
from lcm_fast.text.segment import segment

PROMPT = 3
#: (name, num_candidates, beam_size)
SETTINGS = (("sample one", 1, 1), ("best of 4", 4, 1), ("beam 4 x 2", 4, 2), ("best of 8", 8, 1))


def held_out(encoder, max_docs: int) -> list[tuple[list[str], torch.Tensor]]:
    """(sentences, embeddings [n, D]) of the held-out documents with more than PROMPT + 1 sentences."""
    docs = []
    for doc in load_corpus():
        sentences = segment(doc.text) if doc.held_out else []
        if len(sentences) > PROMPT + 1:
            docs.append((sentences, encoder.encode(sentences).float()))
    return docs[:max_docs]


def consistency(model, context: torch.Tensor, concepts: torch.Tensor, seed: int) -> torch.Tensor:
    """The denoising-consistency score of each of concepts [n, D] after its context [n, P, D] (the modules)."""
    def denoise(noisy, t):
        hidden = model.encode(model.normalizer.normalize(context))
        out = model.denoiser(noisy[:, None], torch.full((len(noisy), 1), t), hidden, inference=True)[:, 0]
        return model.noise_scheduler.split(out, noisy, t)[0]

    generator = torch.Generator().manual_seed(seed)
    return DenoisingConsistency()(Candidates(concepts, context, torch.arange(len(concepts)), model,
                                             lambda shape: torch.randn(shape, generator=generator), denoise))


def next_sentence(model, docs, options, max_prefix: int) -> tuple[dict[str, list[float]], float]:
    """({"l2": one per prediction}, CA of all of them) of the one-sentence continuation of every prefix (batched by
    prefix length)."""
    L = min(max(len(e) for _, e in docs), max_prefix + 1)
    target = torch.zeros(len(docs), L, docs[0][1].shape[1])
    pred, mask = torch.zeros_like(target), torch.zeros(len(docs), L, dtype=torch.bool)
    for i, (_, emb) in enumerate(docs):
        target[i, : min(len(emb), L)] = emb[:L]
    valid = target.abs().sum(-1) > 0
    for p in range(1, L):
        rows = [i for i, (_, emb) in enumerate(docs) if len(emb) > p]
        out = lcm_fast.generate(model, target[rows, :p], options=options, max_gen_len=1)
        pred[rows, p] = torch.stack([s[p] for s in out.sequences]).float()
        mask[rows, p] = True
    return {"l2": (pred - target).norm(dim=-1)[mask].tolist()}, contrastive_accuracy(pred, target, mask, valid)


def continuation(model, docs, options, decoder, sentences: int, seed: int) -> dict[str, list[float]]:
    """Per document: l2 to the true sentences, local and topic coherence, ROUGE-L, consistency (module docstring)."""
    rows: dict[str, list[float]] = {"cont_l2": [], "local": [], "topic": [], "rouge_l": [], "consistency": []}
    for texts, emb in docs:
        out = lcm_fast.generate(model, emb[None, :PROMPT], options=options, max_gen_len=sentences)
        seq = out.sequences[0].float()
        new = seq[PROMPT:]
        n = min(len(new), len(emb) - PROMPT)
        rows["cont_l2"].append((new[:n] - emb[PROMPT : PROMPT + n]).norm(dim=-1).mean().item())
        unit = F.normalize(new, dim=-1)
        rows["local"].append((unit[1:] * unit[:-1]).sum(-1).mean().item())
        rows["topic"].append((unit @ F.normalize(emb[:PROMPT].mean(0), dim=0)).mean().item())
        reference = " ".join(texts[PROMPT : PROMPT + sentences])
        rows["rouge_l"].append(rouge_l(" ".join(decoder.decode(new)), reference))
        # re-scored with other noise than the search's, so a lucky draw of the search does not count
        scores = [consistency(model, seq[None, :p], seq[p : p + 1], seed * 1000 + p) for p in range(PROMPT, len(seq))]
        rows["consistency"].append(torch.cat(scores).mean().item())
    return rows


def summary(units: dict[str, dict[str, list[float]]], baseline: str) -> dict[str, dict[str, float]]:
    """Per setting and metric: the mean, and the mean paired difference to ``baseline`` with its standard error
    (units: every prediction or document of every seed, paired by position)."""
    out = {}
    for name, metrics in units.items():
        out[name] = {}
        for key, values in metrics.items():
            diff = torch.tensor(values, dtype=torch.float64) - torch.tensor(units[baseline][key], dtype=torch.float64)
            out[name][key] = sum(values) / len(values)
            if key != "ca":
                out[name][f"{key}_diff"] = diff.mean().item()
                out[name][f"{key}_se"] = (diff.std() / len(diff) ** 0.5).item() if len(diff) > 1 else 0.0
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--max-docs", type=int, default=64)
    parser.add_argument("--max-prefix", type=int, default=12, help="next sentence: longest prefix scored")
    parser.add_argument("--sentences", type=int, default=5, help="continuation: concepts generated")
    parser.add_argument("--json", help="write the results as JSON")
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    model = lcm_fast.from_pretrained(DEMO_DIR)
    decoder = RetrievalDecoder.load(DEMO_DIR / "bank")
    docs = held_out(load_encoder("minilm"), args.max_docs)
    units: dict[str, dict[str, list[float]]] = {}
    seconds = {}
    for name, k, b in SETTINGS:
        units[name], start = {"ca": []}, time.perf_counter()
        for seed in range(args.seeds):
            options = lcm_fast.GenerationOptions.paper(model, seed=seed, num_candidates=k, beam_size=b)
            per_prediction, ca = next_sentence(model, docs, options, args.max_prefix)
            units[name]["ca"].append(ca)
            for key, values in (per_prediction | continuation(model, docs, options, decoder, args.sentences,
                                                              seed)).items():
                units[name].setdefault(key, []).extend(values)
        seconds[name] = time.perf_counter() - start
        print(f"{name}: {seconds[name]:.0f} s", flush=True)
    results = summary(units, SETTINGS[0][0])
    print(f"\n{len(docs)} held-out documents, {args.seeds} seeds; paired difference to {SETTINGS[0][0]!r} "
          "+- its standard error\n")
    keys = ("l2", "ca", "cont_l2", "local", "topic", "rouge_l", "consistency")
    print("| search | next: l2 | next: CA | cont.: l2 | local | topic | ROUGE-L | consistency |")
    print("|---|---|---|---|---|---|---|---|")
    for name, r in results.items():
        cells = [f"{r[k]:.4f}" + (f" ({r[k + '_diff']:+.4f} +- {r[k + '_se']:.4f})"
                                  if k != "ca" and name != SETTINGS[0][0] else "") for k in keys]
        print(f"| {name} | " + " | ".join(cells) + " |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"documents": len(docs), "seeds": args.seeds, "results": results, "seconds": seconds}, f,
                      indent=1)


if __name__ == "__main__":
    main()
