"""Quant-LCM-D and -C: the loss, training with the trainer, generation, sampling, files, errors."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import lcm_fast
from lcm_fast.inference import ReplayNoise, TorchNoise
from lcm_fast.models.quant_lcm import sample_units
from lcm_fast.quant import ResidualQuantizer
from lcm_fast.training import TrainConfig, Trainer
from lcm_fast.training.data import sample_embeddings

from ..conftest import tiny_config
from .test_trainer import DIM, _dataset, _losses, teacher_forced_ca

VARIANTS = {"quant_d": "discrete", "quant_c": "continuous"}


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """The trainer tests' documents and 4 x 16 RVQ codebooks fitted on their sentences."""
    data = _dataset(tmp_path_factory.mktemp("quant") / "train.parquet")
    sentences = sample_embeddings([(data.files[0], 1.0)], DIM, 10_000)
    return data, ResidualQuantizer(DIM, 4, 16).train(sentences, progress=False)


def _model(variant: str, rq: ResidualQuantizer, seed: int = 0):
    torch.manual_seed(seed)
    return lcm_fast.build_model(tiny_config("quant_lcm", target=VARIANTS[variant])).set_codebooks(rq.codebooks)


@pytest.mark.parametrize("variant,factor,min_ca", [("quant_d", 1.25, 0.5), ("quant_c", 1.5, 0.7)])
def test_variant_learns_and_generates(tmp_path, toy, variant, factor, min_ca):
    data, rq = toy
    cfg = TrainConfig(variant=variant, steps=300, lr=3e-3, warmup_steps=10, weight_decay=0.0, log_every=1,
                      save_every=1000, out_dir=str(tmp_path / "run"))
    model = Trainer(_model(variant, rq), cfg, data).train()
    losses = _losses(tmp_path / "run")
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert last * factor < first, (first, last)
    # teacher-forced predictions (greedy units, CFG as in the paper) beat chance on contrastive accuracy
    assert teacher_forced_ca(model, data, guidance_scale=2.0) > min_ca
    # the checkpoint (weights + codebooks) reloads and generates sums of M centroids
    again = lcm_fast.from_pretrained(tmp_path / "run/checkpoints/step_300")
    assert torch.equal(again.rvq_codebooks, rq.codebooks)
    options = lcm_fast.GenerationOptions(seed=0, top_k=3, guidance_scale=1.5)
    out = lcm_fast.generate(again, torch.randn(2, 3, DIM), max_gen_len=2, options=options)
    assert out.lengths.tolist() == [5, 5]
    generated = torch.cat([s[3:] for s in out.sequences])
    assert torch.allclose(rq.decode(rq.encode(generated)), generated, atol=1e-5)


def test_generation_is_reproducible_and_replayable(toy):
    _, rq = toy
    model = _model("quant_d", rq).eval()
    prompts = torch.randn(3, 4, DIM)
    seq_lens = torch.tensor([4, 2, 3])  # ragged: teacher-forced rows are not sampled
    options = lcm_fast.GenerationOptions(seed=5, top_k=4, top_p=0.9, lcm_temperature=1.0, guidance_scale=2.0)
    a = lcm_fast.generate(model, prompts, seq_lens, max_gen_len=3, options=options)
    b = lcm_fast.generate(model, prompts, seq_lens, max_gen_len=3, options=options)
    assert all(torch.equal(x, y) for x, y in zip(a.sequences, b.sequences))
    # every random draw goes through the noise source ([B, K] normals per codebook and sentence):
    # replaying the recorded draws reproduces the output, other draws change it
    recorded = []

    class Recording(TorchNoise):
        def randn(self, shape, *, site, device):
            assert site == "unit_sample" and shape[1] == 16
            recorded.append(super().randn(shape, site=site, device=device))
            return recorded[-1]

    lcm_fast.generate(model, prompts, seq_lens, max_gen_len=3, options=options, noise=Recording(5))
    c = lcm_fast.generate(model, prompts, seq_lens, max_gen_len=3, options=options, noise=ReplayNoise(recorded))
    assert all(torch.equal(x, y) for x, y in zip(a.sequences, c.sequences))
    e = lcm_fast.generate(model, prompts, seq_lens, max_gen_len=3, options=options, noise=TorchNoise(6))
    assert not all(torch.equal(x, y) for x, y in zip(a.sequences, e.sequences))
    greedy = lcm_fast.GenerationOptions(top_k=1)
    d = lcm_fast.generate(model, prompts, seq_lens, max_gen_len=3, options=greedy, noise=ReplayNoise([]))
    assert [s.shape[0] for s in d.sequences] == [7, 5, 6]


def test_loss_uses_every_codebook_index(toy):
    """quant_loss: k is uniform in 1..M; the input of index k-1 is the sum of the first k-1 centroids."""
    _, rq = toy
    model = _model("quant_c", rq)
    x = torch.randn(5, DIM)
    codes = model.quantize(x)
    assert torch.equal(codes, rq.encode(x).long())
    assert model.rvq_tables() is model.rvq_tables()  # made once while the codebooks stay
    for k in range(5):
        want = rq.decode(codes, k) if k else torch.zeros(5, DIM)
        assert torch.allclose(model.intermediate(codes, torch.full((5,), k)), want, atol=1e-6)


