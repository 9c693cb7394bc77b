"""The Large Planning Concept Model (paper section 4.3): paragraph rules, break and plan concepts,
``prepare --paragraphs``, the ``roles`` column through the data loader, the structure loss weight,
``train --variant lpcm``, and roles in generated sequences (breaks and plans out of the text)."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F

import lcm_fast
from lcm_fast.text import RetrievalDecoder, load_encoder
from lcm_fast.inference.planning import BREAK, PLAN, SENTENCE, concept_roles
from lcm_fast.text.paragraphs import BREAK_TEXT, apply_rules, central_sentence, load_break, split_paragraphs, structure
from lcm_fast.text.pipeline import continue_text
from lcm_fast.text.prepare import LPCM_FILE, prepare
from lcm_fast.training import DataConfig, TrainConfig, Trainer, batches
from lcm_fast.training.data import DataError, collate, read_documents, write_documents
from lcm_fast.training.losses import diffusion_loss

from ..conftest import tiny_config


def _sentences(n: int, tag: str = "S") -> str:
    return " ".join(f"{tag}{i} is a sentence." for i in range(n))


def test_paragraph_rules():
    """At most 10 sentences (near-equal parts), runs of one-sentence paragraphs merged, a lone one kept."""
    assert [len(p) for p in apply_rules([list("abcdefghijklmnopqrstuvw")])] == [8, 7, 8]
    assert apply_rules([["a"], ["b"], ["c", "d"], ["e"], [], ["f", "g"]]) == [["a", "b"], ["c", "d"], ["e"], ["f", "g"]]
    assert [len(p) for p in apply_rules([[str(i)] for i in range(12)])] == [6, 6]


def test_split_paragraphs_finds_structure():
    """Blank lines first, else line breaks, else groups of at most 5 sentences."""
    text = f"{_sentences(3, 'A')}\n\n{_sentences(1, 'B')}\n\n{_sentences(1, 'C')}\n\n{_sentences(12, 'D')}"
    assert [len(p) for p in split_paragraphs(text)] == [3, 2, 6, 6]
    assert split_paragraphs(text)[1] == ["B0 is a sentence.", "C0 is a sentence."]
    assert [len(p) for p in split_paragraphs(f"{_sentences(2)}\n{_sentences(3)}\n{_sentences(2)}")] == [2, 3, 2]
    assert [len(p) for p in split_paragraphs(_sentences(12))] == [4, 4, 4]
    assert [len(p) for p in split_paragraphs(_sentences(4))] == [4]


def test_structure_layout():
    """p1 BREAK PLAN(p2) p2 BREAK: the extractive plan is the paragraph's most central sentence."""
    g = torch.Generator().manual_seed(0)
    paragraphs = [["a1", "a2"], ["b1", "b2", "b3"]]
    emb = torch.randn(5, 8, generator=g)
    emb[3] = emb[2] + emb[4]  # b2 sits between b1 and b3: the most central
    brk = torch.full((8,), 7.0)
    out = structure(paragraphs, emb, brk)
    assert out.roles.tolist() == [SENTENCE, SENTENCE, BREAK, PLAN, SENTENCE, SENTENCE, SENTENCE, BREAK]
    assert out.texts == ["a1", "a2", BREAK_TEXT, "b2", "b1", "b2", "b3", BREAK_TEXT]
    assert central_sentence(emb[2:]) == 1 and torch.equal(out.embeddings[3], emb[3])
    assert torch.equal(out.embeddings[2], brk) and torch.equal(out.embeddings[7], brk)
    plans = structure(paragraphs, emb, brk, (["plan a", "plan b"], torch.zeros(2, 8)))
    assert plans.texts[3] == "plan b" and not plans.embeddings[3].any()
    with pytest.raises(ValueError, match="1 plans for 2 paragraphs"):
        structure(paragraphs, emb, brk, (["plan a"], torch.zeros(1, 8)))
    # the mean plan: the paragraph's mean direction at its sentences' mean norm, shown as its central sentence
    mean = structure(paragraphs, emb, brk, plan_source="mean")
    plan = mean.embeddings[3]
    torch.testing.assert_close(F.normalize(plan, dim=0), F.normalize(emb[2:].mean(0), dim=0))
    torch.testing.assert_close(plan.norm(), emb[2:].norm(dim=-1).mean())
    assert mean.texts[3] == "b2" and torch.equal(mean.embeddings[:3], out.embeddings[:3])
    with pytest.raises(ValueError, match="unknown computed plan source 'llm'"):
        structure(paragraphs, emb, brk, plan_source="llm")


