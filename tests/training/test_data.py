"""Parquet training data: layout, wrapping, batching, determinism and bad-data errors."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from lcm_fast.training import DataConfig, DataError, batches, read_documents, write_documents


def _docs(n=10, dim=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(int(torch.randint(1, 9, (1,), generator=g)), dim, generator=g) for _ in range(n)]


def test_round_trip_fp16(tmp_path):
    docs = _docs()
    write_documents(tmp_path / "a.parquet", docs, prompt_lens=[0] * 9 + [1], row_group_size=3)
    read = list(read_documents(tmp_path / "a.parquet", 8))
    assert [r for r, _ in read] == list(range(10))
    for d, (_, got) in zip(docs, read):
        torch.testing.assert_close(got.embeddings, d.half().float())
    assert read[-1][1].prompt_len == 1


def test_batches_wrap_budget_and_determinism(tmp_path):
    docs = [torch.randn(n, 4) for n in (3, 11, 5, 1, 7)]
    write_documents(tmp_path / "a.parquet", docs)
    eot = torch.full((4,), 0.5)
    cfg = DataConfig(files=[str(tmp_path / "a.parquet")], dim=4, max_sentences=4, max_concepts=12, shuffle_buffer=3,
                     eot=eot, seed=1)
    out = list(batches(cfg, epoch=0))
    lens = sorted(int(l) for b in out for l in b.seq_lens)
    # each document + eot, wrapped at 4: 4 -> 4; 12 -> 4,4,4; 6 -> 4,2; 2 -> 2; 8 -> 4,4
    assert lens == sorted([4, 4, 4, 4, 4, 2, 2, 4, 4])
    assert all(b.embeddings.shape[0] * b.embeddings.shape[1] <= 12 for b in out)
    again = list(batches(cfg, epoch=0))
    assert all(torch.equal(a.embeddings, b.embeddings) for a, b in zip(out, again))
    other = list(batches(cfg, epoch=1))
    assert not all(torch.equal(a.embeddings, b.embeddings) for a, b in zip(out, other))
    tails = [b.embeddings[i, int(l) - 1] for b in out for i, l in enumerate(b.seq_lens)]
    assert sum(torch.equal(t, eot) for t in tails) == 5  # one eot per document, at a chunk end


def test_bad_data_errors(tmp_path):
    path = tmp_path / "bad.parquet"
    write_documents(path, [torch.randn(2, 8)])
    with pytest.raises(DataError, match=r"embeddings have dim 8, expected 16"):
        list(read_documents(path, 16))
    nan = torch.randn(3, 8)
    nan[1, 2] = float("nan")
    write_documents(path, [torch.randn(2, 8), nan])
    with pytest.raises(DataError, match=r"bad.parquet row 1: NaN or inf in sentence 1"):
        list(read_documents(path, 8))
    pq.write_table(pa.table({"embeddings": pa.array([[[1.0] * 8], []], type=pa.list_(pa.list_(pa.float32())))}), path)
    with pytest.raises(DataError, match=r"row 1: empty document"):
        list(read_documents(path, 8))
    pq.write_table(pa.table({"embeddings": pa.array([[[1.0] * 8, [1.0] * 7]], type=pa.list_(pa.list_(pa.float32())))}), path)
    with pytest.raises(DataError, match=r"row 0: an embedding has dim 7, expected 8"):
        list(read_documents(path, 8))
    pq.write_table(pa.table({"vectors": pa.array([1, 2])}), path)
    with pytest.raises(DataError, match=r"missing column 'embeddings'"):
        list(read_documents(path, 8))
    path.write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(DataError, match="not a readable parquet file"):
        list(read_documents(path, 8))
    write_documents(path, [torch.randn(2, 8)], prompt_lens=[2])
    with pytest.raises(DataError, match=r"prompt_len 2 must be in \[0, 2\)"):
        list(read_documents(path, 8))


def test_float32_variable_lists_are_accepted(tmp_path):
    path = tmp_path / "f32.parquet"
    vecs = np.random.randn(3, 8).astype(np.float32)
    pq.write_table(pa.table({"embeddings": pa.array([vecs.tolist()], type=pa.list_(pa.list_(pa.float32())))}), path)
    (_, doc), = read_documents(path, 8)
    torch.testing.assert_close(doc.embeddings, torch.from_numpy(vecs))


def test_sample_and_fit_normalizer(tmp_path):
    from lcm_fast.nn.normalizer import SonarNormalizer
    from lcm_fast.training.data import sample_embeddings

    g = torch.Generator().manual_seed(0)
    a = [torch.randn(20, 8, generator=g) * 2 + 1 for _ in range(50)]  # 1000 sentences
    b = [torch.randn(10, 8, generator=g) - 5 for _ in range(50)]  # 500 sentences
    write_documents(tmp_path / "a.parquet", a)
    write_documents(tmp_path / "b.parquet", b)
    sample = sample_embeddings([(str(tmp_path / "a.parquet"), 3.0), (str(tmp_path / "b.parquet"), 1.0)], 8, 400)
    assert sample.shape == (400, 8)
    from_b = (sample.mean(1) < -2.5).sum().item()
    assert 80 <= from_b <= 120  # a quarter of the sample comes from b
    assert torch.equal(sample, sample_embeddings([(str(tmp_path / "a.parquet"), 3.0),
                                                  (str(tmp_path / "b.parquet"), 1.0)], 8, 400))
    only_a = sample_embeddings([(str(tmp_path / "a.parquet"), 1.0)], 8, 800)
    norm = SonarNormalizer.fit(only_a)
    z = norm.normalize(torch.cat(a))
    assert z.median(0).values.abs().max() < 0.15 and (z.std(0) - 1).abs().max() < 0.15  # robust ~ unit Gaussian
    norm.save(tmp_path / "norm.pt")
    import lcm_fast

    again = lcm_fast.load_normalizer(tmp_path / "norm.pt")
    assert torch.equal(again.center, norm.center) and torch.equal(again.scale, norm.scale)
    with pytest.raises(ValueError, match="NaN or inf"):
        SonarNormalizer.fit(torch.tensor([[1.0, float("nan")], [0.0, 1.0]]))
    # a (near-)constant dim is left unscaled instead of being divided by its ~0 spread
    x = torch.randn(100, 3, generator=g)
    x[:, 1] = 0.3 + 1e-9 * torch.randn(100, generator=g)
    fitted = SonarNormalizer.fit(x, "standard")
    assert fitted.scale[1] == 1.0 and fitted.scale[0] != 1.0
