"""``lcm-fast`` as a new user meets it: a bad input is one message on stderr and exit status 2 (no traceback,
unless --debug); training says what it does, and the same command twice gives the same checkpoints.

The catalogue below lists each bad input with the message it must get."""

from __future__ import annotations

import glob
import json
import re
import shlex
from pathlib import Path
from typing import Callable

import pytest
import torch
from safetensors.torch import load_file

import lcm_fast
from lcm_fast.cli.__main__ import main
from lcm_fast.nn.normalizer import SonarNormalizer
from lcm_fast.text import RetrievalDecoder
from lcm_fast.training import Trainer, write_documents

DIM = 24
# a tiny Two-Tower (the toy arch's 1024-d stacks take minutes on CPU) and a quick schedule
CONFIG = ("model: {model_dim: 16, max_seq_len: 32, context_encoder: {num_layers: 1, num_attn_heads: 2, "
          "ffn_inner_dim: 32}, denoiser: {num_layers: 1, num_attn_heads: 2, ffn_inner_dim: 32, timestep_embed_dim: 16}}\n"
          "train: {warmup_steps: 1, save_every: 2, log_every: 1}\n"
          "data: {max_concepts: 48, max_sentences: 16}\n")


@pytest.fixture
def run(tmp_path) -> Callable[..., list[str]]:
    """run(*train flags) -> the argv of `lcm-fast train` on tiny data with the tiny config."""
    g = torch.Generator().manual_seed(0)
    write_documents(tmp_path / "train.parquet", [torch.randn(6, DIM, generator=g) for _ in range(4)])
    (tmp_path / "cfg.yaml").write_text(CONFIG)

    def argv(*flags: str, out: str = "run") -> list[str]:
        return ["train", "--variant", "two_tower", "--data", str(tmp_path / "train.parquet"), "--config",
                str(tmp_path / "cfg.yaml"), "--out", str(tmp_path / out), *flags]

    return argv


def _fails(argv: list[str], capsys) -> str:
    """Runs the CLI, which must exit with status 2 and no traceback; -> its stderr."""
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "Traceback" not in err, err
    return err


def _yaml(tmp_path: Path, text: str) -> str:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    return str(path)


#: (what the user does, the flags added to a valid `train` call, the message they must see)
TRAIN_CATALOGUE = [
    ("zero steps", ["--steps", "0"], r"steps must be >= 1 \(optimizer steps to train\), got 0"),
    ("negative steps", ["--steps", "-5"], r"steps must be >= 1 \(optimizer steps to train\), got -5"),
    ("--resume must without a checkpoint", ["--resume", "must"],
     r"no complete checkpoint in .*run/checkpoints to resume from"),
    ("a missing --config file", ["--config", "/nonexistent/cfg.yaml"], r"No such file or directory: '/nonexistent/cfg.yaml'"),
    ("a learning rate that is no number", ["--config", "{lr_abc}"], r"config key 'lr' expects float, got 'abc' \(str\)"),
    ("a model dim other than the data's", ["--config", "{dim_25}"],
     r"--data holds 24-d embeddings \(.*train.parquet\) but model.sonar_embed_dim in .*bad.yaml say\(s\) 25"),
    ("an unknown model field", ["--config", "{unknown}"], r"unknown config key 'model_dims' for TwoTowerConfig"),
    ("--out under a regular file", ["--out", "{file}/run"], r"--out .*cfg.yaml/run: .*cfg.yaml is a file, not a directory"),
]


@pytest.mark.parametrize("flags,message", [case[1:] for case in TRAIN_CATALOGUE], ids=[c[0] for c in TRAIN_CATALOGUE])
def test_train_input_errors(run, tmp_path, capsys, flags, message):
    configs = {"{lr_abc}": "train: {lr: abc}\n", "{dim_25}": "model: {sonar_embed_dim: 25}\n",
               "{unknown}": "model: {model_dims: 16}\n"}
    flags = [_yaml(tmp_path, configs[f]) if f in configs else f.replace("{file}", str(tmp_path / "cfg.yaml"))
             for f in flags]
    err = _fails(run(*flags), capsys)
    assert err.startswith("lcm-fast train: error: ") and len(err.strip().splitlines()) == 1, err
    assert re.search(message, err), err


