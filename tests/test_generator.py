"""Reference-engine behaviour beyond the recorded runs: noise, ragged batches, stopping rules."""

from __future__ import annotations

import pytest
import torch

import lcm_fast
from lcm_fast.config import ConfigError

from .conftest import random_model, tiny_config


def test_torch_noise_matches_manual_seed():
    noise = lcm_fast.TorchNoise(seed=7)
    torch.manual_seed(7)
    for shape in [(2, 1, 16), (1, 1, 16), (3, 2, 5)]:
        assert torch.equal(noise.randn(shape, site="initial_latents", device=torch.device("cpu")), torch.randn(shape))


def test_ragged_batch_equals_documents_alone(reference_dir):
    """Lockstep generation with teacher forcing gives each document what it gets on its own."""
    model = lcm_fast.load_official(reference_dir / "base_lcm_a/checkpoints/step_1")
    options = lcm_fast.GenerationOptions(sample_latent_variable=False)
    prompts = torch.randn(3, 5, 1024) * 0.01
    lens = torch.tensor([5, 2, 4])
    batched = lcm_fast.generate(model, prompts, lens, options=options, max_gen_len=3)
    for i in range(3):
        alone = lcm_fast.generate(model, prompts[i : i + 1, : lens[i]], options=options, max_gen_len=3)
        assert batched.sequences[i].shape == (int(lens[i]) + 3, 1024)
        torch.testing.assert_close(batched.sequences[i], alone.sequences[0], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("trim", [False, True])
def test_repetition_stop_respects_min_gen_len(trim):
    model = random_model(tiny_config("base_lcm"))
    options = lcm_fast.GenerationOptions(
        sample_latent_variable=False, stop_on_repetition_cosine_threshold=-1.0, trim_hypotheses=trim
    )
    out = lcm_fast.generate(model, torch.randn(2, 4, 24), torch.tensor([4, 2]), options=options,
                            max_gen_len=6, min_gen_len=2)
    # the first stop is allowed once 2 sentences were generated; the stopping sentence is kept unless trimmed
    assert out.lengths.tolist() == [4 + 3 - trim, 2 + 3 - trim]


def test_defaults_and_options():
    model = random_model(tiny_config("base_lcm"))
    out = lcm_fast.generate(model, torch.randn(1, 2, 24), options=lcm_fast.GenerationOptions(max_seq_len=3, seed=1))
    assert out.lengths.tolist() == [5]  # max_gen_len defaults to options.max_seq_len
    rec = lcm_fast.GenerationOptions.recommended(seed=3)
    assert (rec.inference_timesteps, rec.guidance_scale, rec.guidance_rescale, rec.initial_noise_scale, rec.seed) == (
        40, 3.0, 0.7, 0.6, 3)
    with pytest.raises(ConfigError, match="unknown config key 'guidance'"):
        lcm_fast.GenerationOptions.from_dict({"guidance": 2.0})


def test_base_lcm_sampling_is_seeded():
    model = random_model(tiny_config("base_lcm"))
    prompts = torch.randn(2, 3, 24)
    run = lambda seed: lcm_fast.generate(model, prompts, options=lcm_fast.GenerationOptions(seed=seed), max_gen_len=2)
    assert torch.equal(run(5).padded()[0], run(5).padded()[0])
    assert not torch.equal(run(5).padded()[0], run(6).padded()[0])
    greedy = lcm_fast.GenerationOptions(sample_latent_variable=False)
    assert not torch.equal(run(5).padded()[0], lcm_fast.generate(model, prompts, options=greedy, max_gen_len=2).padded()[0])


def test_step_callback_and_progress():
    model = random_model(tiny_config("two_tower_diffusion_lcm"))
    calls = []
    options = lcm_fast.GenerationOptions(inference_timesteps=4, guidance_scale=2.0, seed=0)
    lcm_fast.generate(model, torch.randn(2, 3, 24), options=options, max_gen_len=2, progress=True,
                      step_callback=lambda pos, t, out, rows: calls.append((pos, t, out.prev_sample.shape)))
    assert [(p, t) for p, t, _ in calls] == [(p, t) for p in (3, 4) for t in (99, 74, 49, 24)]
    assert all(shape == (2, 1, 24) for *_, shape in calls)


def test_paper_options_per_family():
    """GenerationOptions.paper: the paper's section 2.4.1 settings, by family and task."""
    two_tower = lcm_fast.GenerationOptions.paper(random_model(tiny_config("two_tower_diffusion_lcm")), seed=3)
    assert (two_tower.inference_timesteps, two_tower.guidance_scale, two_tower.guidance_rescale,
            two_tower.initial_noise_scale, two_tower.epsilon_scaling, two_tower.seed) == (40, 3.0, 0.7, 0.6, 1.00045, 3)
    quant = random_model(tiny_config("quant_lcm"))
    single, multi = (lcm_fast.GenerationOptions.paper(quant, multi_sentence=m) for m in (False, True))
    if quant.discrete:
        assert (single.top_k, single.guidance_scale) == (1, 2.0)
        assert (multi.lcm_temperature, multi.top_k, multi.guidance_scale) == (1.0, 3, 1.0)
    else:
        assert (single.top_k, single.guidance_scale) == (1, 3.0)
        assert (multi.lcm_temperature, multi.top_k, multi.guidance_scale) == (0.005, 5, 1.5)
    assert lcm_fast.GenerationOptions.paper(random_model(tiny_config("base_lcm"))) == lcm_fast.GenerationOptions()
