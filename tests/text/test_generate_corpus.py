"""`lcm-fast generate --data`: corpus generation over parquet shards, exact across batching, resuming and Ray."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

import lcm_fast
from lcm_fast import DocumentNoise
from lcm_fast.text import RetrievalDecoder
from lcm_fast.text import corpus_generation as gc
from lcm_fast.training.data import DataError, embeddings_column

from ..conftest import random_model, tiny_config

D = 24
OPTIONS = lcm_fast.GenerationOptions.recommended(seed=7, inference_timesteps=6, ddim_eta=0.5)


@pytest.fixture(scope="module")
def model():
    return random_model(tiny_config("two_tower_diffusion_lcm"))


def _write_shards(root: Path, shards: int = 3, docs: int = 7, seed: int = 0) -> list[Path]:
    """Shards of ragged documents (1-5 sentences) with string ids."""
    root.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    paths = []
    for s in range(shards):
        emb = [torch.randn(int(torch.randint(1, 6, (1,), generator=g)), D, generator=g) for _ in range(docs)]
        paths.append(root / f"shard-{s}.parquet")
        pq.write_table(pa.table({"id": [f"s{s}-d{i}" for i in range(docs)], "embeddings": embeddings_column(emb)}),
                       paths[-1])
    return paths


def _outputs(out: Path) -> dict[str, pa.Table]:
    return {p.name: pq.read_table(p) for p in sorted(out.glob("part-*.parquet"))}


def _concepts(table: pa.Table) -> list[np.ndarray]:
    return [np.asarray(doc, dtype=np.float32).reshape(-1, D) for doc in table.column("embeddings").to_pylist()]


def test_writes_one_output_shard_per_input_in_input_order(model, tmp_path):
    inputs = _write_shards(tmp_path / "in")
    manifest = gc.generate_corpus(model, [str(tmp_path / "in" / "*.parquet")], tmp_path / "out", max_gen_len=3,
                                  options=OPTIONS, batch_size=4, progress=False)
    assert manifest["complete"] and not manifest["failed"]
    assert manifest["shards"] == {str(p): {"output": f"part-{i:05d}.parquet", "documents": 7}
                                  for i, p in enumerate(inputs)}
    assert manifest["model"] == gc.model_identity(model) and manifest["job"]["options"]["seed"] == 7
    assert json.loads((tmp_path / "out" / gc.MANIFEST).read_text()) == manifest
    for i, (name, table) in enumerate(_outputs(tmp_path / "out").items()):
        source = pq.read_table(inputs[i])
        assert table.column("id").to_pylist() == source.column("id").to_pylist()
        assert table.column("prompt_len").to_pylist() == [len(d) for d in source.column("embeddings").to_pylist()]
        assert table.column("length").to_pylist() == [3] * 7
        assert table.schema.field("embeddings").type.value_type.value_type == pa.float16()
        assert json.loads(table.schema.metadata[gc.METADATA_KEY]) == manifest["job"]
        # a document's concepts are those of generating it alone with its own noise
        prompt = torch.tensor(source.column("embeddings").to_pylist()[2])
        alone = lcm_fast.generate(model, prompt[None], max_gen_len=3, options=OPTIONS,
                                  noise=DocumentNoise(7, [f"s{i}-d2"])).sequences[0][len(prompt):]
        np.testing.assert_allclose(_concepts(table)[2], alone.half().float().numpy(), rtol=2e-3, atol=2e-3)


def test_document_noise_does_not_depend_on_the_batch():
    """A document's draws are the same alone, in any row of any batch, after other documents finished, and in every
    process; another id, seed or position draws other noise."""
    def draws(keys, position, compact=None):
        noise = DocumentNoise(7, keys)
        noise.at(position)
        first = noise.randn((len(keys), 1, 4), site="initial_latents", device=torch.device("cpu"))
        if compact is not None:
            noise.reorder(torch.tensor(compact))
        keep = compact if compact is not None else range(len(keys))
        second = noise.randn((len(keep), 1, 4), site="ddim_variance", device=torch.device("cpu"))
        return {keys[i]: (first[i], second[j]) for j, i in enumerate(keep)}

    alone = draws(["b"], 3)["b"]
    for got in (draws(["a", "b", "c"], 3)["b"], draws(["c", "b"], 3, compact=[1])["b"]):
        assert torch.equal(got[0], alone[0]) and torch.equal(got[1], alone[1])
    assert not torch.equal(draws(["a"], 3)["a"][0], alone[0]) and not torch.equal(draws(["b"], 4)["b"][0], alone[0])
    assert lcm_fast.inference.noise.document_seed(7, "b", 3) == 1126974357934231818  # stable across processes
    with pytest.raises(RuntimeError, match="for 3 rows while 2 documents"):
        DocumentNoise(7, ["a", "b"]).randn((3, 4), site="unit_sample", device=torch.device("cpu"))


@pytest.mark.parametrize("family", ["two_tower_diffusion_lcm", "base_lcm"])
def test_outputs_do_not_depend_on_batching(family, tmp_path):
    """Batches of 1, 3 and 16 documents (other neighbours, other padding): the same concepts up to fp32 rounding
    of differently shaped kernels (then fp16); the same batches give the same bytes."""
    model = random_model(tiny_config(family))
    options = OPTIONS if family != "base_lcm" else lcm_fast.GenerationOptions(seed=7, lcm_temperature=0.5)
    _write_shards(tmp_path / "in", shards=1, docs=9)
    runs = {}
    for batch in (1, 3, 16, 3):
        out = tmp_path / f"out{batch}-{len(runs)}"
        gc.generate_corpus(model, [tmp_path / "in" / "shard-0.parquet"], out, max_gen_len=2, options=options,
                           batch_size=batch, progress=False)
        runs.setdefault(batch, []).append(_outputs(out)["part-00000.parquet"])
    assert runs[3][0].equals(runs[3][1])
    for batch in (3, 16):
        for a, b in zip(_concepts(runs[1][0]), _concepts(runs[batch][0])):
            np.testing.assert_allclose(a, b, rtol=2e-3, atol=2e-3)


def test_resumes_an_interrupted_run_exactly(model, tmp_path, monkeypatch):
    """Interrupted in its second shard, a run keeps the first, leaves no partial output, and the rerun writes the
    bytes of an uninterrupted run without regenerating what was finished."""
    inputs = _write_shards(tmp_path / "in")
    kwargs = dict(max_gen_len=2, options=OPTIONS, batch_size=4, progress=False)
    gc.generate_corpus(model, inputs, tmp_path / "whole", **kwargs)
    real, calls = gc.generate_shard, []

    def interrupted(*args, **kw):
        calls.append(args[2])
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kw)

    monkeypatch.setattr(gc, "generate_shard", interrupted)
    with pytest.raises(KeyboardInterrupt):
        gc.generate_corpus(model, inputs, tmp_path / "run", **kwargs)
    manifest = json.loads((tmp_path / "run" / gc.MANIFEST).read_text())
    assert list(manifest["shards"]) == [str(inputs[0])] and not manifest["complete"]
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [gc.MANIFEST, "part-00000.parquet"]
    first = (tmp_path / "run" / "part-00000.parquet").stat().st_mtime_ns
    calls.clear()
    monkeypatch.setattr(gc, "generate_shard", lambda *a, **kw: calls.append(a[2]) or real(*a, **kw))
    assert gc.generate_corpus(model, inputs, tmp_path / "run", **kwargs)["complete"]
    assert calls == inputs[1:] and (tmp_path / "run" / "part-00000.parquet").stat().st_mtime_ns == first
    whole, resumed = _outputs(tmp_path / "whole"), _outputs(tmp_path / "run")
    assert list(whole) == list(resumed) and all(whole[n].equals(resumed[n]) for n in whole)


def test_ray_backend_equals_the_single_process_run(model, tmp_path):
    """Two Ray workers on a local cluster: the bytes of the single-process run, and a resumed Ray run redoes only
    the missing shard."""
    ray = pytest.importorskip("ray")  # in requirements-dev: runs in CI
    inputs = _write_shards(tmp_path / "in", shards=4, docs=5)
    kwargs = dict(max_gen_len=2, options=OPTIONS, batch_size=2, progress=False)
    # Ray's one-CPU actors start with OMP_NUM_THREADS=1, so MKL runs its single-threaded kernels, which on some CPUs
    # (AMD EPYC) differ in the last bit from the threaded ones: the single-process run runs with the same threading
    model.save_pretrained(tmp_path / "model")
    script = (f"import lcm_fast; from lcm_fast.text import corpus_generation as gc; gc.generate_corpus("
              f"lcm_fast.from_pretrained({str(tmp_path / 'model')!r}), {[str(p) for p in inputs]!r}, "
              f"{str(tmp_path / 'local')!r}, max_gen_len=2, batch_size=2, progress=False, "
              f"options=lcm_fast.GenerationOptions.from_dict({asdict(OPTIONS)!r}))")
    subprocess.run([sys.executable, "-c", script], check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        run = lambda: gc.generate_corpus(model, inputs, tmp_path / "ray", backend="ray", ray_workers=2, **kwargs)
        manifest = run()
        assert manifest["complete"] and len(manifest["shards"]) == 4
        local, distributed = _outputs(tmp_path / "local"), _outputs(tmp_path / "ray")
        assert list(local) == list(distributed) and all(local[n].equals(distributed[n]) for n in local)
        (tmp_path / "ray" / "part-00002.parquet").unlink()
        assert run()["shards"] == manifest["shards"]
        assert pq.read_table(tmp_path / "ray" / "part-00002.parquet").equals(local["part-00002.parquet"])
    finally:
        ray.shutdown()


def test_bad_inputs_are_clear_errors(model, tmp_path):
    inputs = _write_shards(tmp_path / "in", shards=2)
    run = lambda paths, out="out", **kw: gc.generate_corpus(model, paths, tmp_path / out, max_gen_len=2,
                                                            options=OPTIONS, progress=False, **kw)
    no_column = tmp_path / "bad" / "no-embeddings.parquet"
    no_column.parent.mkdir()
    pq.write_table(pa.table({"id": ["x"], "vectors": [[1.0]]}), no_column)
    with pytest.raises(DataError, match=r"no-embeddings.parquet: missing column 'embeddings'"):
        run([no_column], "o1")
    wrong_dim = tmp_path / "bad" / "dim.parquet"
    pq.write_table(pa.table({"id": ["x"], "embeddings": embeddings_column([torch.randn(2, D + 1)])}), wrong_dim)
    with pytest.raises(DataError, match=rf"dim.parquet: embeddings have dim {D + 1}, expected {D}"):
        run([wrong_dim], "o2")
    with pytest.raises(DataError, match=r"no id column 'doc' .*--id-column none"):
        run(inputs, "o3", id_column="doc")
    assert run(inputs, "o4", id_column=None)["complete"]
    assert pq.read_table(tmp_path / "o4" / "part-00001.parquet").column("id")[0].as_py() == "shard-1.parquet#0"
    with pytest.raises(DataError, match=r"exceed the model's max_seq_len=32: pass --prompt-sentences"):
        gc.generate_corpus(model, inputs, tmp_path / "o5", max_gen_len=30, options=OPTIONS, progress=False)
    with pytest.raises(DataError, match="matches no file"):
        run([str(tmp_path / "nothing" / "*.parquet")], "o6")
    # another run's directory: other options, other model, other inputs
    run(inputs, "o7")
    other = lcm_fast.GenerationOptions.recommended(seed=8, inference_timesteps=6, ddim_eta=0.5)
    with pytest.raises(DataError, match="holds another run's manifest \\(its job differ"):
        gc.generate_corpus(model, inputs, tmp_path / "o7", max_gen_len=2, options=other, progress=False)
    with pytest.raises(DataError, match="its model differ"):
        gc.generate_corpus(random_model(tiny_config("two_tower_diffusion_lcm"), seed=1), inputs, tmp_path / "o7",
                           max_gen_len=2, options=OPTIONS, progress=False)
    with pytest.raises(DataError, match="its inputs differ"):
        run(inputs[:1], "o7")
    with pytest.raises(ValueError, match="options.seed must be set"):
        gc.generate_corpus(model, inputs, tmp_path / "o8", options=lcm_fast.GenerationOptions(), progress=False)


def test_a_bad_shard_stops_the_run_or_is_skipped(model, tmp_path):
    """A corrupt shard in the middle: the run stops naming it (finished shards kept), or with skip_bad_shards
    reports it and finishes the rest; once repaired, the same run generates it."""
    inputs = _write_shards(tmp_path / "in", shards=3)
    good = inputs[1].read_bytes()
    inputs[1].write_bytes(b"PAR1 not really parquet")
    run = lambda **kw: gc.generate_corpus(model, inputs, tmp_path / "out", max_gen_len=2, options=OPTIONS,
                                          progress=False, **kw)
    with pytest.raises(DataError, match=r"shard-1.parquet: not a readable parquet file .*--skip-bad-shards"):
        run()
    assert (tmp_path / "out" / "part-00000.parquet").is_file() and not (tmp_path / "out" / "part-00001.parquet").exists()
    manifest = run(skip_bad_shards=True)
    assert list(manifest["failed"]) == [str(inputs[1])] and "not a readable parquet file" in manifest["failed"][str(inputs[1])]
    assert sorted(manifest["shards"]) == [str(inputs[0]), str(inputs[2])] and not manifest["complete"]
    inputs[1].write_bytes(good)
    manifest = run()
    assert manifest["complete"] and not manifest["failed"] and len(manifest["shards"]) == 3


def test_cli_generates_a_corpus_with_texts(model, tmp_path):
    """`lcm-fast generate --data GLOB --out DIR` with a sentence bank: the texts of the generated concepts."""
    model_dir = tmp_path / "model"
    lcm_fast.save_pretrained(model, model_dir)
    bank = RetrievalDecoder([f"sentence {i}." for i in range(50)], torch.randn(50, D))
    bank.save(tmp_path / "bank")
    _write_shards(tmp_path / "in", shards=2, docs=3)
    cli = lambda *args: subprocess.run([sys.executable, "-m", "lcm_fast", "generate", *args], capture_output=True,
                                       text=True, timeout=300)
    result = cli("--data", str(tmp_path / "in" / "*.parquet"), "--out", str(tmp_path / "out"), "--model",
                 str(model_dir), "--decoder", str(tmp_path / "bank"), "--sentences", "2", "--steps", "6")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith(f"6 documents in 2 shards -> {tmp_path / 'out'}")
    table = pq.read_table(tmp_path / "out" / "part-00001.parquet")
    assert [len(s) for s in table.column("sentences").to_pylist()] == [2, 2, 2]
    assert all(s in bank.sentences for doc in table.column("sentences").to_pylist() for s in doc)
    int8 = cli("--data", str(tmp_path / "in" / "*.parquet"), "--out", str(tmp_path / "int8"), "--model", str(model_dir),
               "--decoder", "none", "--sentences", "2", "--steps", "6", "--weights", "int8")
    assert int8.returncode == 0, int8.stderr
    assert json.loads((tmp_path / "int8" / gc.MANIFEST).read_text())["job"]["weights"] == "int8"
    for a, b in zip(_concepts(table), _concepts(pq.read_table(tmp_path / "int8" / "part-00001.parquet"))):
        np.testing.assert_allclose(a, b, atol=0.05)  # int8 weights: close to the model's own (bench/RESULTS.md)
    both = cli("Some text.", "--data", str(tmp_path / "in" / "*.parquet"), "--out", str(tmp_path / "o2"))
    assert both.returncode != 0 and "either a prompt text or --data" in both.stderr
    no_out = cli("--data", str(tmp_path / "in" / "*.parquet"))
    assert no_out.returncode != 0 and "--data needs --out" in no_out.stderr


def test_beam_search_and_lpcm_roles_in_a_corpus(model, tmp_path):
    """Beam search keys every candidate's noise by its document, so a corpus generated with beams has the same
    concepts at any batch size; a break concept adds the generated concepts' roles; a callable scorer, which the
    manifest cannot record, is refused."""
    inputs = _write_shards(tmp_path / "in", shards=1, docs=5)
    options = lcm_fast.GenerationOptions.recommended(seed=7, inference_timesteps=4, num_candidates=3, beam_size=2)
    brk = torch.randn(D)
    tables = []
    for batch in (1, 4):
        gc.generate_corpus(model, inputs, tmp_path / f"b{batch}", max_gen_len=3, options=options, batch_size=batch,
                           progress=False, break_vec=brk)
        tables.append(_outputs(tmp_path / f"b{batch}")["part-00000.parquet"])
    for a, b in zip(*map(_concepts, tables)):
        np.testing.assert_allclose(a, b, rtol=2e-3, atol=2e-3)
    roles = tables[0].column("roles").to_pylist()
    assert [len(r) for r in roles] == tables[0].column("length").to_pylist() and {x for r in roles for x in r} <= {0, 1, 2}
    assert json.loads(tables[0].schema.metadata[gc.METADATA_KEY])["options"]["beam_size"] == 2
    with pytest.raises(ValueError, match="give beam_scorer by name"):
        gc.generate_corpus(model, inputs, tmp_path / "callable", options=lcm_fast.GenerationOptions(
            seed=1, beam_size=2, beam_scorer=lambda c: c.concepts[:, 0]), progress=False)