def test_resume_beyond_the_requested_steps_is_an_error(run, capsys):
    main(run("--steps", "3"))
    capsys.readouterr()
    err = _fails(run("--steps", "2", "--resume"), capsys)
    assert "checkpoints/step_3 is at step 3 and steps=2: nothing to train; raise steps (--steps) above 3" in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="the error of a machine without CUDA")
def test_cuda_device_without_cuda(run, capsys):
    err = _fails(run("--device", "cuda"), capsys)
    assert "--device cuda: this torch has no usable CUDA device" in err and "use --device cpu" in err


def test_debug_shows_the_traceback(run):
    with pytest.raises(ValueError, match="steps must be >= 1"):
        main(["--debug", *run("--steps", "0")])


def test_generate_rejects_bad_flags_before_any_work(capsys):
    err = _fails(["generate", "--guidance", "nan", "Some text."], capsys)
    assert "GenerationOptions.guidance_scale must be a finite number, got nan" in err
    assert "--sentences must be >= 1, got 0" in _fails(["generate", "--sentences", "0", "Some text."], capsys)


def test_fit_rvq_faiss_with_fewer_vectors_than_dims(tmp_path, capsys, faiss):
    write_documents(tmp_path / "few.parquet", [torch.randn(6, DIM) for _ in range(4)])
    err = _fails(["fit-rvq", "--data", str(tmp_path / "few.parquet"), "--backend", "faiss", "--codebooks", "2",
                  "--size", "4", "--out", str(tmp_path / "rq.safetensors")], capsys)
    assert "progressive-dim training (a PCA) needs at least d = 24 vectors, got 22" in err  # 24 less the held-out tenth


def test_train_says_what_it_does_and_reproduces(run, tmp_path, capsys):
    """A fresh run logs a line per log_every step when stderr is not a terminal, and ends with what it wrote;
    --resume says what it found; the same command twice gives bit-identical checkpoints (initial weights,
    dropout and batches all come from train.seed). The YAML's `lr: 1e-3` (a string to YAML 1.1) is a float."""
    (tmp_path / "cfg.yaml").write_text(CONFIG.replace("log_every: 1", "log_every: 1, lr: 1e-3"))
    main(run("--steps", "3", "--resume"))
    captured = capsys.readouterr()
    assert "no checkpoint in" in captured.err and "starting from step 0" in captured.err
    assert "train two_tower step 3/3: loss" in captured.err and "lr " in captured.err
    assert "trained to step 3; latest checkpoint" in captured.out
    main(run("--steps", "4", "--resume"))
    assert "resuming from" in capsys.readouterr().err
    main(run("--steps", "3", out="again"))
    first, second = (load_file(tmp_path / name / "checkpoints/step_3/model.safetensors") for name in ("run", "again"))
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    lr = [json.loads(line)["lr"] for line in (tmp_path / "again/metrics.jsonl").read_text().splitlines()]
    assert max(lr) == pytest.approx(1e-3)
    assert Trainer.latest_checkpoint(tmp_path / "run").name == "step_4"


def test_train_builds_the_model_for_the_datas_dim(tmp_path, capsys):
    """Data prepared with a 384-d encoder trains without a model section: the model takes the data's dim."""
    g = torch.Generator().manual_seed(0)
    write_documents(tmp_path / "shard.parquet", [torch.randn(5, 40, generator=g) for _ in range(3)])
    (tmp_path / "cfg.yaml").write_text("model: {model_dim: 16, lcm: {num_layers: 1, num_attn_heads: 2, "
                                       "ffn_inner_dim: 32}}\ndata: {max_concepts: 48, max_sentences: 16}\n")
    main(["train", "--variant", "base", "--data", str(tmp_path / "shard.parquet"), "--out", str(tmp_path / "run"),
          "--steps", "1", "--config", str(tmp_path / "cfg.yaml")])
    model = lcm_fast.from_pretrained(tmp_path / "run/checkpoints/step_1")
    assert model.sonar_dim == 40


