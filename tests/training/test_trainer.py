"""The trainer: variants learn, checkpoints are atomic, and a resumed run equals an uninterrupted one."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import lcm_fast
from lcm_fast.training import DataConfig, TrainConfig, Trainer, write_documents
from lcm_fast.training.data import sample_embeddings

from ..conftest import tiny_config

DIM = 24
STEPS = 400
CA_THRESHOLD = 0.7  # chance is 0.5 (teacher-forced predictions of the training documents after 400 steps)


def _dataset(path, n_docs=16, seed=0):
    """Documents following x_{i+1} = A x_i (+ small noise): a next-concept rule worth learning."""
    g = torch.Generator().manual_seed(seed)
    A = torch.linalg.qr(torch.randn(DIM, DIM, generator=g))[0]
    docs = []
    for _ in range(n_docs):
        x = [torch.randn(DIM, generator=g)]
        for _ in range(int(torch.randint(4, 9, (1,), generator=g))):
            x.append(A @ x[-1] + 0.01 * torch.randn(DIM, generator=g))
        docs.append(torch.stack(x))
    write_documents(path, docs)
    return DataConfig(files=[str(path)], dim=DIM, max_sentences=16, max_concepts=64, shuffle_buffer=8, seed=seed)


def _model(variant: str, seed: int = 0, dropout: float = 0.1):
    """A tiny model (dropout on by default, so that the resume tests cover the global RNG too)."""
    torch.manual_seed(seed)
    if variant == "base":
        return lcm_fast.build_model(tiny_config("base_lcm", lcm={"dropout_p": dropout}))
    if variant == "one_tower":
        return lcm_fast.build_model(tiny_config("one_tower_diffusion_lcm", lcm={"dropout_p": dropout}))
    return lcm_fast.build_model(tiny_config("two_tower_diffusion_lcm", context_encoder={"dropout_p": dropout}))


def _cli_config(path, model: str) -> str:
    """A YAML --config for the CLI tests: tiny ``model`` fields, quick schedule, small batches."""
    path.write_text(f"model: {{sonar_embed_dim: {DIM}, model_dim: 16, max_seq_len: 32, {model}}}\n"
                    "train: {warmup_steps: 1, save_every: 2, log_every: 1}\n"
                    "data: {max_concepts: 48, max_sentences: 16}\n")
    return str(path)


def _losses(out_dir):
    lines = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return [line["loss"] for line in lines if "loss" in line]


# factors measured from the official initialisation (build_model's): Base-LCM 4.8x, where PyTorch's defaults gave > 5x
@pytest.mark.parametrize("variant,factor", [("base", 4.0), ("two_tower", 2.0), ("one_tower", 1.5)])
def test_variant_learns(tmp_path, variant, factor):
    data = _dataset(tmp_path / "train.parquet")
    cfg = TrainConfig(variant=variant, steps=STEPS, lr=3e-3, warmup_steps=10, weight_decay=0.0, log_every=1,
                      save_every=1000, out_dir=str(tmp_path / "run"))
    model = Trainer(_model(variant, dropout=0.0), cfg, data).train()  # 5-15 s each on the 2-core CI machine
    losses = _losses(tmp_path / "run")
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert last * factor < first, (first, last)
    # the final checkpoint is a native model that generates
    again = lcm_fast.from_pretrained(tmp_path / f"run/checkpoints/step_{STEPS}")
    ref, got = model.state_dict(), again.state_dict()
    assert all(torch.equal(ref[k], got[k]) for k in ref)
    out = lcm_fast.generate(again, torch.randn(2, 3, DIM), max_gen_len=2,
                            options=lcm_fast.GenerationOptions(inference_timesteps=5, seed=0))
    assert out.lengths.tolist() == [5, 5]
    # teacher-forced continuations of the training documents beat chance (0.5) on contrastive accuracy
    assert teacher_forced_ca(again, data, steps=10) > CA_THRESHOLD


def teacher_forced_ca(model, data, **options) -> float:
    """Contrastive accuracy of teacher-forced predictions on the first batch of ``data`` (positions >= 1)."""
    from lcm_fast.evaluation import contrastive_accuracy, teacher_forced_predictions
    from lcm_fast.training import batches

    batch = next(batches(data))
    pred = teacher_forced_predictions(model, batch.embeddings, batch.seq_lens, **options)
    valid = torch.arange(batch.embeddings.shape[1])[None, :] < batch.seq_lens[:, None]
    scored = valid.clone()
    scored[:, 0] = False
    return contrastive_accuracy(pred, batch.embeddings, scored, valid)


class _Interrupted(Exception):
    pass


def stopping_at(step: int) -> type[Trainer]:
    """A Trainer that dies right after writing the checkpoint of ``step`` (a killed run)."""

    class Stopping(Trainer):
        def save(self):
            path = super().save()
            if self.step == step:
                raise _Interrupted
            return path

    return Stopping


@pytest.mark.parametrize("variant", ["base", "two_tower", "one_tower"])
@pytest.mark.parametrize("accumulation", [1, 2])
def test_resume_is_exact(tmp_path, variant, accumulation):
    data = _dataset(tmp_path / "train.parquet", n_docs=6)

    def config(name):
        return TrainConfig(variant=variant, steps=12, lr=1e-3, warmup_steps=3, grad_accumulation=accumulation,
                           save_every=3, log_every=1, out_dir=str(tmp_path / name))

    full = Trainer(_model(variant), config("full"), data).train()

    with pytest.raises(_Interrupted):
        stopping_at(6)(_model(variant), config("resumed"), data).train()
    resumed = Trainer(_model(variant, seed=123), config("resumed"), data).train(resume=True)
    ref, got = full.state_dict(), resumed.state_dict()
    assert all(torch.equal(ref[k], got[k]) for k in ref)
    assert _losses(tmp_path / "full") == _losses(tmp_path / "resumed")


def test_resume_after_kill_signal(tmp_path):
    """A training process killed at an arbitrary moment resumes to the uninterrupted result."""
    script = f"""
