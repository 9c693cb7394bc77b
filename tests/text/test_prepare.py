"""prepare: text -> parquet shards + bank (resumable, deterministic), bad inputs, and the pipeline
text -> parquet -> train -> generate -> text end to end."""

from __future__ import annotations

import json
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

import lcm_fast
from lcm_fast.text import RetrievalDecoder, load_encoder, segment
from lcm_fast.text.prepare import prepare
from lcm_fast.training import DataConfig, TrainConfig, Trainer, batches
from lcm_fast.training.data import DataError

from ..conftest import tiny_config


@pytest.fixture(scope="module")
def encoder():
    return load_encoder("minilm")


@pytest.fixture(scope="module")
def documents() -> list[str]:
    from pydoc_data.topics import topics

    docs = [" ".join(topics[k].split()) for k in sorted(topics)[:40]]
    return [d[:1500] for d in docs if len(segment(d[:1500])) >= 3][:24]


def _inputs(tmp_path, documents):
    (tmp_path / "a.txt").write_text("\n\n".join(documents[:10]) + "\n")
    (tmp_path / "b.jsonl").write_text("".join(json.dumps({"body": d}) + "\n" for d in documents[10:18]))
    pq.write_table(pa.table({"body": documents[18:]}), tmp_path / "c.parquet")
    return [tmp_path / "a.txt", tmp_path / "b.jsonl", tmp_path / "c.parquet"]


def _read(path):
    return pq.read_table(path).to_pylist()


def test_prepare_resume_and_determinism(tmp_path, encoder, documents):
    files = _inputs(tmp_path, documents)
    manifest = prepare(files, tmp_path / "out", encoder, text_column="body", shard_docs=10, progress=False)
    assert manifest["complete"] and manifest["documents"] == len(documents) and len(manifest["shards"]) == 3
    rows = [r for s in manifest["shards"] for r in _read(tmp_path / "out" / s)]
    assert [r["sentences"] for r in rows] == [segment(d) for d in documents]
    assert all(len(r["sentences"]) == len(r["embeddings"]) for r in rows)
    # the bank decodes every stored embedding back to its own sentence
    bank = RetrievalDecoder.load(tmp_path / "out" / "bank")
    first = rows[0]
    assert bank.decode(torch.tensor(first["embeddings"])) == first["sentences"]
    # an interrupted run (last shard missing) resumes to the same result; a fresh run is identical
    (tmp_path / "out" / manifest["shards"][-1]).unlink()
    assert prepare(files, tmp_path / "out", encoder, text_column="body", shard_docs=10, progress=False) == manifest
    again = prepare(files, tmp_path / "fresh", encoder, text_column="body", shard_docs=10, progress=False)
    assert all(_read(tmp_path / "out" / s) == _read(tmp_path / "fresh" / s) for s in again["shards"])
    with pytest.raises(DataError, match="other options"):
        prepare(files, tmp_path / "out", encoder, text_column="body", shard_docs=5, progress=False)


def test_bad_inputs(tmp_path, encoder):
    cases = {
        "empty.txt": (b"", "no documents"),
        "binary.txt": (bytes(range(256)) * 4, "not UTF-8"),
        "wrong.jsonl": (b'{"body": "x."}\n', "no field 'text'"),
        "blank.jsonl": (b'{"text": "fine."}\n{"text": "   "}\n', "document 1 has no sentences"),
        "broken.jsonl": (b'{"text": \n', "invalid JSON"),
        "notes.md": (b"# hi", "unsupported input type"),
        "fake.parquet": (b"PAR1 not really", "not a readable parquet"),
    }
    for name, (content, message) in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(DataError, match=message):
            prepare([tmp_path / name], tmp_path / f"out_{name}", encoder, progress=False)
    pq.write_table(pa.table({"body": ["a."]}), tmp_path / "col.parquet")
    with pytest.raises(DataError, match=r"no column 'text' \(columns: \['body'\]\)"):
        prepare([tmp_path / "col.parquet"], tmp_path / "out_col", encoder, progress=False)
    cli = subprocess.run([sys.executable, "-m", "lcm_fast.cli", "prepare", "--input", str(tmp_path / "empty.txt"),
                          "--output", str(tmp_path / "cli")], capture_output=True, text=True)
    assert cli.returncode != 0 and "no documents" in cli.stderr


