"""save_pretrained / from_pretrained round trips (config.json + model.safetensors)."""

from __future__ import annotations

import json
import os
import stat

import pytest
import torch

import lcm_fast

from .conftest import random_model, tiny_config


@pytest.mark.parametrize("name", ["two_tower_a", "two_tower_b", "base_lcm_a", "base_lcm_b"])
def test_round_trip_of_official_checkpoints(tmp_path, reference_dir, name):
    model = lcm_fast.load_official(reference_dir / name / "checkpoints/step_1")
    model.save_pretrained(tmp_path / name)
    meta = json.loads((tmp_path / name / "config.json").read_text())
    assert meta["format_version"] == lcm_fast.io.FORMAT_VERSION
    again = lcm_fast.from_pretrained(tmp_path / name)
    assert type(again) is type(model) and again.config == model.config
    ref, got = model.state_dict(), again.state_dict()
    assert ref.keys() == got.keys() and all(torch.equal(ref[k], got[k]) for k in ref)
    prompts = torch.randn(2, 3, model.sonar_dim) * 0.01
    options = lcm_fast.GenerationOptions(inference_timesteps=5, guidance_scale=2.0, seed=3)
    a = lcm_fast.generate(model, prompts, options=options, max_gen_len=2).padded()[0]
    b = lcm_fast.generate(again, prompts, options=options, max_gen_len=2).padded()[0]
    assert torch.equal(a, b)


def test_dtype_is_kept_or_chosen(tmp_path):
    model = random_model(tiny_config("base_lcm")).to(torch.bfloat16)
    model.save_pretrained(tmp_path / "m")
    assert next(lcm_fast.from_pretrained(tmp_path / "m").parameters()).dtype == torch.bfloat16
    assert next(lcm_fast.from_pretrained(tmp_path / "m", dtype=torch.float32).parameters()).dtype == torch.float32


def test_normalizer_options_round_trip(tmp_path):
    cfg = tiny_config("two_tower_diffusion_lcm")
    model = lcm_fast.build_model(cfg, normalizer=lcm_fast.NormalizerConfig(dim=24, clip_proba=1e-4))
    model.save_pretrained(tmp_path / "m")
    again = lcm_fast.from_pretrained(tmp_path / "m")
    assert again.normalizer.clip_min is not None and "sonar_normalizer.clip_max" in again.state_dict()


def test_written_files_follow_the_umask(tmp_path):
    """safetensors creates 0600 files; ours get the process umask's permissions like every other file."""
    from lcm_fast.quant import ResidualQuantizer
    from lcm_fast.text import RetrievalDecoder

    old = os.umask(0o022)
    try:
        random_model(tiny_config("base_lcm")).save_pretrained(tmp_path / "m")
        ResidualQuantizer.from_codebooks(torch.randn(2, 4, 8)).save(tmp_path / "rq.safetensors")
        RetrievalDecoder(["a.", "b."], torch.randn(2, 8)).save(tmp_path / "bank")
    finally:
        os.umask(old)
    for path in (tmp_path / "m/model.safetensors", tmp_path / "rq.safetensors", tmp_path / "bank/bank.safetensors"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o644, path