@pytest.fixture(scope="module")
def encoder():
    return load_encoder("minilm")


def test_prepare_paragraphs(tmp_path, encoder):
    """Shards with roles, the break stored with the dataset, a bank of the text's sentences only; user plans."""
    docs = [f"{_sentences(3, 'A')}\n\n{_sentences(4, 'B')}", _sentences(7, "C")]
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"text": d, "plans": ["p", "q"]}) + "\n" for d in docs))
    manifest = prepare([tmp_path / "docs.jsonl"], tmp_path / "out", encoder, paragraphs=True, progress=False)
    assert manifest["options"]["paragraphs"] and manifest["options"]["plan_source"] == "extractive"
    rows = pq.read_table(tmp_path / "out" / manifest["shards"][0]).to_pylist()
    assert rows[0]["roles"] == [0, 0, 0, 1, 2, 0, 0, 0, 0, 1] and rows[1]["roles"] == [0, 0, 0, 0, 1, 2, 0, 0, 0, 1]
    brk = torch.load(tmp_path / "out" / LPCM_FILE, weights_only=True)["break"]
    assert torch.allclose(torch.tensor(rows[0]["embeddings"][3]), brk, atol=1e-3)  # fp16 in the shard
    assert torch.allclose(brk, encoder.encode([BREAK_TEXT])[0])
    bank = RetrievalDecoder.load(tmp_path / "out" / "bank")
    assert len(bank) == 14 and BREAK_TEXT not in bank.sentences
    (tmp_path / "planned.jsonl").write_text(json.dumps({"text": docs[0], "plans": ["p", "q"]}) + "\n")
    manifest = prepare([tmp_path / "planned.jsonl"], tmp_path / "text", encoder, paragraphs=True, plan_source="text",
                       progress=False)
    row = pq.read_table(tmp_path / "text" / manifest["shards"][0]).to_pylist()[0]
    assert row["sentences"][4] == "q" and torch.allclose(torch.tensor(row["embeddings"][4]), encoder.encode(["q"])[0],
                                                         atol=1e-3)
    manifest = prepare([tmp_path / "docs.jsonl"], tmp_path / "mean", encoder, paragraphs=True, plan_source="mean",
                       progress=False)
    row = pq.read_table(tmp_path / "mean" / manifest["shards"][0]).to_pylist()[0]
    paragraph = torch.tensor(row["embeddings"][5:9])  # B's sentences (fp16 in the shard)
    assert manifest["options"]["plan_source"] == "mean" and row["roles"] == rows[0]["roles"]
    assert F.cosine_similarity(torch.tensor(row["embeddings"][4]), paragraph.mean(0), dim=0) > 0.999
    with pytest.raises(DataError, match="document 1 has 1 paragraphs .blank-line separated. but 2 plan texts"):
        prepare([tmp_path / "docs.jsonl"], tmp_path / "bad", encoder, paragraphs=True, plan_source="text",
                plan_column="plans", progress=False)
    with pytest.raises(ValueError, match="unknown plan source 'llm'; expected one of"):
        prepare([tmp_path / "docs.jsonl"], tmp_path / "llm", encoder, paragraphs=True, plan_source="llm")
    (tmp_path / "x.txt").write_text("A text.\n")
    with pytest.raises(DataError, match="plan texts .--plan-source text. need .jsonl or .parquet"):
        prepare([tmp_path / "x.txt"], tmp_path / "txt", encoder, paragraphs=True, plan_source="text", progress=False)


def _lpcm_shard(path, n_docs: int = 6, dim: int = 24):
    g = torch.Generator().manual_seed(0)
    docs, roles = [], []
    for i in range(n_docs):
        r = torch.tensor([0, 0, 1, 2, 0, 0, 0, 1][: 5 + i % 4], dtype=torch.int8)
        docs.append(torch.randn(r.numel(), dim, generator=g))
        roles.append(r)
    write_documents(path, docs, roles=roles)
    return docs, roles


