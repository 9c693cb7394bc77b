"""Strict configuration merging, as the official card loader does."""

from __future__ import annotations

import dataclasses

import pytest
import yaml

from lcm_fast.config import (
    BaseLCMConfig,
    ConfigError,
    TwoTowerConfig,
    config_from_dict,
    merge_into,
)


def test_official_cards_round_trip(reference_dir):
    for card_path in sorted(reference_dir.glob("*/checkpoints/step_*/model_card.yaml")):
        card = yaml.safe_load(card_path.read_text())
        config = config_from_dict(card["model_family"], card["model_config"])
        assert dataclasses.asdict(config) == card["model_config"], card_path


def test_deep_merge_keeps_defaults():
    cfg = config_from_dict("two_tower_diffusion_lcm", {"denoiser": {"num_layers": 7}, "model_dim": 64})
    assert cfg.denoiser.num_layers == 7 and cfg.denoiser.pos_embedding_style == "none"
    assert cfg.context_encoder == TwoTowerConfig().context_encoder and cfg.model_dim == 64


def test_unknown_keys_and_types():
    with pytest.raises(ConfigError, match=r"unknown config key 'lcm.use_moe' for TransformerConfig"):
        config_from_dict("base_lcm", {"lcm": {"use_moe": True}})
    with pytest.raises(ConfigError, match=r"config key 'postnet' expects a mapping"):
        config_from_dict("base_lcm", {"postnet": 3})
    with pytest.raises(ConfigError, match=r"unknown model family 'vae_lcm'"):
        config_from_dict("vae_lcm", {})


def test_merge_does_not_mutate():
    base = BaseLCMConfig()
    merged = merge_into(base, {"lcm": {"num_layers": 9}})
    assert base.lcm.num_layers == 2 and merged.lcm.num_layers == 9
