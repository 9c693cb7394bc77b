"""``lcm-fast repro``: the paper's Table 3 (pre-training evaluation of the LCM variants) at small scale, offline.

One command builds a corpus from text that ships with the project or with Python (:mod:`lcm_fast.text.corpus`),
splits it by document (about 1 in 20 documents for test, 1 in 20 for validation), segments and encodes it with the
packaged encoder, trains Base-LCM, One-Tower, Two-Tower, Quant-LCM-C and Quant-LCM-D at matched size and compute (the
``small_*`` presets: model dim 256, two layers per stack; the same steps and batches), plus Two-Tower with fragility
weighting (the paper's Table 6), and scores each on the test documents with the paper's pre-training metrics: l2,
l2-r (round trip through a sentence bank of the *training* documents, so a test sentence can never be returned as
itself), PAR, CA, and MI when a local causal LM is given. It writes ``table.md`` and ``table.png`` (a grouped bar
chart) into the output directory and returns the table.

Sizes: the full run trains each variant ``steps`` steps (default 600: about 30 minutes in all on 2 CPU cores);
``quick`` runs the whole pipeline on a few documents with tiny models (the test suite's).
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Any, Optional

import torch
from tqdm.auto import tqdm

from .. import archs
from ..models import build_model
from ..nn.normalizer import SonarNormalizer
from ..quant import ResidualQuantizer
from ..training import DataConfig, TrainConfig, Trainer
from ..training.data import sample_embeddings
from ..training.fragility import fit_fragility_mlp, fragility_scores
from .corpus import Document, load_corpus
from .encoders import load_encoder
from .evaluate import evaluate, prepared_documents
from .mutual_information import MutualInformation
from .prepare import prepare
from .retrieval import RetrievalDecoder, warn_on_leak

#: the rows of the table: name -> (training variant, preset, loss weighting)
VARIANTS: dict[str, tuple[str, str, str]] = {
    "Base-LCM": ("base", "small_base_lcm", "none"),
    "One-Tower": ("one_tower", "small_one_tower_diffusion_lcm", "none"),
    "Two-Tower": ("two_tower", "small_two_tower_diffusion_lcm", "none"),
    "Quant-LCM-C": ("quant_c", "small_quant_lcm", "none"),
    "Quant-LCM-D": ("quant_d", "small_quant_lcm", "none"),
    "Two-Tower + fragility": ("two_tower", "small_two_tower_diffusion_lcm", "fragility"),
}
METRICS = ("l2", "l2_r", "par", "ca", "mi")
#: the paper's Table 3, ROC-stories columns (l2, l2-r, PAR, CA, MI): what the run is compared with
PAPER_ROC = {
    "Base-LCM": (0.177, 0.237, 1.165, 0.349, 0.154),
    "One-Tower": (0.236, 0.236, 1.178, 0.684, 0.221),
    "Two-Tower": (0.233, 0.238, 1.171, 0.698, 0.214),
    "Quant-LCM-C": (0.236, 0.257, 1.175, 0.666, 0.161),
    "Quant-LCM-D": (0.240, 0.253, 1.187, 0.653, 0.160),
}


def split_of(doc: Document) -> str:
    """``test`` for the held-out documents (:attr:`Document.held_out`), ``valid`` for another 1 in 20 (by the same
    hash), else ``train``: the same split on every machine."""
    import zlib

    if doc.held_out:
        return "test"
    return "valid" if zlib.crc32(f"{doc.source}/{doc.title}".encode()) % 20 == 1 else "train"


def _shrink(config: Any, quick: bool, dim: int, max_seq_len: int) -> Any:
    """The preset for the data's embedding dim; ``quick``: model dim 32, one small layer per stack."""
    config = dataclasses.replace(config, sonar_embed_dim=dim, max_seq_len=max_seq_len)
    if not quick:
        return config
    stack = dict(num_layers=1, num_attn_heads=2, ffn_inner_dim=64)
    stacks = {name: dataclasses.replace(getattr(config, name), **stack)
              for name in ("context_encoder", "denoiser", "lcm") if hasattr(config, name)}
    if "denoiser" in stacks:
        stacks["denoiser"] = dataclasses.replace(stacks["denoiser"], timestep_embed_dim=32)
    return dataclasses.replace(config, model_dim=32, **stacks)


def _write_split(docs: list[Document], path: Path) -> Path:
    path.write_text("".join(json.dumps({"text": d.text}) + "\n" for d in docs))
    return path