def test_quantize_follows_new_codebooks(toy):
    """Codes come from the codebooks installed now, also after an in-place update, with many enough rows
    for the candidate search where the CPU has it."""
    _, rq = toy
    model = _model("quant_d", rq)
    x = torch.randn(4096, DIM, generator=torch.Generator().manual_seed(0))
    assert torch.equal(model.quantize(x), rq.encode(x, search="exact").long())
    other = ResidualQuantizer.from_codebooks(rq.codebooks.flip(1))
    model.set_codebooks(other.codebooks)
    assert torch.equal(model.quantize(x), other.encode(x, search="exact").long())


def test_sample_units():
    scores = torch.tensor([[0.0, 3.0, 1.0, 2.0]]).repeat(20000, 1)
    assert sample_units(scores, 1.0, 1, 1.0).eq(1).all()
    normals = torch.randn(20000, 4, generator=torch.Generator().manual_seed(0))
    drawn = sample_units(scores, 1.0, 0, 1.0, normals)
    freq = torch.bincount(drawn, minlength=4).float() / drawn.numel()
    assert torch.allclose(freq, scores[0].softmax(0), atol=0.015)  # Gumbel-max = softmax sampling
    top2 = sample_units(scores, 1.0, 2, 1.0, normals)
    assert set(top2.unique().tolist()) == {1, 3}
    nucleus = sample_units(scores, 1.0, 0, 0.5, normals)  # p(1) = 0.64 >= 0.5: only unit 1
    assert nucleus.eq(1).all()
    with pytest.raises(ValueError, match="standard-normal"):
        sample_units(scores, 1.0, 3, 1.0)


def test_errors(tmp_path, toy):
    data, rq = toy
    model = lcm_fast.build_model(tiny_config("quant_lcm"))
    with pytest.raises(ValueError, match="no RVQ codebooks"):
        Trainer(model, TrainConfig(variant="quant_d", out_dir=str(tmp_path)), data)
    with pytest.raises(ValueError, match="target='continuous'"):
        Trainer(_model("quant_d", rq), TrainConfig(variant="quant_c", out_dir=str(tmp_path)), data)
    with pytest.raises(ValueError, match=r"the Quant-LCM has no RVQ codebooks: .* model.set_codebooks\("):
        lcm_fast.generate(lcm_fast.build_model(tiny_config("quant_lcm")), torch.randn(1, 2, DIM), max_gen_len=1)
    with pytest.raises(ValueError, match="do not fit this Quant-LCM"):
        model.set_codebooks(torch.zeros(4, 8, DIM))
    with pytest.raises(ValueError, match="target must be"):
        lcm_fast.build_model(tiny_config("quant_lcm", target="mixed"))


@pytest.mark.parametrize("backend", ["torch", "faiss"])
def test_cli_fit_rvq_then_train(tmp_path, backend):
    """`lcm-fast fit-rvq` writes codebooks and a per-prefix error summary; `train --variant quant_d --rvq`
    takes the quantizer shape from them."""
    _dataset(tmp_path / "train.parquet")
    rvq = tmp_path / "rvq.safetensors"
    fit = subprocess.run([sys.executable, "-m", "lcm_fast.cli", "fit-rvq", "--data", str(tmp_path / "train.parquet"),
                          "--dim", str(DIM), "--codebooks", "4", "--size", "16", "--backend", backend,
                          "--out", str(rvq)], check=True, capture_output=True, text=True)
    assert "k=1" in fit.stdout and "k=4" in fit.stdout
    errors = [float(line.split()[-1]) for line in fit.stdout.splitlines() if line.strip().startswith("k=")]
    assert errors == sorted(errors, reverse=True) and errors[-1] < 1.0
    config = tmp_path / "cfg.yaml"
    config.write_text("model: {model_dim: 16, max_seq_len: 32, codebook_embed_dim: 8, "
                      "lcm: {num_layers: 1, num_attn_heads: 2, ffn_inner_dim: 32}}\n"
                      "train: {warmup_steps: 1, save_every: 2, log_every: 1}\n")
    subprocess.run([sys.executable, "-m", "lcm_fast.cli", "train", "--variant", "quant_d", "--data",
                    str(tmp_path / "train.parquet"), "--config", str(config), "--rvq", str(rvq), "--steps", "2",
                    "--out", str(tmp_path / "run")], check=True, capture_output=True)
    model = lcm_fast.from_pretrained(tmp_path / "run/checkpoints/step_2")
    assert model.config.target == "discrete" and (model.config.n_codebooks, model.config.codebook_size) == (4, 16)
    assert torch.equal(model.rvq_codebooks, ResidualQuantizer.load(rvq).codebooks)
    missing = subprocess.run([sys.executable, "-m", "lcm_fast.cli", "train", "--variant", "quant_c", "--data",
                              str(tmp_path / "train.parquet"), "--out", str(tmp_path / "x")],
                             capture_output=True, text=True)
    assert missing.returncode != 0 and "needs --rvq" in missing.stderr