import sys, torch
sys.path.insert(0, {os.getcwd()!r})
from tests.training.test_trainer import _model, _dataset
from lcm_fast.training import TrainConfig, Trainer
from pathlib import Path
data = _dataset(Path({str(tmp_path)!r}) / "train.parquet", n_docs=6)
cfg = TrainConfig(variant="two_tower", steps=150, lr=1e-3, warmup_steps=3, save_every=2, log_every=1,
                  out_dir=sys.argv[1])
Trainer(_model("two_tower"), cfg, data).train(resume=True, progress=False)
"""
    run = lambda name: [sys.executable, "-c", script, str(tmp_path / name)]
    subprocess.run(run("full"), check=True)
    proc = subprocess.Popen(run("killed"))
    deadline = time.time() + 60
    while Trainer.latest_checkpoint(tmp_path / "killed") is None and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = int(Trainer.latest_checkpoint(tmp_path / "killed").name.split("_")[1])
    assert 0 < killed_at < 150  # really interrupted mid-run
    subprocess.run(run("killed"), check=True)
    full = lcm_fast.from_pretrained(tmp_path / "full/checkpoints/step_150").state_dict()
    resumed = lcm_fast.from_pretrained(tmp_path / "killed/checkpoints/step_150").state_dict()
    assert all(torch.equal(full[k], resumed[k]) for k in full)


def test_bad_configuration(tmp_path):
    data = _dataset(tmp_path / "train.parquet", n_docs=2)
    with pytest.raises(ValueError, match="unknown variant 'quant'"):
        Trainer(_model("two_tower"), TrainConfig(variant="quant"), data)
    with pytest.raises(TypeError, match="variant 'one_tower' trains a OneTowerLCM"):
        Trainer(_model("two_tower"), TrainConfig(variant="one_tower"), data)
    with pytest.raises(TypeError, match="variant 'base' trains a BaseLCM"):
        Trainer(_model("two_tower"), TrainConfig(variant="base"), data)
    with pytest.raises(ValueError, match="unknown precision 'fp16'"):
        Trainer(_model("two_tower"), TrainConfig(precision="fp16"), data)
    with pytest.raises(ValueError, match="unknown parallel 'zero3'"):
        Trainer(_model("two_tower"), TrainConfig(parallel="zero3"), data)
    with pytest.raises(NotImplementedError, match="ema_decay with parallel='fsdp'"):
        Trainer(_model("two_tower"), TrainConfig(parallel="fsdp", ema_decay=0.99), data)
    with pytest.raises(ValueError, match=r"save_every must be >= 0 \(0: no checkpoints\), got -1"):
        Trainer(_model("two_tower"), TrainConfig(save_every=-1), data)


def test_keep_the_newest_checkpoints(tmp_path):
    data = _dataset(tmp_path / "train.parquet", n_docs=4)
    cfg = TrainConfig(variant="base", steps=5, warmup_steps=1, save_every=1, keep=2, out_dir=str(tmp_path / "run"))
    Trainer(_model("base"), cfg, data).train(progress=False)
    assert [p.name for p in Trainer.complete_checkpoints(tmp_path / "run")] == ["step_4", "step_5"]
    with pytest.raises(ValueError, match=r"keep must be >= 0 \(0: every checkpoint\), got -1"):
        Trainer(_model("base"), TrainConfig(variant="base", keep=-1), data)


def test_save_every_zero_writes_no_checkpoint(tmp_path):
    """A throughput run (the training benchmark) keeps nothing: a 1.6B checkpoint is ~19 GB."""
    data = _dataset(tmp_path / "train.parquet", n_docs=4)
    cfg = TrainConfig(variant="two_tower", steps=2, warmup_steps=1, save_every=0, out_dir=str(tmp_path / "run"))
    Trainer(_model("two_tower"), cfg, data).train(progress=False)
    assert not (tmp_path / "run/checkpoints").exists() and (tmp_path / "run/metrics.jsonl").is_file()


def test_bf16_autocast_keeps_fp32_state_and_resumes_exactly(tmp_path):
    """precision='bf16' (the CUDA default; 'auto' is fp32 on CPU): forward and loss in bf16 autocast,
    fp32 weights, gradients and optimizer state; the loss tracks the fp32 run's, falls, and resumes exactly."""
    data = _dataset(tmp_path / "train.parquet", n_docs=6)

    def config(name, precision="bf16"):
        return TrainConfig(variant="two_tower", steps=30, lr=1e-3, warmup_steps=3, save_every=10, log_every=1,
                           precision=precision, out_dir=str(tmp_path / name))

    assert not Trainer(_model("two_tower"), config("auto", "auto"), data).bf16
    trainer = Trainer(_model("two_tower"), config("full"), data)
    full = trainer.train()
    assert all(p.dtype == torch.float32 for p in full.parameters())
    assert all(v.dtype == torch.float32 for st in trainer.optimizer.state.values() for k, v in st.items() if k != "step")
    Trainer(_model("two_tower"), config("fp32", "fp32"), data).train()
    bf16, fp32 = _losses(tmp_path / "full"), _losses(tmp_path / "fp32")
    assert bf16 != fp32 and bf16[0] == pytest.approx(fp32[0], rel=0.05)
    # 13 % lower over 30 steps from the official init (AdaLN-zero layers start as the identity)
    assert sum(bf16[-5:]) < 0.9 * sum(bf16[:5]) and sum(bf16[-5:]) == pytest.approx(sum(fp32[-5:]), rel=0.01)
    with pytest.raises(_Interrupted):
        stopping_at(10)(_model("two_tower"), config("resumed"), data).train()
    resumed = Trainer(_model("two_tower", seed=123), config("resumed"), data).train(resume=True)
    assert all(torch.equal(full.state_dict()[k], v) for k, v in resumed.state_dict().items())
    assert _losses(tmp_path / "resumed") == bf16


