"""``lcm-fast repro --lpcm``: the paper's LPCM ablation (section 4.3, Table 13) at small scale, offline.

The paper trains a One-Tower and an LPCM (the same One-Tower on data with break and plan concepts) on the same data
for the same steps and scores the coherence of their generations with an LLM judge. Here, with no judge offline:

- **Data**: the prose of the Python language reference (``lcm_fast.text.corpus``), whose sections keep their
  paragraphs (the shipped excerpts have none), split by document (one in 5 for test, by a hash of the title: a
  larger test set than repro's 1 in 20, from 200 documents), prepared with ``--paragraphs`` and encoded with the
  packaged MiniLM, once with extractive plans (a copy of the paragraph's central sentence) and once with mean plans
  (the mean of its sentences: a plan that copies none); the baseline's data is the same shards without the break and
  plan rows.
- **Models**: the ``small_one_tower`` preset (the same size for all three), the same steps, batches and seed.
- **Pre-training metrics** on the test documents' sentences (l2, PAR, CA: break and plan targets are not scored).
- **A coherence proxy** of generations: each test document's first ``PROMPT`` sentences continued by ``GENERATE``
  concepts (the LPCM's breaks and plans left out); ``local``: mean cosine of consecutive generated sentences,
  ``topic``: mean cosine of a generated sentence to the prompt's mean, both in the encoder's space; the same
  numbers for the documents' real continuations are the yardstick; also with beam search over concepts (4 candidates
  x 2 beams, :mod:`lcm_fast.inference.beam`): the denoising-consistency scorer for every model, the plan scorer
  (cosine to the latest plan) for the LPCMs.
"""

from __future__ import annotations

import dataclasses
import json
import zlib
from pathlib import Path
from typing import Optional

import pyarrow.parquet as pq
import torch
import torch.nn.functional as F

from .. import archs
from ..inference import GenerationOptions, generate
from ..models import build_model
from ..nn.normalizer import SonarNormalizer
from ..training import DataConfig, TrainConfig, Trainer
from ..training.data import sample_embeddings, write_documents
from .corpus import _python_docs
from .encoders import load_encoder
from .evaluate import evaluate
from .paragraphs import load_break
from .prepare import LPCM_FILE, prepare
from .repro import _shrink, _write_split

PROMPT, GENERATE = 4, 8
#: the models: (name, plan source of its data or None: the One-Tower on the sentences alone)
MODELS = (("One-Tower", None), ("LPCM", "extractive"), ("LPCM, mean plans", "mean"))
#: generation settings of the proxy: (row suffix, beam scorer or None: sampling one); beam search is 4 candidates x 2
#: beams (lcm_fast.inference.beam); the plan scorer only for the LPCM
SEARCHES = (("", None), (" + beam 4x2, consistency", "consistency"), (" + beam 4x2, plan", "plan"))


def _is_test(doc) -> bool:
    return zlib.crc32(f"{doc.source}/{doc.title}".encode()) % 5 == 0


def _without_structure(files: list[str], out: Path) -> list[str]:
    """The shards with their break and plan rows dropped: the baseline's data, the same sentences."""
    out.mkdir(parents=True, exist_ok=True)
    plain = []
    for file in files:
        rows = pq.read_table(file).to_pylist()
        keep = [[i for i, r in enumerate(row["roles"]) if r == 0] for row in rows]
        docs = [torch.tensor(row["embeddings"])[k] for row, k in zip(rows, keep)]
        plain.append(str(out / Path(file).name))
        write_documents(plain[-1], docs, sentences=[[row["sentences"][i] for i in k] for row, k in zip(rows, keep)])
    return plain


def _coherence(sentences: torch.Tensor, prompt: torch.Tensor) -> tuple[float, float]:
    """(local, topic) of generated sentences [n, D] after a prompt [p, D] (see the module docstring)."""
    unit = F.normalize(sentences.float(), dim=-1)
    local = (unit[1:] * unit[:-1]).sum(-1).mean().item() if len(unit) > 1 else float("nan")
    topic = (unit @ F.normalize(prompt.float().mean(0), dim=0)).mean().item()
    return local, topic