def run(out_dir: str | Path, *, steps: int = 600, seeds: int = 1, quick: bool = False,
        mi_model: Optional[str] = None, device: Optional[str] = None, progress: bool = True) -> dict[str, dict]:
    """Runs the reproduction into ``out_dir`` (``data/``, ``runs/``, ``table.md``, ``table.png``) -> {variant:
    {metric: mean, metric + "_std": spread over seeds}}. See the module docstring."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    started = time.perf_counter()
    stages = tqdm(total=4 + len(VARIANTS) * seeds, desc="repro", unit="stage", disable=not progress)

    docs = load_corpus()
    if quick:  # a few documents of each source, every split represented
        docs = [d for s in ("jargon", "kjv", "python_docs") for d in [x for x in docs if x.source == s][:12]]
    encoder = load_encoder("minilm")
    files: dict[str, list[str]] = {}
    for split in ("train", "valid", "test"):
        chosen = [d for d in docs if split_of(d) == split] or ([docs[0]] if quick else [])
        manifest = prepare([_write_split(chosen, out / f"{split}.jsonl")], out / "data" / split, encoder,
                           progress=False)
        files[split] = [str(out / "data" / split / shard) for shard in manifest["shards"]]
    stages.update()
    train_bank = RetrievalDecoder.load(out / "data" / "train" / "bank")  # the test documents are not in it
    # sentences repeated across documents (a refrain, a stock phrase) can still be in it: measured and reported
    overlap = warn_on_leak(train_bank, [s for doc, _ in prepared_documents(files["test"]) for s in doc], "repro")

    dim = encoder.dim
    sample = sample_embeddings([(f, 1.0) for f in files["train"]], dim, 100_000)
    normalizer = SonarNormalizer.fit(sample)
    codebooks, size = (4, 16) if quick else (8, 256)
    rq = ResidualQuantizer(dim, codebooks, size).train(sample, backend="torch", progress=False)
    stages.update()
    # fragility: training sentences scored with a bank of other text (the validation split)
    pairs = [(s, v) for doc, vectors in prepared_documents(files["train"]) for s, v in zip(doc, vectors)]
    pairs = pairs[:: max(1, len(pairs) // (16 if quick else 600))]
    texts, x = [p[0] for p in pairs], torch.tensor([p[1] for p in pairs], dtype=torch.float32)
    scores = fragility_scores(texts, x, RetrievalDecoder.load(out / "data" / "valid" / "bank").decode, encoder.encode,
                              normalizer, generator=torch.Generator().manual_seed(0))
    torch.save(fit_fragility_mlp(normalizer.normalize(x), scores).state_dict(), out / "fragility.pt")
    stages.update()

    mi = MutualInformation(mi_model, device=device) if mi_model else None
    max_docs = 4 if quick else 64
    results: dict[str, list[dict[str, float]]] = {name: [] for name in VARIANTS}
    for seed in range(seeds):
        for name, (variant, preset, weighting) in VARIANTS.items():
            stages.set_postfix(variant=name, seed=seed)
            config = _shrink(archs.get_arch(preset), quick, dim, max_seq_len=64)
            if variant.startswith("quant"):
                config = dataclasses.replace(config, target="discrete" if variant == "quant_d" else "continuous",
                                             n_codebooks=codebooks, codebook_size=size)
            torch.manual_seed(seed)
            model = build_model(config)
            model.normalizer.load_state_dict(normalizer.state_dict())
            if variant.startswith("quant"):
                model.set_codebooks(rq.codebooks)
            run_dir = out / "runs" / f"{name.replace(' ', '').replace('+', '_')}-seed{seed}"
            train_cfg = TrainConfig(variant=variant, steps=3 if quick else steps, lr=1e-3, warmup_steps=1 if quick
                                    else steps // 10, seed=seed, save_every=0, log_every=max(1, steps // 10),
                                    loss_weighting=weighting, fragility_model=str(out / "fragility.pt")
                                    if weighting == "fragility" else None, out_dir=str(run_dir))
            data = DataConfig(files=files["train"], dim=dim, max_sentences=64, max_concepts=2048, seed=seed)
            trained = Trainer(model.to(device), train_cfg, data).train(progress=False).eval()
            scores = evaluate(trained, files["test"], encoder=encoder, decoder=train_bank, max_docs=max_docs,
                              generate_sentences=0, mutual_information=mi)
            results[name].append(scores["teacher_forced"])
            stages.update()
    table = {name: _summary(rows) for name, rows in results.items()}
    minutes = (time.perf_counter() - started) / 60
    (out / "table.md").write_text(markdown(table, seeds, steps if not quick else 3, minutes, overlap))
    _plot(table, out / "table.png")
    stages.update()
    stages.close()
    return table


def _summary(rows: list[dict[str, float]]) -> dict[str, float]:
    out: dict[str, float] = {}
    for metric in METRICS:
        values = [r[metric] for r in rows if metric in r]
        if values:
            mean = sum(values) / len(values)
            out[metric] = mean
            out[metric + "_std"] = math.sqrt(sum((v - mean) ** 2 for v in values) / max(1, len(values) - 1))
    return out


def markdown(table: dict[str, dict[str, float]], seeds: int, steps: int, minutes: float, overlap: float) -> str:
    """The table (mean, with +- the spread over seeds when there are several), then the paper's ROC-stories rows."""
    metrics = [m for m in METRICS if any(m in row for row in table.values())]
    head = "| model | " + " | ".join(metrics) + " |\n|---|" + "---:|" * len(metrics) + "\n"

    def cell(row: dict[str, float], m: str) -> str:
        if m not in row:
            return ""
        return f"{row[m]:.3f}" + (f" ± {row[m + '_std']:.3f}" if seeds > 1 else "")

    body = "".join(f"| {name} | " + " | ".join(cell(row, m) for m in metrics) + " |\n" for name, row in table.items())
    paper = "".join(f"| {name} (paper, ROC-stories) | " + " | ".join(
        f"{v:.3f}" for m, v in zip(METRICS, values) if m in metrics) + " |\n" for name, values in PAPER_ROC.items())
    return (f"lcm-fast repro: {seeds} seed(s), {steps} steps per variant, {minutes:.1f} min; l2 and l2-r in the packaged"
            f" encoder's space (MiniLM, not SONAR: not comparable with the paper's in absolute value); the l2-r bank"
            f" holds {overlap:.1%} of the test sentences (repeated across documents)\n\n"
            + head + body + "\n" + head + paper)


def _plot(table: dict[str, dict[str, float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [m for m in METRICS if any(m in row for row in table.values())]
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.2 * len(metrics), 3.4))
    for ax, metric in zip(list(axes) if len(metrics) > 1 else [axes], metrics):
        names = [n for n, row in table.items() if metric in row]
        ax.bar(range(len(names)), [table[n][metric] for n in names],
               yerr=[table[n].get(metric + "_std", 0.0) for n in names], color=[f"C{i}" for i in range(len(names))])
        ax.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=7)
        ax.set_title(metric)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