def test_cli_train_and_resume(tmp_path):
    """`lcm-fast train` with a YAML config; a second call with --resume continues to more steps."""
    _dataset(tmp_path / "train.parquet", n_docs=4)
    config = _cli_config(tmp_path / "cfg.yaml", "context_encoder: {num_layers: 1, num_attn_heads: 2, ffn_inner_dim: 32}, "
                         "denoiser: {num_layers: 1, num_attn_heads: 2, ffn_inner_dim: 32, timestep_embed_dim: 16}")
    cli = [sys.executable, "-m", "lcm_fast.cli", "train", "--variant", "two_tower", "--data",
           str(tmp_path / "train.parquet"), "--config", config, "--out", str(tmp_path / "run")]
    first = subprocess.run(cli + ["--steps", "3"], check=True, capture_output=True, text=True)
    assert Trainer.latest_checkpoint(tmp_path / "run").name == "step_3"
    assert "no --normalizer: fitted one on" in first.stderr  # never centre 0 and scale 1 in silence
    subprocess.run(cli + ["--steps", "5", "--resume"], check=True, capture_output=True)
    assert Trainer.latest_checkpoint(tmp_path / "run").name == "step_5"
    assert [json.loads(l)["step"] for l in (tmp_path / "run/metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4, 5]
    model = lcm_fast.from_pretrained(tmp_path / "run/checkpoints/step_5")
    assert model.config.model_dim == 16
    data = sample_embeddings([(str(tmp_path / "train.parquet"), 1.0)], DIM, 10_000)
    assert torch.count_nonzero(model.normalizer.center) > 0  # fitted on the data
    assert model.normalizer.normalize(data).std().item() == pytest.approx(1.0, abs=0.3)
    help_text = subprocess.run([sys.executable, "-m", "lcm_fast.cli", "train", "--help"], check=True,
                               capture_output=True, text=True).stdout
    assert "--variant" in help_text and "lr=0.0004" in help_text


def test_validation_metrics_are_logged(tmp_path):
    data = _dataset(tmp_path / "train.parquet", n_docs=6)
    valid = _dataset(tmp_path / "valid.parquet", n_docs=4, seed=1)
    cfg = TrainConfig(variant="two_tower", steps=4, lr=1e-3, warmup_steps=1, save_every=100, log_every=1,
                      validate_every=2, valid_batches=2, valid_diffusion_steps=3, out_dir=str(tmp_path / "run"))
    Trainer(_model("two_tower"), cfg, data, valid).train()
    lines = [json.loads(l) for l in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    scored = [l for l in lines if l.get("split") == "valid"]
    assert [l["step"] for l in scored] == [2, 4]
    assert all(l["l2"] > 0 and 0 <= l["ca"] <= 1 and l["par"] > 0 for l in scored)
    # with tensorboard installed (requirements-dev), the same metrics go to its event files
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "run/tensorboard"))
    events.Reload()
    assert {"train/loss", "valid/ca"} <= set(events.Tags()["scalars"])
    assert [e.step for e in events.Scalars("valid/l2")] == [2, 4]
    with pytest.raises(ValueError, match="no validation data"):
        Trainer(_model("two_tower"), TrainConfig(validate_every=2), data)


def test_cli_fit_normalizer_then_train(tmp_path):
    _dataset(tmp_path / "a.parquet", n_docs=8)
    _dataset(tmp_path / "b.parquet", n_docs=4, seed=3)
    subprocess.run([sys.executable, "-m", "lcm_fast.cli", "fit-normalizer", "--data", f"{tmp_path / 'a.parquet'}:2",
                    str(tmp_path / "b.parquet"), "--dim", str(DIM), "--sample", "100", "--out",
                    str(tmp_path / "norm.pt")], check=True, capture_output=True)
    norm = lcm_fast.load_normalizer(tmp_path / "norm.pt")
    assert norm.dim == DIM and bool((norm.scale > 0).all())
    config = _cli_config(tmp_path / "cfg.yaml", "sonar_normalizer_name: fitted, "
                         "lcm: {num_layers: 1, num_attn_heads: 2, ffn_inner_dim: 32}")
    subprocess.run([sys.executable, "-m", "lcm_fast.cli", "train", "--variant", "base", "--data", str(tmp_path / "a.parquet"),
                    "--config", config, "--normalizer", str(tmp_path / "norm.pt"), "--steps", "2",
                    "--out", str(tmp_path / "run")], check=True, capture_output=True)
    model = lcm_fast.from_pretrained(tmp_path / "run/checkpoints/step_2")
    assert torch.equal(model.normalizer.center, norm.center)  # buffers are not trained


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_torchrun_matches_single_process(tmp_path, parallel):
    """2 CPU processes (gloo) training the same global batches as one process with 2 accumulated
    micro-batches per step end with the same weights; with FSDP2 the rank-0 validation and checkpoints
    gather the shards, and the checkpoint resumes in a single process like the single run's own."""
    _dataset(tmp_path / "train.parquet", n_docs=12)
    script = tmp_path / "train_script.py"
    script.write_text(f"""
import sys, torch, torch.distributed as dist
sys.path.insert(0, {os.getcwd()!r})
from tests.training.test_trainer import _model, DIM
from lcm_fast.training import DataConfig, TrainConfig, Trainer
mode, out, steps = sys.argv[1], sys.argv[2], int(sys.argv[3])
distributed = mode != "single"
if distributed:
    dist.init_process_group("gloo")
data = DataConfig(files=[{str(tmp_path / 'train.parquet')!r}], dim=DIM, max_sentences=16, max_concepts=24, shuffle_buffer=4)
cfg = TrainConfig(variant="two_tower", steps=steps, lr=1e-3, warmup_steps=1, save_every=5, log_every=1,
                  validate_every=5, valid_batches=1, valid_diffusion_steps=2,
                  grad_accumulation=1 if distributed else 2, parallel=mode if distributed else "ddp", out_dir=out)
Trainer(_model("two_tower", dropout=0.0), cfg, data, valid=data).train(resume=True, progress=False)
if distributed:
    dist.destroy_process_group()
""")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                               str(script), parallel, str(tmp_path / parallel), "5"], env=env, capture_output=True,
                              text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    subprocess.run([sys.executable, str(script), "single", str(tmp_path / "single"), "5"], check=True, env=env)
    launched = lcm_fast.from_pretrained(tmp_path / parallel / "checkpoints/step_5").state_dict()
    single = lcm_fast.from_pretrained(tmp_path / "single/checkpoints/step_5").state_dict()
    for k in single:
        torch.testing.assert_close(launched[k], single[k], atol=2e-6, rtol=1e-5, msg=k)
    assert _losses(tmp_path / parallel) == pytest.approx(_losses(tmp_path / "single"), rel=1e-5)
    valid = [json.loads(line) for line in (tmp_path / parallel / "metrics.jsonl").read_text().splitlines()
             if "valid" in line]
    assert len(valid) == 1 and {"l2", "ca", "par"} <= set(valid[0])
    if parallel == "fsdp":  # the sharded run's checkpoint (full weights, named optimizer state) resumes anywhere
        for name in ("fsdp", "single"):
            subprocess.run([sys.executable, str(script), "single", str(tmp_path / name), "7"], check=True, env=env)
        launched = lcm_fast.from_pretrained(tmp_path / "fsdp/checkpoints/step_7").state_dict()
        single = lcm_fast.from_pretrained(tmp_path / "single/checkpoints/step_7").state_dict()
        for k in single:
            torch.testing.assert_close(launched[k], single[k], atol=2e-6, rtol=1e-5, msg=k)


