"""Named presets: parameter counts equal the official builders' (verified numbers, on the meta device)."""

from __future__ import annotations

import pytest

import lcm_fast
from lcm_fast.models.factory import official_parameter_count

# reference-lcm-spec.md section 2.1: counted by building the official archs on the meta device
OFFICIAL_COUNTS = {
    "toy_base_lcm": 29_388_800,
    "base_lcm_1_6B": 1_649_185_792,
    "toy_two_tower_diffusion_lcm": 84_235_264,
    "two_tower_diffusion_lcm_1_6B": 1_645_538_304,
    "two_tower_diffusion_lcm_7B": 6_930_781_696,
}


@pytest.mark.parametrize("name", sorted(OFFICIAL_COUNTS))
def test_preset_parameter_count(name):
    model = lcm_fast.build_model(lcm_fast.get_arch(name), device="meta")
    assert official_parameter_count(model) == OFFICIAL_COUNTS[name]


def test_presets_are_fresh_and_named():
    assert set(OFFICIAL_COUNTS) < set(lcm_fast.ARCHS)  # plus lcm_fast's One-Tower presets
    a, b = lcm_fast.get_arch("two_tower_diffusion_lcm_1_6B"), lcm_fast.get_arch("two_tower_diffusion_lcm_1_6B")
    a.model_dim = 1
    assert b.model_dim == 2048
    assert b.noise_scheduler.num_diffusion_train_steps == 100 and b.trained_with_cf_guidance
    with pytest.raises(KeyError, match="unknown arch"):
        lcm_fast.get_arch("two_tower_3B")


def test_state_dict_keys_of_1_6b():
    """The official 1.6B state dict has 445 entries; ours drops the 2 x 2 x 13 dead q/k tensors."""
    model = lcm_fast.build_model(lcm_fast.get_arch("two_tower_diffusion_lcm_1_6B"), device="meta")
    assert len(model.state_dict()) == 445 - 2 * 2 * 13
    base = lcm_fast.build_model(lcm_fast.get_arch("base_lcm_1_6B"), device="meta")
    assert len(base.state_dict()) == 519


def test_one_tower_preset_is_1_6b():
    """The paper's One-Tower ablation model (section 2.4) has ~1.6B parameters."""
    model = lcm_fast.build_model(lcm_fast.get_arch("one_tower_diffusion_lcm_1_6B"), device="meta")
    assert 1.55e9 < sum(p.numel() for p in model.parameters()) < 1.7e9


@pytest.mark.parametrize("name", [n for n in sorted(lcm_fast.ARCHS) if n.startswith("small_")])
def test_small_presets_are_a_first_runs_size(name):
    """lcm-fast train's defaults: model dim 256, 2-6M parameters for 384-d (MiniLM) data; they train on CPU."""
    config = lcm_fast.get_arch(name)
    config.sonar_embed_dim = 384
    model = lcm_fast.build_model(config)
    assert config.model_dim == 256 and 2e6 < sum(p.numel() for p in model.parameters()) < 6e6
