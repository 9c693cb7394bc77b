"""Rebuilds the shipped demo (python/lcm_fast/data/demo/) and measures it: prepares the offline corpus
(lcm_fast.text.corpus: Jargon File, King James Bible, Python reference; about 1 document in 20 held out)
with the default MiniLM encoder, trains a small Two-Tower LCM on it with lcm_fast's own trainer, writes the
model (native format, fp16) and the sentence bank of the training documents, then scores it per domain on
the held-out documents. Deterministic given the seed; about 10 minutes on 2 CPU cores (bench/RESULTS.md, "The
shipped demo model").

    python scripts/make_demo.py [--steps 3000] [--work /tmp/lcm_demo] [--compare OLD_DEMO_DIR]

The report (markdown, printed) has, per domain: teacher-forced l2 and contrastive accuracy (CA), and for
the first 3 sentences of each held-out document as a prompt, the generated sentences' cosine to their bank
sentence and how many of 5 seeds give a different first sentence. ``--compare`` scores another demo
directory (the previous one, say) on the same documents with its own bank, for a before/after table.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "python"))

import lcm_fast  # noqa: E402
from lcm_fast.config import config_from_dict  # noqa: E402
from lcm_fast.nn.normalizer import SonarNormalizer  # noqa: E402
from lcm_fast.text import RetrievalDecoder, load_encoder  # noqa: E402
from lcm_fast.text.corpus import SOURCES, load_corpus  # noqa: E402
from lcm_fast.text.evaluate import evaluate  # noqa: E402
from lcm_fast.text.pipeline import DEMO_DIR  # noqa: E402
from lcm_fast.text.prepare import prepare  # noqa: E402
from lcm_fast.training import DataConfig, TrainConfig, Trainer  # noqa: E402
from lcm_fast.training.data import sample_embeddings  # noqa: E402

STACK = dict(num_attn_heads=4, ffn_inner_dim=768, dropout_p=0.1, final_dropout_p=0.0, layer_normalization_style="rms")
CONFIG = dict(sonar_embed_dim=384, model_dim=192, max_seq_len=64, sonar_normalizer_name="demo",
              context_encoder=dict(STACK, num_layers=2), denoiser=dict(STACK, num_layers=3, timestep_embed_dim=192),
              noise_scheduler=dict(num_diffusion_train_steps=100), trained_with_cf_guidance=True)
SEEDS = range(5)
PROMPT = 3


def _write_jsonl(path: Path, docs) -> Path:
    path.write_text("".join(json.dumps({"source": d.source, "title": d.title, "text": d.text}) + "\n" for d in docs))
    return path


def _seed_diversity(model, decoder, files: list[str], max_docs: int) -> float:
    """Mean over prompts of the number of distinct decoded first sentences that ``SEEDS`` give, divided by
    ``len(SEEDS)`` (1: every seed gives another sentence; 0.2: all give the same)."""
    import pyarrow.parquet as pq

    prompts = [torch.tensor(doc[:PROMPT], dtype=torch.float32)[None]
               for f in files for doc in pq.read_table(f).column("embeddings").to_pylist() if len(doc) > PROMPT]
    counts = []
    for prompt in prompts[:max_docs]:
        firsts = [lcm_fast.generate(model, prompt, max_gen_len=1, options=lcm_fast.GenerationOptions.recommended(
            seed=seed)).sequences[0][PROMPT].float() for seed in SEEDS]
        counts.append(len(set(decoder.decode(torch.stack(firsts)))) / len(SEEDS))
    return sum(counts) / len(counts)


def score(model_dir: Path, tests: dict[str, list[str]], max_docs: int) -> dict[str, dict[str, float]]:
    """Per domain: l2, CA (teacher forced), bank similarity of generated sentences, seed diversity."""
    model = lcm_fast.from_pretrained(model_dir)
    decoder = RetrievalDecoder.load(model_dir / "bank")
    rows = {}
    for source, files in tests.items():
        metrics = evaluate(model, files, decoder=decoder, max_docs=max_docs, prompt_sentences=PROMPT)
        tf, gen = metrics["teacher_forced"], metrics["generation"]
        rows[source] = {"l2": tf["l2"], "ca": tf["ca"], "bank_similarity": gen["similarity"],
                        "rouge_l": gen["rouge_l"], "seed_diversity": _seed_diversity(model, decoder, files, max_docs)}
    return rows


def report(results: dict[str, dict[str, dict[str, float]]]) -> str:
    lines = ["| model | domain | l2 | CA | bank similarity | ROUGE-L | seed diversity |", "|---|---|---|---|---|---|---|"]
    for name, rows in results.items():
        for source, r in rows.items():
            lines.append(f"| {name} | {source} | {r['l2']:.4f} | {r['ca']:.3f} | {r['bank_similarity']:.3f} | "
                         f"{r['rouge_l']:.3f} | {r['seed_diversity']:.2f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--work", default="/tmp/lcm_demo")
    parser.add_argument("--out", default=str(DEMO_DIR))
    parser.add_argument("--compare", help="another demo directory to score on the same held-out documents")
    parser.add_argument("--eval-docs", type=int, default=32, help="held-out documents scored per domain")
    args = parser.parse_args()
    work, out = Path(args.work), Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    encoder = load_encoder("minilm")
    docs = load_corpus()
    train = _write_jsonl(work / "train.jsonl", [d for d in docs if not d.held_out])
    manifest = prepare([train], work / "data", encoder, shard_docs=100)
    files = [str(work / "data" / s) for s in manifest["shards"]]
    tests = {}
    for source in SOURCES:
        held_out = _write_jsonl(work / f"test-{source}.jsonl", [d for d in docs if d.held_out and d.source == source])
        test = prepare([held_out], work / f"test-{source}", encoder, shard_docs=100)
        tests[source] = [str(work / f"test-{source}" / s) for s in test["shards"]]

    torch.manual_seed(0)
    model = lcm_fast.build_model(config_from_dict("two_tower_diffusion_lcm", CONFIG))
    model.normalizer.load_state_dict(SonarNormalizer.fit(sample_embeddings([(f, 1.0) for f in files], 384, 100_000),
                                                         "standard").state_dict())
    data = DataConfig(files=files, dim=384, max_sentences=32, max_concepts=512, shuffle_buffer=256)
    cfg = TrainConfig(variant="two_tower", steps=args.steps, lr=1e-3, warmup_steps=100, weight_decay=0.01,
                      save_every=0, log_every=100, out_dir=str(work / "run"))
    model = Trainer(model, cfg, data).train()
    if out.exists():
        shutil.rmtree(out)
    model.half().sonar_normalizer.float()  # fp16 weights (a few MB); normalizer statistics stay fp32
    model.save_pretrained(out)
    shutil.copytree(work / "data" / "bank", out / "bank")
    print(f"demo model and bank -> {out}")

    results = {"this demo": score(out, tests, args.eval_docs)}
    if args.compare:
        results[f"{args.compare}"] = score(Path(args.compare), tests, args.eval_docs)
    print(report(results))


if __name__ == "__main__":
    main()