def test_cli_under_torchrun(tmp_path):
    _dataset(tmp_path / "train.parquet", n_docs=6)
    config = _cli_config(tmp_path / "cfg.yaml", "sonar_normalizer_name: n, "
                         "lcm: {num_layers: 1, num_attn_heads: 2, ffn_inner_dim: 32}")
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
                    "lcm_fast.cli", "train", "--variant", "base", "--data", str(tmp_path / "train.parquet"),
                    "--config", config, "--steps", "2", "--device", "cpu", "--parallel", "fsdp", "--precision", "bf16",
                    "--out", str(tmp_path / "run")], check=True, capture_output=True,
                   env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert Trainer.latest_checkpoint(tmp_path / "run").name == "step_2"
    assert len((tmp_path / "run/metrics.jsonl").read_text().splitlines()) == 2  # rank 0 logs alone
    state = torch.load(tmp_path / "run/checkpoints/step_2/trainer_state.pt", weights_only=True)
    assert state["config"]["parallel"] == "fsdp" and state["config"]["precision"] == "bf16"
    weights = lcm_fast.from_pretrained(tmp_path / "run/checkpoints/step_2").state_dict()  # full shapes, checked
    assert all(torch.isfinite(v).all() for v in weights.values())


def test_ema_tracks_weights_and_resumes_exactly(tmp_path):
    data = _dataset(tmp_path / "train.parquet", n_docs=6)

    def config(name, steps=8):
        return TrainConfig(variant="base", steps=steps, lr=1e-3, warmup_steps=2, save_every=4, log_every=1,
                           ema_decay=0.9, out_dir=str(tmp_path / name))

    model = _model("base", dropout=0.0)
    before = [p.detach().clone() for p in model.parameters()]
    trainer = Trainer(model, config("one", steps=1), data)
    trainer.train()
    for e, p0, p1 in zip(trainer.ema, before, model.parameters()):
        assert torch.allclose(e, 0.9 * p0 + 0.1 * p1.detach(), atol=1e-7)
    full = Trainer(_model("base"), config("full"), data)
    full.train()

    with pytest.raises(_Interrupted):
        stopping_at(4)(_model("base"), config("resumed"), data).train()
    resumed = Trainer(_model("base", seed=9), config("resumed"), data)
    resumed.train(resume=True)
    assert all(torch.equal(a, b) for a, b in zip(full.ema, resumed.ema))
    exported = lcm_fast.from_pretrained(tmp_path / "resumed/checkpoints/step_8/ema")
    assert all(torch.equal(a, b) for a, b in zip(exported.parameters(), resumed.ema))
    with pytest.raises(ValueError, match="ema_decay must be in"):
        Trainer(_model("base"), TrainConfig(variant="base", ema_decay=1.5), data)