def test_the_readme_own_data_path_end_to_end(tmp_path, monkeypatch, capsys):
    """prepare -> fit-normalizer -> train -> eval -> generate: the README's block, run line by line with its exact
    flags (the shell's globbing done here), on 24 Jargon File entries (about 40 s on a 2-core CPU)."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = readme.split("Your own data, end to end", 1)[1].split("```bash\n", 1)[1].split("```", 1)[0]
    lines = [shlex.split(line) for line in block.strip().splitlines()]
    assert [line[1] for line in lines] == ["prepare", "fit-normalizer", "train", "eval", "generate"]
    source = Path(lcm_fast.__file__).parent / "data/jargon/jargon.jsonl"
    monkeypatch.chdir(tmp_path)
    Path("docs.jsonl").write_text("".join(source.read_text().splitlines(keepends=True)[:24]))
    for line in lines:
        assert line[0] == ".venv/bin/lcm-fast"
        main([match for arg in line[1:] for match in (sorted(glob.glob(arg)) if "*" in arg else [arg])])
    out = capsys.readouterr().out
    assert "teacher_forced: l2=" in out and "generation: rouge_l=" in out
    assert [p.name for p in Trainer.complete_checkpoints("run")] == ["step_100"]
    assert lcm_fast.from_pretrained("run/checkpoints/step_100").sonar_dim == 384  # the data's (MiniLM) dim


def test_resume_into_another_model_or_from_a_broken_checkpoint(run, tmp_path, capsys):
    main(run("--steps", "2"))
    (tmp_path / "cfg.yaml").write_text(CONFIG.replace("context_encoder: {num_layers: 1", "context_encoder: {num_layers: 2"))
    err = _fails(run("--steps", "4", "--resume"), capsys)
    assert "step_2 was trained with another model config (context_encoder: {'num_layers': 1" in err
    assert "-> {'num_layers': 2" in err and "new --out" in err
    (tmp_path / "cfg.yaml").write_text(CONFIG)
    state = tmp_path / "run/checkpoints/step_2/trainer_state.pt"
    state.write_bytes(state.read_bytes()[:1000])
    err = _fails(run("--steps", "4", "--resume"), capsys)
    assert "step_2/trainer_state.pt: not a readable trainer state" in err and "earlier checkpoint" in err


def test_normalizer_of_another_dim(run, tmp_path, capsys):
    SonarNormalizer.fit(torch.randn(100, DIM + 1)).save(tmp_path / "norm.pt")
    err = _fails(run("--normalizer", str(tmp_path / "norm.pt")), capsys)
    assert "is fitted on 25-d embeddings, the model takes 24-d ones: fit it on this data" in err


def test_eval_with_nothing_to_score(run, tmp_path, capsys):
    main(run("--steps", "2"))
    model = str(tmp_path / "run/checkpoints/step_2")
    RetrievalDecoder(["a.", "b."], torch.randn(2, DIM)).save(tmp_path / "bank")
    flags = ["eval", "--model", model, "--data", str(tmp_path / "train.parquet"), "--decoder", str(tmp_path / "bank")]
    assert "--max-docs must be >= 1, got 0" in _fails([*flags, "--max-docs", "0"], capsys)
    err = _fails(flags, capsys)
    assert "--encoder minilm gives 384-d embeddings, the model takes 24-d ones: pass the encoder its data" in err
    from lcm_fast.text.evaluate import evaluate

    with pytest.raises(ValueError, match=r"no document has more than 6 sentences \(the prompt and one to compare"):
        evaluate(lcm_fast.from_pretrained(model), [str(tmp_path / "train.parquet")], prompt_sentences=6,
                 decoder=RetrievalDecoder.load(tmp_path / "bank"))  # the documents have 6 sentences
