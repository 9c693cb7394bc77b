"""The catalogue of bad inputs: each gets a clear error that names what is wrong, where, and how to fix it.

Sections: generation inputs, checkpoints, generation options and configs (Python API), and the CLI (one
line on stderr, ``lcm-fast COMMAND: error: ...``, exit status 2, no traceback unless --debug). Each
catalogue is a table of (the bad input, the message it must get)."""

from __future__ import annotations

import copy
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

import lcm_fast
from lcm_fast import CheckpointError
from lcm_fast.cli.__main__ import main
from lcm_fast.nn.normalizer import SonarNormalizer
from lcm_fast.text import RetrievalDecoder
from lcm_fast.training import write_documents

from .conftest import CLI_CONFIG, CLI_DIM, random_model, tiny_config, write_official


@pytest.fixture(scope="module")
def two_tower():
    return random_model(tiny_config("two_tower_diffusion_lcm"))


@pytest.fixture(scope="module")
def base_lcm():
    return random_model(tiny_config("base_lcm"))


def _prompts(model, batch=2, length=4):
    return torch.randn(batch, length, model.sonar_dim)


# ---- generation inputs -----------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["two_tower", "base_lcm"])
def test_wrong_embedding_dim(family, request):
    model = request.getfixturevalue(family)
    with pytest.raises(ValueError, match=r"prompt embedding dim 25 does not match the model's sonar_embed_dim 24"):
        lcm_fast.generate(model, torch.randn(2, 3, 25), max_gen_len=1)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_prompt(two_tower, bad):
    prompts = _prompts(two_tower)
    prompts[1, 2, 5] = bad
    with pytest.raises(ValueError, match=r"NaN or inf at document 1, sentence 2"):
        lcm_fast.generate(two_tower, prompts, max_gen_len=1)


def test_non_finite_padding_is_ignored(base_lcm):
    prompts = _prompts(base_lcm)
    prompts[1, 3] = float("nan")  # padding of document 1
    out = lcm_fast.generate(base_lcm, prompts, torch.tensor([4, 3]), max_gen_len=1)
    assert all(torch.isfinite(s).all() for s in out.sequences)


def test_seq_lens_longer_than_tensor(two_tower):
    with pytest.raises(ValueError, match=r"seq_lens\[1\]=5 is longer than the prompt tensor \(4 sentences\)"):
        lcm_fast.generate(two_tower, _prompts(two_tower), torch.tensor([4, 5]), max_gen_len=1)


def test_seq_lens_shape_and_empty_document(two_tower):
    with pytest.raises(ValueError, match=r"seq_lens must be an integer tensor of shape \[2\]"):
        lcm_fast.generate(two_tower, _prompts(two_tower), torch.tensor([4]), max_gen_len=1)
    with pytest.raises(ValueError, match=r"document 0 has an empty prompt"):
        lcm_fast.generate(two_tower, _prompts(two_tower), torch.tensor([0, 2]), max_gen_len=1)


def test_empty_batch_and_empty_prompt(two_tower):
    with pytest.raises(ValueError, match="empty batch"):
        lcm_fast.generate(two_tower, torch.zeros(0, 3, 24), max_gen_len=1)
    with pytest.raises(ValueError, match="empty prompts"):
        lcm_fast.generate(two_tower, torch.zeros(2, 0, 24), max_gen_len=1)
    with pytest.raises(ValueError, match=r"\[batch, sentences, dim\]"):
        lcm_fast.generate(two_tower, torch.zeros(3, 24), max_gen_len=1)


def test_lengths_and_eos_vec(two_tower):
    with pytest.raises(ValueError, match="max_gen_len=300 exceeds options.max_seq_len=200"):
        lcm_fast.generate(two_tower, _prompts(two_tower), max_gen_len=300)
    with pytest.raises(ValueError, match=r"exceed the model's max_seq_len=32"):
        lcm_fast.generate(two_tower, _prompts(two_tower, length=30), max_gen_len=5)
    for name, value in (("max_gen_len", 0), ("max_gen_len", -1), ("max_gen_len", 2.5), ("max_gen_len", True),
                        ("min_gen_len", 0)):
        with pytest.raises(ValueError, match=rf"{name} must be an int >= 1 \(None: the options' default\), got {value}"):
            lcm_fast.generate(two_tower, _prompts(two_tower), **{name: value})
    with pytest.raises(ValueError, match=r"eos_vec must have shape \[24\]"):
        lcm_fast.Generator(two_tower, eos_vec=torch.zeros(25))