def test_text_to_parquet_to_train_to_generate_to_text(tmp_path, encoder, documents):
    """The whole pipeline on a small text: prepare, train a tiny Two-Tower on the shards, generate
    continuations of a segmented prompt, decode them with the bank (with similarities)."""
    files = _inputs(tmp_path, documents)
    manifest = prepare(files, tmp_path / "data", encoder, text_column="body", progress=False)
    data = DataConfig(files=[str(tmp_path / "data" / s) for s in manifest["shards"]], dim=384, max_sentences=16,
                      max_concepts=64)
    assert next(batches(data)).embeddings.shape[-1] == 384
    torch.manual_seed(0)
    model = lcm_fast.build_model(tiny_config("two_tower_diffusion_lcm", sonar_embed_dim=384))
    cfg = TrainConfig(variant="two_tower", steps=4, warmup_steps=1, save_every=4, log_every=1, validate_every=4,
                      valid_batches=1, valid_diffusion_steps=3, valid_bank=str(tmp_path / "data" / "bank"),
                      out_dir=str(tmp_path / "run"))
    Trainer(model, cfg, data, valid=data).train()
    valid = [json.loads(line) for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines()][-1]
    assert valid["split"] == "valid" and valid["l2_r"] > 0  # round trip through the bank and the encoder
    model = lcm_fast.from_pretrained(tmp_path / "run/checkpoints/step_4")
    prompt = encoder.encode(segment(documents[0])[:2])
    out = lcm_fast.generate(model, prompt[None], max_gen_len=3,
                            options=lcm_fast.GenerationOptions(inference_timesteps=5, seed=0))
    bank = RetrievalDecoder.load(tmp_path / "data" / "bank")
    decoded = bank.decode_with_scores(out.sequences[0][2:])
    assert len(decoded) == 3 and all(t in bank.sentences and -1 <= s <= 1 for t, s in decoded)


def test_ray_backend_writes_the_same_shards(tmp_path, encoder, documents):
    """Ray Data actors (a local 2-CPU cluster) encode and write the shards the local backend writes,
    and resume the same way."""
    ray = pytest.importorskip("ray")  # in requirements-dev: runs in CI
    files = _inputs(tmp_path, documents)
    local = prepare(files, tmp_path / "local", encoder, text_column="body", shard_docs=6, progress=False)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        run = lambda: prepare(files, tmp_path / "ray", encoder, text_column="body", shard_docs=6, progress=False,
                              backend="ray", ray_workers=2)
        manifest = run()
        assert manifest == local | {"shards": manifest["shards"]} and manifest["shards"] == local["shards"]
        for name in local["shards"]:
            ours, theirs = _read(tmp_path / "ray" / name), _read(tmp_path / "local" / name)
            assert [r["sentences"] for r in ours] == [r["sentences"] for r in theirs]
            for a, b in zip(ours, theirs):  # other processes, other thread counts: fp16 rounding at most
                torch.testing.assert_close(torch.tensor(a["embeddings"]), torch.tensor(b["embeddings"]),
                                           atol=1e-3, rtol=0)
        (tmp_path / "ray" / manifest["shards"][1]).unlink()
        assert run() == manifest and (tmp_path / "ray" / manifest["shards"][1]).is_file()
    finally:
        ray.shutdown()
    with pytest.raises(ValueError, match="unknown preparation backend"):
        prepare(files, tmp_path / "x", encoder, backend="spark")


def test_ray_backend_without_ray_says_what_to_install(tmp_path, encoder, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray.data", None)  # what a machine without ray[data] imports
    with pytest.raises(ImportError, match=r"pip install 'ray\[data\]'"):
        prepare([tmp_path / "none.txt"], tmp_path / "out", encoder, backend="ray")
    assert not (tmp_path / "out").exists()  # refused before any work