def test_roles_through_the_data_loader(tmp_path):
    docs, roles = _lpcm_shard(tmp_path / "s.parquet")
    read = [doc for _, doc in read_documents(tmp_path / "s.parquet", 24)]
    assert [d.roles.tolist() for d in read] == [r.tolist() for r in roles]
    batch = collate(read[:3])
    assert batch.roles.shape == batch.embeddings.shape[:2] and batch.roles[0, :5].tolist() == [0, 0, 1, 2, 0]
    # wrapped at max_sentences and with an end-of-text concept (a sentence): roles follow the concepts
    config = DataConfig(files=[str(tmp_path / "s.parquet")], dim=24, max_sentences=4, max_concepts=64, eot=torch.zeros(24))
    assert all(b.roles is not None and b.roles.shape == b.embeddings.shape[:2] for b in batches(config))
    assert sum(int((b.roles == 1).sum()) for b in batches(config)) == sum(int((r == 1).sum()) for r in roles)
    write_documents(tmp_path / "plain.parquet", docs)
    assert all(b.roles is None for b in batches(DataConfig(files=[str(tmp_path / "plain.parquet")], dim=24)))
    with pytest.raises(ValueError, match="one role per embedding"):
        write_documents(tmp_path / "bad.parquet", docs[:1], roles=roles[1:2])
    for bad, found in (([0, 0, 1, 2], "4 roles for 5"), ([0, 0, 7, 2, 0], "5 roles for 5")):
        table = pq.read_table(tmp_path / "plain.parquet").slice(0, 1)
        pq.write_table(table.append_column("roles", pa.array([bad], type=pa.list_(pa.int8()))), tmp_path / "bad.parquet")
        with pytest.raises(DataError, match=f"row 0: roles must give one of 0 .sentence., 1 .break., 2 .plan. per "
                                            f"embedding: {found} embeddings"):
            list(read_documents(tmp_path / "bad.parquet", 24))


def test_structure_loss_weight(tmp_path):
    """The loss with weight w is the sentence targets' loss + w x the break and plan targets' loss."""
    _lpcm_shard(tmp_path / "s.parquet")
    batch = next(batches(DataConfig(files=[str(tmp_path / "s.parquet")], dim=24)))
    torch.manual_seed(0)
    model = lcm_fast.build_model(tiny_config("one_tower_diffusion_lcm")).eval()
    loss = {w: diffusion_loss(model, batch, torch.Generator().manual_seed(1), structure_weight=w)[0].item()
            for w in (0.0, 1.0, 3.0)}
    assert loss[0.0] < loss[1.0] and loss[3.0] == pytest.approx(loss[0.0] + 3 * (loss[1.0] - loss[0.0]), rel=1e-5)


def test_train_lpcm_needs_structured_data(tmp_path):
    _lpcm_shard(tmp_path / "s.parquet")
    write_documents(tmp_path / "plain.parquet", [torch.randn(5, 24)])
    model = lcm_fast.build_model(tiny_config("one_tower_diffusion_lcm"))
    config = TrainConfig(variant="lpcm", steps=2, out_dir=str(tmp_path / "run"), save_every=0, structure_loss_weight=2.0)
    with pytest.raises(ValueError, match="lacks: prepare it with lcm-fast prepare --paragraphs"):
        Trainer(model, config, DataConfig(files=[str(tmp_path / "plain.parquet")], dim=24))
    with pytest.raises(TypeError, match="variant 'lpcm' trains a OneTowerLCM"):
        Trainer(lcm_fast.build_model(tiny_config("two_tower_diffusion_lcm")), config,
                DataConfig(files=[str(tmp_path / "s.parquet")], dim=24))
    Trainer(model, config, DataConfig(files=[str(tmp_path / "s.parquet")], dim=24)).train(progress=False)


def test_concept_roles():
    """A break where the cosine reaches the threshold, the next concept its plan, unless a break itself."""
    brk = torch.tensor([1.0, 0.0, 0.0])
    seq = torch.tensor([[0, 1, 0], [2, 0.1, 0], [0, 0, 1], [1, 0, 0], [1, 0.01, 0], [0, 1, 1]], dtype=torch.float32)
    assert concept_roles(seq, brk, 0.9).tolist() == [SENTENCE, BREAK, PLAN, BREAK, BREAK, PLAN]
    assert concept_roles(seq, brk, 1.0).tolist() == [SENTENCE, SENTENCE, SENTENCE, BREAK, PLAN, SENTENCE]