def test_numpy_lengths_are_accepted(two_tower):
    out = lcm_fast.generate(two_tower, _prompts(two_tower), max_gen_len=np.int64(2), min_gen_len=np.int32(1))
    assert out.lengths.tolist() == [6, 6]  # 4 prompt sentences + 2


def test_replay_noise_mismatch(two_tower):
    with pytest.raises(RuntimeError, match=r"recorded shape \[2, 1, 7\], requested \[2, 1, 24\]"):
        lcm_fast.generate(two_tower, _prompts(two_tower), max_gen_len=1, noise=lcm_fast.ReplayNoise([torch.zeros(2, 1, 7)]))
    with pytest.raises(RuntimeError, match="noise replay exhausted"):
        lcm_fast.generate(two_tower, _prompts(two_tower), max_gen_len=1, noise=lcm_fast.ReplayNoise([]))


# ---- checkpoints -------------------------------------------------------------------------------------


def test_unknown_model_family(tmp_path, base_lcm):
    card = write_official(tmp_path / "run", base_lcm, card_overrides={"model_family": "vae_lcm"})
    with pytest.raises(CheckpointError, match=r"unknown model family 'vae_lcm'"):
        lcm_fast.load_official(card)


def test_unknown_config_key(tmp_path, base_lcm):
    card = write_official(tmp_path / "run", base_lcm)
    data = yaml.safe_load(card.read_text())
    data["model_config"]["lcm"]["num_expertz"] = 4
    card.write_text(yaml.safe_dump(data))
    with pytest.raises(CheckpointError, match=r"unknown config key 'lcm.num_expertz'"):
        lcm_fast.load_official(card)


