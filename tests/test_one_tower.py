"""One-Tower diffusion LCM: training-time masks equal incremental inference; generation; save/load."""

from __future__ import annotations

import pytest
import torch

import lcm_fast
from lcm_fast.config import config_from_dict
from lcm_fast.evaluation import teacher_forced_predictions


def _model(**overrides):
    stack = dict(num_layers=2, num_attn_heads=2, ffn_inner_dim=32, dropout_p=0.0, final_dropout_p=0.0)
    cfg = config_from_dict("one_tower_diffusion_lcm", dict(sonar_embed_dim=24, model_dim=16, max_seq_len=32,
                                                           timestep_embed_dim=8, lcm={**stack, **overrides}))
    torch.manual_seed(0)
    return lcm_fast.build_model(cfg).eval()


@pytest.mark.parametrize("pos", ["learned", "sine", "none"])
def test_training_forward_equals_incremental_denoising(pos):
    model = _model(pos_embedding_style=pos)
    x, noisy = torch.randn(2, 5, 24), torch.randn(2, 5, 24)
    t = torch.randint(0, 100, (5,)).expand(2, 5)
    with torch.no_grad():
        full = model(x, noisy, t)
        unconditional = model(x, noisy, t, cfg_dropout_rows=torch.ones(5, dtype=torch.bool))
        for i in range(5):
            cache = model.new_cache(8)
            if i:
                model.encode(x[:, :i], cache=cache)
            step = model.denoise_step(noisy[:, i : i + 1], int(t[0, i]), cache if i else None)
            torch.testing.assert_close(full[:, i : i + 1], step, atol=1e-5, rtol=1e-5)
            alone = model.denoise_step(noisy[:, i : i + 1], int(t[0, i]), cache if i else None, conditional=False)
            torch.testing.assert_close(unconditional[:, i : i + 1], alone, atol=1e-5, rtol=1e-5)
            assert cache[0].length == i  # denoising never enters the context cache


def test_padding_does_not_leak():
    model = _model()
    x, noisy, t = torch.randn(2, 5, 24), torch.randn(2, 5, 24), torch.randint(0, 100, (2, 5))
    garbage = x.clone()
    garbage[1, 3:] = 1e3
    with torch.no_grad():
        a = model(x, noisy, t, torch.tensor([5, 3]))
        b = model(garbage, noisy, t, torch.tensor([5, 3]))
    torch.testing.assert_close(a[1, :3], b[1, :3])


@pytest.mark.parametrize("guidance", [1.0, 3.0])
def test_generation_and_round_trip(tmp_path, guidance):
    model = _model()
    options = lcm_fast.GenerationOptions(inference_timesteps=6, guidance_scale=guidance, guidance_rescale=0.7,
                                         ddim_eta=0.2, seed=4)
    prompts, lens = torch.randn(3, 4, 24), torch.tensor([4, 2, 3])
    out = lcm_fast.generate(model, prompts, lens, options=options, max_gen_len=2)
    assert out.lengths.tolist() == [6, 4, 5]
    assert all(torch.isfinite(s).all() for s in out.sequences)
    for doc, (seq, n) in enumerate(zip(out.sequences, lens.tolist())):
        torch.testing.assert_close(seq[:n], prompts[doc, :n])  # the prompt is kept
    again = lcm_fast.generate(model, prompts, lens, options=options, max_gen_len=2)
    assert all(torch.equal(a, b) for a, b in zip(out.sequences, again.sequences))
    model.save_pretrained(tmp_path / "m")
    loaded = lcm_fast.from_pretrained(tmp_path / "m")
    assert isinstance(loaded, lcm_fast.models.OneTowerLCM)
    third = lcm_fast.generate(loaded, prompts, lens, options=options, max_gen_len=2)
    assert all(torch.equal(a, b) for a, b in zip(out.sequences, third.sequences))


def test_teacher_forced_predictions_are_causal():
    model = _model()
    x, lens = torch.randn(2, 5, 24), torch.tensor([5, 4])
    a = teacher_forced_predictions(model, x, lens, steps=4)
    changed = x.clone()
    changed[:, 3:] += 1.0
    b = teacher_forced_predictions(model, changed, lens, steps=4)
    torch.testing.assert_close(a[:, :4], b[:, :4])


def test_rope_is_rejected():
    with pytest.raises(ValueError, match="One-Tower uses frontend positions"):
        _model(pos_embedding_style="rope")