def test_cli_eot_sentence_from_the_encoder(tmp_path):
    """--eot encodes the end-of-text sentence with the encoder and appends it to every document."""
    g = torch.Generator().manual_seed(0)
    write_documents(tmp_path / "d384.parquet", [torch.randn(4, 384, generator=g) for _ in range(4)])
    (tmp_path / "cfg.yaml").write_text("model: {sonar_embed_dim: 384, model_dim: 16, max_seq_len: 32, "
                                       "lcm: {num_layers: 1, num_attn_heads: 2, ffn_inner_dim: 32}}\n"
                                       "train: {warmup_steps: 1, save_every: 1, log_every: 1}\n")
    cli = [sys.executable, "-m", "lcm_fast.cli", "train", "--variant", "base", "--eot", "End of text.", "--steps", "1"]
    ok = subprocess.run(cli + ["--data", str(tmp_path / "d384.parquet"), "--config", str(tmp_path / "cfg.yaml"),
                               "--out", str(tmp_path / "run")], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    _dataset(tmp_path / "d24.parquet", n_docs=2)
    bad = subprocess.run(cli + ["--data", str(tmp_path / "d24.parquet"), "--config",
                                _cli_config(tmp_path / "c24.yaml", "lcm: {num_layers: 1, num_attn_heads: 2, ffn_inner_dim: 32}"),
                                "--out", str(tmp_path / "bad")], capture_output=True, text=True)
    assert bad.returncode != 0 and "gives 384-d embeddings but the model works on 24-d" in bad.stderr