def test_truncated_checkpoint(tmp_path, base_lcm):
    card = write_official(tmp_path / "run", base_lcm)
    pt = tmp_path / "run" / "model.pt"
    pt.write_bytes(pt.read_bytes()[: pt.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated or not a torch checkpoint"):
        lcm_fast.load_official(card)


def test_not_a_checkpoint(tmp_path, base_lcm):
    card = write_official(tmp_path / "run", base_lcm)
    (tmp_path / "run" / "model.pt").write_text("hello, not a checkpoint")
    with pytest.raises(CheckpointError, match="truncated or not a torch checkpoint"):
        lcm_fast.load_official(card)
    torch.save({"weights": torch.zeros(2)}, tmp_path / "run" / "model.pt")
    with pytest.raises(CheckpointError, match=r"not an official LCM checkpoint"):
        lcm_fast.load_official(card)


def test_mismatched_normalizer_dim(tmp_path, base_lcm):
    state = dict(base_lcm.state_dict())
    state["frontend.sonar_normalizer.center"] = torch.zeros(12)
    card = write_official(tmp_path / "run", base_lcm, state=state)
    with pytest.raises(CheckpointError, match=r"normalizer dim \[12\] does not match sonar_embed_dim 24"):
        lcm_fast.load_official(card)


def test_missing_unexpected_and_misshapen_keys(tmp_path, two_tower):
    state = dict(two_tower.state_dict())
    del state["denoiser.layers.0.ffn.inner_proj.bias"]
    state["denoiser.layers.0.extra.weight"] = torch.zeros(1)
    state["denoiser.final_proj.fc.bias"] = torch.zeros(3)
    card = write_official(tmp_path / "run", two_tower, state=state)
    with pytest.raises(CheckpointError) as err:
        lcm_fast.load_official(card)
    msg = str(err.value)
    assert "missing keys (1): denoiser.layers.0.ffn.inner_proj.bias" in msg
    assert "unexpected keys (1): denoiser.layers.0.extra.weight" in msg
    assert "denoiser.final_proj.fc.bias: checkpoint [3] vs model [24]" in msg


def test_checkpoint_file_missing(tmp_path, base_lcm):
    card = write_official(tmp_path / "run", base_lcm)
    (tmp_path / "run" / "model.pt").unlink()
    with pytest.raises(CheckpointError, match=r"checkpoint 'file:///nonexistent/run/model.pt' of .* not found"):
        lcm_fast.load_official(card)
    with pytest.raises(FileNotFoundError):
        lcm_fast.load_official(tmp_path / "nowhere.yaml")


def test_model_pt_without_card(tmp_path, reference_dir):
    shutil.copy(reference_dir / "base_lcm_b/checkpoints/step_1/model.pt", tmp_path / "model.pt")
    with pytest.raises(CheckpointError, match="no model_card.yaml next to"):
        lcm_fast.load_official(tmp_path / "model.pt")


def test_native_format_version(tmp_path, base_lcm):
    base_lcm.save_pretrained(tmp_path / "m")
    meta = json.loads((tmp_path / "m/config.json").read_text())
    meta["format_version"] = 99
    (tmp_path / "m/config.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="format_version 99 is not supported"):
        lcm_fast.from_pretrained(tmp_path / "m")
    with pytest.raises(FileNotFoundError, match="not an lcm_fast model directory"):
        lcm_fast.from_pretrained(tmp_path / "empty")


def test_native_model_that_cannot_be_trusted(tmp_path, base_lcm):
    """A model_type other than the family's, a truncated safetensors file and NaN weights each name the file
    and what is wrong, at load (NaN weights would otherwise generate NaN silently)."""
    base_lcm.save_pretrained(tmp_path / "m")
    meta = json.loads((tmp_path / "m/config.json").read_text())
    meta["config"]["model_type"] = "vae_lcm"
    (tmp_path / "m/config.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=r"config.json: model_type 'vae_lcm' does not match the model family"):
        lcm_fast.from_pretrained(tmp_path / "m")
    base_lcm.save_pretrained(tmp_path / "m")
    weights = tmp_path / "m/model.safetensors"
    intact = weights.read_bytes()
    weights.write_bytes(intact[: len(intact) // 2])
    with pytest.raises(CheckpointError, match=r"m/model.safetensors: not a readable safetensors file .* corrupt or"):
        lcm_fast.from_pretrained(tmp_path / "m")
    broken = copy.deepcopy(base_lcm)
    with torch.no_grad():
        broken.postnet.fc.weight[1, 2] = float("nan")
    broken.save_pretrained(tmp_path / "m")
    with pytest.raises(CheckpointError, match=r"model.safetensors: tensor 'postnet.fc.weight' holds NaN values"):
        lcm_fast.from_pretrained(tmp_path / "m")


# ---- options and configs ------------------------------------------------------------------------------

#: (option, bad value, the message's end)
OPTION_CATALOGUE = [
    ("guidance_scale", float("nan"), "guidance_scale must be a finite number, got nan"),
    ("guidance_rescale", float("nan"), "guidance_rescale must be in [0, 1], got nan"),
    ("guidance_rescale", 1.5, "guidance_rescale must be in [0, 1], got 1.5"),
    ("ddim_eta", float("nan"), "ddim_eta must be a finite number >= 0, got nan"),
    ("ddim_eta", -0.1, "ddim_eta must be a finite number >= 0, got -0.1"),
    ("initial_noise_scale", float("inf"), "initial_noise_scale must be a finite number >= 0, got inf"),
    ("epsilon_scaling", 0.0, "epsilon_scaling must be a finite number > 0 or None, got 0.0"),
    ("clip_noise", 0, "clip_noise must be a finite number > 0, got 0"),
    ("top_p", 0.0, "top_p must be in (0, 1], got 0.0"),
    ("top_k", 0, "top_k must be an integer >= 1, got 0"),
    ("inference_timesteps", 2.5, "inference_timesteps must be an integer >= 1, got 2.5"),
    ("min_seq_len", 0, "min_seq_len must be an integer >= 1, got 0"),
    ("seed", "7", "seed must be an integer or None, got '7'"),
    ("eos_threshold", 1.5, "eos_threshold must be a cosine in [-1, 1] or None, got 1.5"),
]


@pytest.mark.parametrize("name,value,message", OPTION_CATALOGUE, ids=[f"{c[0]}={c[1]}" for c in OPTION_CATALOGUE])
def test_generation_options_are_validated_up_front(two_tower, name, value, message):
    with pytest.raises(ValueError, match=re.escape(f"GenerationOptions.{message}")):
        lcm_fast.GenerationOptions(**{name: value})
    options = lcm_fast.GenerationOptions()
    setattr(options, name, value)  # changed in place after it was made: the generator checks again
    with pytest.raises(ValueError, match=re.escape(f"GenerationOptions.{message}")):
        lcm_fast.generate(two_tower, _prompts(two_tower), max_gen_len=1, options=options)


#: (key, value, message): YAML 1.1 reads `1e-3` as a string, which becomes a float where a float is expected
CONFIG_CATALOGUE = [
    ("lr", "1e-3x", "config key 'lr' expects float, got '1e-3x' (str)"),
    ("steps", "10", "config key 'steps' expects int, got '10' (str)"),
    ("steps", 2.5, "config key 'steps' expects int, got 2.5 (float)"),
    ("tensorboard", "yes", "config key 'tensorboard' expects bool, got 'yes' (str)"),
    ("variant", 3, "config key 'variant' expects str, got 3 (int)"),
]


@pytest.mark.parametrize("key,value,message", CONFIG_CATALOGUE, ids=[f"{c[0]}={c[1]}" for c in CONFIG_CATALOGUE])
def test_config_values_of_the_wrong_kind(key, value, message):
    from lcm_fast.config import ConfigError, merge_into
    from lcm_fast.training import TrainConfig

    with pytest.raises(ConfigError, match=re.escape(message)):
        merge_into(TrainConfig(), {key: value})
    assert merge_into(TrainConfig(), {"lr": "1e-3"}).lr == 1e-3


def test_float_seq_lens_name_their_dtype(two_tower):
    with pytest.raises(ValueError, match=r"seq_lens must be an integer tensor of shape \[2\], got a torch.float32"):
        lcm_fast.generate(two_tower, _prompts(two_tower), torch.tensor([4.0, 3.0]), max_gen_len=1)


def test_evaluation_prompt_beyond_every_document(tmp_path):
    model = random_model(tiny_config("two_tower_diffusion_lcm"))
    write_documents(tmp_path / "docs.parquet", [torch.randn(6, 24) for _ in range(2)], sentences=[["s."] * 6] * 2)
    from lcm_fast.text.evaluate import evaluate

    with pytest.raises(ValueError, match=r"no document has more than 6 sentences \(the prompt and one to compare"):
        evaluate(model, [str(tmp_path / "docs.parquet")], prompt_sentences=6,
                 decoder=RetrievalDecoder(["a.", "b."], torch.randn(2, 24)))


# ---- the CLI --------------------------------------------------------------------------------------------

T = "TRAIN"  # a valid `lcm-fast train` of the tiny Two-Tower on tiny data (the `run` fixture), plus the flags given
CKPT = "{tmp}/run/checkpoints/step_2"
#: files a case names: {tmp} is the test's directory (train.parquet and cfg.yaml are the valid ones)
CLI_FILES = {
    "lr_abc.yaml": CLI_CONFIG + "train: {lr: abc}\n",
    "dim_25.yaml": "model: {sonar_embed_dim: 25}\n",
    "unknown.yaml": "model: {model_dims: 16}\n",
    "layers_2.yaml": CLI_CONFIG.replace("context_encoder: {num_layers: 1", "context_encoder: {num_layers: 2"),
}

#: (the bad input, the commands run before it, the command, the message it must get[, a mark])
CLI_CATALOGUE = [
    ("train --steps 0", [], [T, "--steps", "0"], r"steps must be >= 1 \(optimizer steps to train\), got 0"),
    ("train --steps -5", [], [T, "--steps", "-5"], r"steps must be >= 1 \(optimizer steps to train\), got -5"),
    ("--resume must without a checkpoint", [], [T, "--resume", "must"],
     r"no complete checkpoint in .*run/checkpoints to resume from"),
    ("--resume with --steps below the checkpoint's", [[T, "--steps", "3"]], [T, "--steps", "2", "--resume"],
     r"checkpoints/step_3 is at step 3 and steps=2: nothing to train; raise steps \(--steps\) above 3"),
    ("a missing --config file", [], [T, "--config", "/nonexistent/cfg.yaml"],
     r"No such file or directory: '/nonexistent/cfg.yaml'"),
    ("a learning rate that is no number", [], [T, "--config", "{tmp}/lr_abc.yaml"],
     r"config key 'lr' expects float, got 'abc' \(str\)"),
    ("a model dim other than the data's", [], [T, "--config", "{tmp}/dim_25.yaml"],
     r"--data holds 24-d embeddings \(.*train.parquet\) but model.sonar_embed_dim in .*dim_25.yaml say\(s\) 25"),
    ("an unknown model field", [], [T, "--config", "{tmp}/unknown.yaml"],
     r"unknown config key 'model_dims' for TwoTowerConfig"),
    ("--out under a regular file", [], [T, "--out", "{tmp}/cfg.yaml/run"],
     r"--out .*cfg.yaml/run: .*cfg.yaml is a file, not a directory"),
    ("--resume into another model config", [[T, "--steps", "2"]], [T, "--steps", "4", "--resume", "--config",
     "{tmp}/layers_2.yaml"], r"step_2 was trained with another model config \(context_encoder: \{'num_layers': 1.*"
     r"-> \{'num_layers': 2.*new --out"),
    ("--resume from a truncated trainer state", [[T, "--steps", "2"], ["truncate", f"{CKPT}/trainer_state.pt"]],
     [T, "--steps", "4", "--resume"], r"step_2/trainer_state.pt: not a readable trainer state.*earlier checkpoint"),
    ("a normalizer of another dim", [["normalizer", "{tmp}/norm.pt", "25"]], [T, "--normalizer", "{tmp}/norm.pt"],
     r"is fitted on 25-d embeddings, the model takes 24-d ones: fit it on this data"),
    ("--threads 0", [], ["--threads", "0", T], r"--threads must be >= 1, got 0"),
    ("--device cuda without CUDA", [], [T, "--device", "cuda"],
     r"--device cuda: this torch has no usable CUDA device .*use --device cpu",
     pytest.mark.skipif(torch.cuda.is_available(), reason="a machine without CUDA")),
    ("generate --guidance nan", [], ["generate", "--guidance", "nan", "Some text."],
     r"GenerationOptions.guidance_scale must be a finite number, got nan"),
    ("generate --sentences 0", [], ["generate", "--sentences", "0", "Some text."], r"--sentences must be >= 1, got 0"),
    ("generate more sentences than the model's context", [], ["generate", "--sentences", "70", "Some text."],
     r"1 prompt \+ 70 new sentences exceed the model's max_seq_len=64"),
    ("generate --model that is no model", [], ["generate", "--model", "{tmp}", "Some text."],
     r"is not a model directory \(save_pretrained / lcm-fast train\)"),
    ("eval --max-docs 0", [[T, "--steps", "2"]],
     ["eval", "--model", CKPT, "--data", "{tmp}/train.parquet", "--max-docs", "0"], r"--max-docs must be >= 1, got 0"),
    ("eval with an encoder of another dim", [[T, "--steps", "2"], ["bank", "{tmp}/bank"]],
     ["eval", "--model", CKPT, "--data", "{tmp}/train.parquet", "--decoder", "{tmp}/bank"],
     r"--encoder minilm gives 384-d embeddings, the model takes 24-d ones: pass the encoder its data"),
]


def _cli(argv: list[str], run, tmp_path) -> list[str]:
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    if T in argv:
        i = argv.index(T)
        return argv[:i] + run(*argv[i + 1:])
    return argv


def _given(step: list[str], run, tmp_path) -> None:
    kind, *rest = [a.replace("{tmp}", str(tmp_path)) for a in step]
    if kind == T:
        main(run(*rest))
    elif kind == "truncate":
        Path(rest[0]).write_bytes(Path(rest[0]).read_bytes()[:1000])
    elif kind == "normalizer":
        SonarNormalizer.fit(torch.randn(100, int(rest[1]))).save(rest[0])
    elif kind == "bank":
        RetrievalDecoder(["a.", "b."], torch.randn(2, CLI_DIM)).save(rest[0])
    else:
        raise AssertionError(f"unknown step {kind}")


def cli_fails(argv: list[str], capsys) -> str:
    """Runs the CLI, which must exit with status 2 and print one line, no traceback; -> that line."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "Traceback" not in err, err
    assert err.startswith(f"lcm-fast {next(a for a in argv if not a.startswith('-') and not a.isdigit())}: error: ")
    assert len(err.strip().splitlines()) == 1, err
    return err


@pytest.mark.parametrize("given,argv,message", [pytest.param(*c[1:4], id=c[0], marks=c[4:]) for c in CLI_CATALOGUE])
def test_cli_bad_input(run, tmp_path, capsys, given, argv, message):
    for name, text in CLI_FILES.items():
        (tmp_path / name).write_text(text)
    for step in given:
        _given(step, run, tmp_path)
    err = cli_fails(_cli(argv, run, tmp_path), capsys)
    assert re.search(message, err), err


def test_cli_debug_shows_the_traceback(run):
    with pytest.raises(ValueError, match="steps must be >= 1"):
        main(["--debug", *run("--steps", "0")])


def test_cli_fit_rvq_faiss_with_fewer_vectors_than_dims(tmp_path, capsys, faiss):
    write_documents(tmp_path / "few.parquet", [torch.randn(6, CLI_DIM) for _ in range(4)])
    err = cli_fails(["fit-rvq", "--data", str(tmp_path / "few.parquet"), "--backend", "faiss", "--codebooks", "2",
                     "--size", "4", "--out", str(tmp_path / "rq.safetensors")], capsys)
    assert "progressive-dim training (a PCA) needs at least d = 24 vectors, got 22" in err  # 24 less the held-out tenth
