"""The official initialisation of a model trained from scratch (lcm_fast.nn.init): each rule's statistics on a fresh
model of every family, and that loading never re-initialises."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

import lcm_fast
from lcm_fast.archs import small_base_lcm, small_one_tower, small_quant_lcm, small_two_tower
from lcm_fast.nn.init import SONAR_STD, init_linear

FAMILIES = [small_base_lcm, small_two_tower, small_one_tower, small_quant_lcm]


def _xavier_bound(weight: torch.Tensor, gain: float = 1.0) -> float:
    fan_out, fan_in = weight.shape
    return gain * math.sqrt(6 / (fan_in + fan_out))


def _fills_uniform(weight: torch.Tensor, bound: float) -> bool:
    """Inside [-bound, bound] and spread over it (the max is within 2 % of the bound)."""
    return weight.abs().max() <= bound * (1 + 1e-6) and weight.abs().max() >= 0.98 * bound


@pytest.mark.parametrize("arch", FAMILIES, ids=lambda f: f.__name__)
def test_attention_projections(arch):
    torch.manual_seed(0)
    model = lcm_fast.build_model(arch())
    attentions = [m for m in model.modules() if hasattr(m, "output_init")]
    assert attentions
    for attn in attentions:
        for name in ("q_proj", "k_proj", "v_proj"):
            proj = getattr(attn, name, None)
            if proj is not None:  # xavier-uniform, gain 2^-1/2, zero bias (fairseq2)
                assert _fills_uniform(proj.weight, _xavier_bound(proj.weight, 2**-0.5)), name
                assert torch.count_nonzero(proj.bias) == 0
        assert attn.output_init == "xavier"
        assert _fills_uniform(attn.output_proj.weight, _xavier_bound(attn.output_proj.weight))


def test_two_tower_modulator_timestep_and_projections():
    torch.manual_seed(0)
    config = small_two_tower()
    model = lcm_fast.build_model(config)
    den = model.denoiser
    for layer in den.layers:  # AdaLN-zero
        assert torch.count_nonzero(layer.modulator.fc.weight) == 0 and torch.count_nonzero(layer.modulator.fc.bias) == 0
    for fc in (den.embed_time.fc1, den.embed_time.fc2):
        assert abs(fc.weight.std().item() - 0.02) < 0.002 and torch.count_nonzero(fc.bias) == 0
    # pre/post-denoiser: kaiming_uniform (nn.Linear's default), bound 1/sqrt(fan_in) for the weights too (a = sqrt 5)
    assert config.denoiser.pre_denoiser.linear_init_fn == "kaiming_uniform"
    w = den.initial_proj.fc.weight
    assert _fills_uniform(w, 1 / math.sqrt(w.shape[1]))


def test_frontend_positions_and_sonar_postnet():
    config = small_base_lcm()
    config = dataclasses.replace(config, lcm=dataclasses.replace(config.lcm, pos_embedding_style="learned"),
                                 postnet=dataclasses.replace(config.postnet, linear_init_fn="sonar"),
                                 frontend=dataclasses.replace(config.frontend, pre_linear_init_fn="xavier"))
    torch.manual_seed(0)
    model = lcm_fast.build_model(config)
    std = model.frontend.pos_encoder.weight.std().item()
    assert abs(std - config.frontend.embedding_std) < 0.1 * config.frontend.embedding_std
    pre = model.frontend.pre_linear
    assert _fills_uniform(pre.weight, _xavier_bound(pre.weight)) and torch.count_nonzero(pre.bias) == 0
    post = model.postnet.fc
    assert _fills_uniform(post.weight, SONAR_STD * math.sqrt(3 / post.in_features))
    # unit-variance inputs (layer-normed) give outputs of SONAR's std
    out = post(torch.randn(4096, post.in_features))
    assert abs(out.std().item() - SONAR_STD) < 0.1 * SONAR_STD


def test_every_linear_init_and_a_clear_error():
    layer = torch.nn.Linear(64, 32)
    for style, check in [("zero", lambda w: torch.count_nonzero(w) == 0),
                         ("trunc_normal", lambda w: abs(w.std() - 1e-3) < 2e-4),  # truncated at +-2 (absolute), as officially
                         ("xavier", lambda w: _fills_uniform(w, _xavier_bound(w)))]:
        init_linear(layer, style)
        assert check(layer.weight), style
    before = layer.weight.clone()
    init_linear(layer, "none")
    assert torch.equal(layer.weight, before)
    with pytest.raises(ValueError, match="unknown linear init 'glorot'; expected one of"):
        init_linear(layer, "glorot")


def test_init_weights_is_seeded_and_loading_never_reinitialises(tmp_path):
    config = small_two_tower()
    torch.manual_seed(3)
    a = lcm_fast.build_model(config)
    torch.manual_seed(3)
    b = lcm_fast.build_model(config)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    with torch.no_grad():  # a "trained" model: the modulators are no longer zero
        for p in a.parameters():
            p.add_(0.01)
    a.save_pretrained(tmp_path / "m")
    loaded = lcm_fast.from_pretrained(tmp_path / "m")
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), loaded.state_dict().values()))