def run(out_dir: str | Path, *, steps: int = 600, quick: bool = False, device: Optional[str] = None) -> dict:
    """Runs the ablation into ``out_dir`` (``data/``, ``runs/``, ``lpcm.md``, ``lpcm.json``) -> the results."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    docs = _python_docs("\n\n")
    if quick:
        docs = docs[:10] + [d for d in docs if _is_test(d)][:2]
    encoder = load_encoder("minilm")
    data: dict = {}
    for name, source in MODELS[1:]:
        files = data[name] = {}
        for split in ("train", "test"):
            chosen = [d for d in docs if _is_test(d) == (split == "test")]
            directory = out / "data" / f"{split}{'' if source == 'extractive' else '-' + source}"
            manifest = prepare([_write_split(chosen, out / f"{split}.jsonl")], directory, encoder, paragraphs=True,
                               plan_source=source, progress=False)
            files[split] = [str(directory / shard) for shard in manifest["shards"]]
    data["One-Tower"] = {split: _without_structure(f, out / "data" / f"{split}-plain") for split, f in data["LPCM"].items()}
    break_vec = load_break(out / "data" / "train" / LPCM_FILE)
    normalizer = SonarNormalizer.fit(sample_embeddings([(f, 1.0) for f in data["One-Tower"]["train"]], encoder.dim,
                                                       100_000))
    options = GenerationOptions.recommended(seed=0, inference_timesteps=8 if quick else 40)
    results: dict = {"steps": 3 if quick else steps, "prompt": PROMPT, "generate": GENERATE}
    test_docs = [(row["embeddings"], row["sentences"]) for f in data["One-Tower"]["test"]
                 for row in pq.read_table(f).to_pylist() if len(row["sentences"]) >= PROMPT + 2]
    reference = [_coherence(torch.tensor(emb[PROMPT : PROMPT + GENERATE]), torch.tensor(emb[:PROMPT]))
                 for emb, _ in test_docs]
    results["real continuation"] = {"local": _mean([r[0] for r in reference]), "topic": _mean([r[1] for r in reference])}
    for name, source in MODELS:
        torch.manual_seed(0)
        model = build_model(_shrink(archs.get_arch("small_one_tower_diffusion_lcm"), quick, encoder.dim, 128))
        model.normalizer.load_state_dict(normalizer.state_dict())
        config = TrainConfig(variant="lpcm" if source else "one_tower", steps=results["steps"], lr=1e-3,
                             warmup_steps=1 if quick else steps // 10, save_every=0, log_every=max(1, steps // 10),
                             out_dir=str(out / "runs" / name))
        trained = Trainer(model.to(device), config, DataConfig(files=data[name]["train"], dim=encoder.dim,
                                                               max_sentences=128, max_concepts=2048)).train(progress=False).eval()
        metrics = evaluate(trained, data[name]["test"], max_docs=4 if quick else 64, generate_sentences=0)["teacher_forced"]
        prompts = [torch.tensor(emb[:PROMPT])[None] for emb, _ in test_docs]
        results[name] = {k: metrics[k] for k in ("l2", "par", "ca")}
        for search, scorer in SEARCHES:
            if scorer == "plan" and not source:
                continue
            beams = dict(num_candidates=4, beam_size=2, beam_scorer=scorer) if scorer else {}
            results[f"{name}{search}"] = {**results.get(f"{name}{search}", {}), **_proxy(
                trained, prompts, dataclasses.replace(options, **beams), break_vec if source else None, device)}
    results["test_documents"] = len(test_docs)
    (out / "lpcm.json").write_text(json.dumps(results, indent=1) + "\n")
    (out / "lpcm.md").write_text(markdown(results))
    return results


def _proxy(model, prompts: list[torch.Tensor], options: GenerationOptions, break_vec: Optional[torch.Tensor],
           device: str) -> dict[str, float]:
    """The coherence proxy of the model's continuations of ``prompts`` ([1, PROMPT, D] each)."""
    scores, structure = [], 0
    for prompt in prompts:
        result = generate(model, prompt.to(device), max_gen_len=GENERATE, options=options, break_vec=break_vec)
        content = result.sentences(0)[PROMPT:]
        structure += GENERATE - len(content)
        scores.append(_coherence(content.cpu(), prompt[0]))
    return {"local": _mean([s[0] for s in scores]), "topic": _mean([s[1] for s in scores]),
            "structure_concepts": structure / max(1, len(prompts))}


def _mean(values: list[float]) -> float:
    values = [v for v in values if v == v]  # a single generated sentence has no local coherence
    return sum(values) / len(values) if values else float("nan")


def markdown(results: dict) -> str:
    rows = ["| | l2 | PAR | CA | local coherence | topic | breaks + plans per document |", "|---|---|---|---|---|---|---|"]
    for name, _ in MODELS:
        for search, _ in SEARCHES:
            if f"{name}{search}" not in results:
                continue
            r = results[f"{name}{search}"]
            metrics = f"{r['l2']:.4f} | {r['par']:.4f} | {r['ca']:.4f}" if not search else " | |"
            rows.append(f"| {name}{search} | {metrics} | {r['local']:.4f} | {r['topic']:.4f} | "
                        f"{r['structure_concepts']:.2f} |")
    real = results["real continuation"]
    rows.append(f"| real continuation | | | | {real['local']:.4f} | {real['topic']:.4f} | |")
    return (f"LPCM ablation ({results['steps']} steps each, {results['test_documents']} test documents, prompts of "
            f"{results['prompt']} sentences, {results['generate']} generated concepts)\n\n" + "\n".join(rows) + "\n")