class _Identity:
    """An encoder/decoder pair on raw vectors: the text is the vector's index in ``bank``."""

    dim = 24

    def __init__(self, bank):
        self.bank = bank

    def encode(self, sentences, **_):
        return torch.stack([self.bank[int(s.split()[1].rstrip("."))] for s in sentences])

    def decode(self, embeddings):
        return [f"Vector {int(torch.cdist(e[None], self.bank).argmin())}" for e in embeddings]


def test_generation_labels_breaks_and_plans(tmp_path):
    """With a break_vec the output labels every concept; sentences() and continue_text leave breaks and plans out
    (the concepts are the same as without it)."""
    torch.manual_seed(0)
    model = lcm_fast.build_model(tiny_config("one_tower_diffusion_lcm")).eval()
    g = torch.Generator().manual_seed(3)
    prompt = torch.randn(1, 3, 24, generator=g)
    # an untrained model's concepts are alike (cosines up to 0.96): a threshold that singles out the break itself
    options = lcm_fast.GenerationOptions(seed=0, inference_timesteps=4, break_threshold=0.99)
    plain = lcm_fast.generate(model, prompt, max_gen_len=5, options=options)
    assert plain.roles is None
    brk = plain.sequences[0][4].clone()  # make the second generated concept "the break"
    out = lcm_fast.generate(model, prompt, max_gen_len=5, options=options, break_vec=brk)
    assert torch.equal(out.sequences[0], plain.sequences[0])
    assert out.roles[0].tolist()[3:6] == [SENTENCE, BREAK, PLAN]
    assert torch.equal(out.sentences(0), plain.sequences[0][out.roles[0] == SENTENCE])
    bank = plain.sequences[0]
    io = _Identity(bank)
    result = continue_text("Vector 0. Vector 1. Vector 2.", model, io, io, n_sentences=5, options=options, break_vec=brk)
    assert result["roles"] == ["sentence", "break", "plan", "sentence", "sentence"]
    assert [s["text"] for s in result["sentences"]] == ["Vector 3", "Vector 6", "Vector 7"]
    assert result["plans"] == ["Vector 5"]
    torch.save({"break": brk}, tmp_path / "lpcm.pt")
    assert torch.equal(load_break(tmp_path / "lpcm.pt"), brk)
    with pytest.raises(ValueError, match="is not the lpcm.pt of `lcm-fast prepare --paragraphs`"):
        load_break(tmp_path / "missing.pt")
    with pytest.raises(ValueError, match=r"break_threshold must be a cosine in \[-1, 1\]"):
        lcm_fast.GenerationOptions(break_threshold=1.5)
    with pytest.raises(ValueError, match=r"break_vec must have shape \[24\]"):
        lcm_fast.generate(model, prompt, max_gen_len=2, options=options, break_vec=torch.zeros(5))


def test_the_ablation_runs_end_to_end(tmp_path, capsys):
    """`lcm-fast repro --lpcm --quick`: both models trained on the same sentences (the LPCM's data with its breaks
    and plans), scored on sentences only, the coherence proxy beside the real continuations' (about 10 s)."""
    from lcm_fast.cli.__main__ import main

    main(["repro", "--lpcm", "--quick", "--out", str(tmp_path)])
    results = json.loads((tmp_path / "lpcm.json").read_text())
    for name in ("One-Tower", "LPCM", "LPCM, mean plans"):
        assert set(results[name]) == {"l2", "par", "ca", "local", "topic", "structure_concepts"}
        assert all(v == v for v in results[name].values())  # no NaN
    for name in ("One-Tower + beam 4x2, consistency", "LPCM + beam 4x2, consistency", "LPCM + beam 4x2, plan",
                 "LPCM, mean plans + beam 4x2, plan"):
        assert set(results[name]) == {"local", "topic", "structure_concepts"}
    assert "One-Tower + beam 4x2, plan" not in results  # the plan scorer needs the LPCM's breaks
    plain = pq.read_table(next((tmp_path / "data" / "train-plain").glob("*.parquet"))).to_pylist()
    structured = pq.read_table(next((tmp_path / "data" / "train").glob("*.parquet"))).to_pylist()
    assert [r["sentences"] for r in plain] == [[s for s, k in zip(r["sentences"], r["roles"]) if k == 0] for r in structured]
    assert any(1 in r["roles"] for r in structured)
    out = capsys.readouterr().out
    assert "| LPCM |" in out and "| LPCM + beam 4x2, plan |  | | |" in out
