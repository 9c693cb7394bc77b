"""Official checkpoint IO beyond the fixtures: DDP prefixes, fp16 weights, weight norm, arch cards,
standalone normalizers."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

import lcm_fast

from .conftest import random_model, tiny_config, write_official


def test_ddp_prefix_and_fp16_weights(tmp_path):
    model = random_model(tiny_config("two_tower_diffusion_lcm"))
    state = {f"module.{k}": v.half() for k, v in model.state_dict().items()}
    card = write_official(tmp_path / "run", model, state=state)
    loaded = lcm_fast.load_official(card)
    assert next(loaded.parameters()).dtype == torch.float32
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v.half().float()), k
    half = lcm_fast.load_official(card, dtype=torch.float16)
    assert next(half.parameters()).dtype == torch.float16


def test_dead_denoiser_keys_are_ignored_on_purpose(tmp_path):
    """The official denoiser self-attention q/k projections are dropped, nothing else."""
    model = random_model(tiny_config("two_tower_diffusion_lcm"))
    state = dict(model.state_dict())
    for i in range(2):
        for proj in ("q_proj", "k_proj"):
            state[f"denoiser.layers.{i}.self_attn.{proj}.weight"] = torch.randn(16, 16)
            state[f"denoiser.layers.{i}.self_attn.{proj}.bias"] = torch.randn(16)
    loaded = lcm_fast.load_official(write_official(tmp_path / "run", model, state=state))
    assert loaded.state_dict().keys() == model.state_dict().keys()
    state["context_encoder.layers.0.self_attn.q_proj_extra.weight"] = torch.zeros(1)
    with pytest.raises(lcm_fast.CheckpointError, match="unexpected keys"):
        lcm_fast.load_official(write_official(tmp_path / "run2", model, state=state))


def test_weight_normalized_checkpoint_is_folded(tmp_path):
    """Official weight-norm parametrizations (original0 = g, original1 = v) load as plain weights."""
    from torch.nn.utils.parametrizations import weight_norm

    cfg = tiny_config("base_lcm", lcm={"mha_qkv_weight_normalization": True}, postnet={"weight_normalization": True})
    model = random_model(cfg)
    for module in [model.postnet.fc] + [l.self_attn.q_proj for l in model.lcm.layers]:
        weight_norm(module, dim=0)
    with torch.no_grad():
        model.postnet.fc.parametrizations.weight.original0.mul_(1.7)  # g != ||v||: folding must use both
    state = model.state_dict()
    assert "postnet.fc.parametrizations.weight.original0" in state
    loaded = lcm_fast.load_official(write_official(tmp_path / "run", model, state=state))
    x = torch.randn(2, 3, 24)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), atol=1e-5, rtol=1e-5)


def test_card_with_model_arch(tmp_path):
    """Cards of runs trained from a registered arch: the arch config, then the card's overrides."""
    model = random_model(tiny_config("base_lcm"))
    card = write_official(tmp_path / "run", model)
    data = yaml.safe_load(card.read_text())
    data["model_arch"] = "toy_base_lcm"
    card.write_text(yaml.safe_dump(data))
    loaded = lcm_fast.load_official(card)
    assert loaded.config == model.config


def test_standalone_normalizer_cards(reference_dir):
    manifest = json.loads((reference_dir / "manifest.json").read_text())
    for entry in manifest["normalizers"]:
        from_card = lcm_fast.load_normalizer(reference_dir / entry["card"])
        from_pt = lcm_fast.load_normalizer(reference_dir / entry["checkpoint"])
        assert from_card.dim == from_pt.dim == entry["dim"]
        assert torch.equal(from_card.center, from_pt.center) and torch.equal(from_card.scale, from_pt.scale)
        x = torch.randn(3, entry["dim"])
        torch.testing.assert_close(from_card.denormalize(from_card.normalize(x)), x, atol=1e-6, rtol=1e-5)
    with pytest.raises(lcm_fast.CheckpointError, match="not a sonar_normalizer card"):
        lcm_fast.load_normalizer(next(reference_dir.glob("two_tower_a/checkpoints/*/model_card.yaml")))


@pytest.mark.parametrize("clip", [False, True])
def test_normalizer_fft_and_clipping(clip):
    from lcm_fast.nn.normalizer import SonarNormalizer

    norm = SonarNormalizer(16, clip=clip, with_fft=True)
    norm.center.normal_(0, 0.1)
    norm.scale.uniform_(0.5, 2.0)
    x = torch.randn(4, 16)
    torch.testing.assert_close(norm.denormalize(norm.normalize(x)), x, atol=1e-5, rtol=1e-5)
    spectrum = torch.fft.rfft(x)
    packed = (norm.normalize(x) * norm.scale + norm.center)
    torch.testing.assert_close(packed[:, :9], spectrum.real, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(packed[:, 9:], spectrum.imag[:, 1:-1], atol=1e-5, rtol=1e-5)
