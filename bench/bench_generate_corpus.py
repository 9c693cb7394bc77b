"""Corpus generation (``lcm-fast generate --data``): documents per second, one process vs Ray workers, in one run.

Run: ``python -m pytest bench/bench_generate_corpus.py --benchmark-json=corpus.json``.

The shipped demo model (a Two-Tower, d 384, lcm_fast.text.pipeline.DEMO_DIR) continues ``SHARDS`` shards of
``DOCS`` documents (prompts of 1-6 sentences of random 384-d vectors) by ``SENTENCES`` sentences with the
recommended sampling at ``STEPS`` steps. The single process (torch's threads) and the Ray backend (a local
cluster of ``WORKERS`` CPUs started once, outside the timing; each job starts its actor pool and ships the model,
inside it, as a user's job does) alternate A/B after a warm-up, median of ``REPEATS``; ``extra_info`` has both
rates, their ratio and whether the outputs are byte-equal (``outputs_equal``; the test suite checks byte equality
under the same BLAS threading: Ray's one-CPU actors run MKL single-threaded, this process with two threads, which on
some CPUs changes an fp16 output by one unit, so here the outputs must only agree to fp16 rounding).
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

import lcm_fast
from lcm_fast.text.corpus_generation import generate_corpus
from lcm_fast.text.pipeline import DEMO_DIR
from lcm_fast.training.data import embeddings_column

SHARDS, DOCS, SENTENCES, STEPS, WORKERS, REPEATS = 8, 64, 3, 40, 2, 3


def _shards(root: Path, dim: int) -> list[Path]:
    g = torch.Generator().manual_seed(0)
    root.mkdir(parents=True, exist_ok=True)
    paths = []
    for s in range(SHARDS):
        docs = [torch.randn(int(torch.randint(1, 7, (1,), generator=g)), dim, generator=g) for _ in range(DOCS)]
        paths.append(root / f"shard-{s}.parquet")
        pq.write_table(pa.table({"id": [f"{s}-{i}" for i in range(DOCS)], "embeddings": embeddings_column(docs)}),
                       paths[-1])
    return paths


def test_generate_corpus_local_vs_ray(benchmark, tmp_path):
    ray = pytest.importorskip("ray")
    model = lcm_fast.from_pretrained(DEMO_DIR)
    options = lcm_fast.GenerationOptions.recommended(seed=0, inference_timesteps=STEPS)
    shards, docs = (_shards(tmp_path / "in", model.sonar_dim), SHARDS * DOCS)
    if benchmark.disabled:  # the CI smoke run: one shard, the same code paths
        shards, docs = shards[:1], DOCS
    runs = iter(range(1000))

    def job(backend: str):
        out = tmp_path / f"{backend}-{next(runs)}"
        extra = dict(backend="ray", ray_workers=WORKERS) if backend == "ray" else {}
        generate_corpus(model, shards, out, max_gen_len=SENTENCES, options=options, progress=False, **extra)
        return out

    start = time.perf_counter()
    ray.init(num_cpus=WORKERS, include_dashboard=False, log_to_driver=False, configure_logging=False)
    ray_start = time.perf_counter() - start
    try:
        times: dict[str, list[float]] = {"local": [], "ray": []}
        outs = {b: job(b) for b in times}  # warm-up
        for _ in range(1 if benchmark.disabled else REPEATS):
            for backend, t in times.items():
                start = time.perf_counter()
                job(backend)
                t.append(time.perf_counter() - start)
        benchmark.pedantic(lambda: job("local"), rounds=1, iterations=1)
    finally:
        ray.shutdown()
    names = [p.name for p in outs["local"].glob("part-*.parquet")]
    tables = {b: [pq.read_table(outs[b] / n) for n in names] for b in outs}
    same = all(a.equals(b) for a, b in zip(tables["local"], tables["ray"]))
    local, distributed = statistics.median(times["local"]), statistics.median(times["ray"])
    benchmark.group = f"generate_corpus/{len(shards)}x{DOCS}docs/{SENTENCES}sent/{STEPS}steps"
    benchmark.extra_info.update(
        model="demo two-tower d384", shards=len(shards), documents=docs, sentences=SENTENCES, steps=STEPS,
        torch_threads=torch.get_num_threads(), ray_workers=WORKERS, ray_init_s=ray_start,
        local_s=local, ray_s=distributed, local_docs_per_s=docs / local, ray_docs_per_s=docs / distributed,
        ray_over_local=local / distributed, outputs_equal=same)
    for a, b in zip(tables["local"], tables["ray"]):
        assert a.column("id").equals(b.column("id")) and a.column("length").equals(b.column("length"))
        concepts = [np.asarray(t.column("embeddings").combine_chunks().flatten().flatten(), dtype=np.float32)
                    for t in (a, b)]
        np.testing.assert_allclose(*concepts, rtol=2e-3, atol=2e-3)
