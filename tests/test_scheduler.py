"""DDIM scheduler behaviour beyond the fixtures: the stride option, validation, identities."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lcm_fast import DDIMScheduler, SchedulerConfig


def test_official_stride_quirk_and_exact_steps():
    sched = DDIMScheduler(SchedulerConfig(num_diffusion_train_steps=100))
    official = sched.set_timesteps(40)
    assert len(official) == 50 and official[:3].tolist() == [99, 97, 95] and sched.prev_timestep(99) == 97
    exact = sched.set_timesteps(40, official_stride=False)
    assert len(exact) == 40 and exact[0] == 99 and exact.tolist() == sorted(set(exact.tolist()), reverse=True)
    chain = [sched.prev_timestep(t) for t in exact.tolist()]
    assert chain == exact.tolist()[1:] + [-1]


@pytest.mark.parametrize("spacing", ["linspace", "leading", "trailing"])
@pytest.mark.parametrize("steps", [1, 7, 40, 100])
def test_exact_step_counts(spacing, steps):
    sched = DDIMScheduler(SchedulerConfig(num_diffusion_train_steps=100, timestep_spacing=spacing))
    ts = sched.set_timesteps(steps, official_stride=False)
    assert len(ts) == steps and int(ts.min()) >= 0 and int(ts.max()) <= 99


def test_validation():
    sched = DDIMScheduler(SchedulerConfig(num_diffusion_train_steps=100))
    with pytest.raises(RuntimeError, match="set_timesteps"):
        sched.step(torch.zeros(1, 4), 99, torch.zeros(1, 4))
    with pytest.raises(ValueError, match=r"num_steps=101 must be in \[1, num_diffusion_train_steps=100\]"):
        sched.set_timesteps(101)
    sched.set_timesteps(10)
    with pytest.raises(ValueError, match="eta > 0 needs variance_noise"):
        sched.step(torch.zeros(1, 4), 89, torch.zeros(1, 4), eta=0.5)
    with pytest.raises(ValueError, match="unknown prediction_type 'score'"):
        sched.step(torch.zeros(1, 4), 89, torch.zeros(1, 4), prediction_type="score")
    with pytest.raises(ValueError, match="unknown beta_schedule 'cubic'"):
        DDIMScheduler(SchedulerConfig(beta_schedule="cubic"))


@pytest.mark.parametrize("schedule", ["linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid"])
def test_zero_terminal_snr_and_identities(schedule):
    sched = DDIMScheduler(SchedulerConfig(num_diffusion_train_steps=100, beta_schedule=schedule))
    assert sched.alphas_cumprod[-1] == 0 and (sched.alphas_cumprod[:-1] > 0).all()
    x0, eps, t = torch.randn(5, 8, dtype=torch.float64), torch.randn(5, 8, dtype=torch.float64), torch.arange(5) * 20
    sched.alphas_cumprod = sched.alphas_cumprod.double()
    xt = sched.add_noise(x0, eps, t)
    v = sched.get_velocity(x0, eps, t)
    a = sched.alphas_cumprod[t][:, None]
    torch.testing.assert_close(a.sqrt() * xt - (1 - a).sqrt() * v, x0)  # v-prediction recovers x0
    torch.testing.assert_close(sched.get_snrs()[t], sched.alphas_cumprod[t] / (1 - sched.alphas_cumprod[t]))


def test_clip_sample():
    sched = DDIMScheduler(SchedulerConfig(num_diffusion_train_steps=100, clip_sample=True, clip_sample_range=0.5))
    sched.set_timesteps(10)
    x0 = torch.tensor([[-2.0, -0.2, 0.3, 4.0]])
    out = sched.step(x0, 49, torch.zeros(1, 4))
    torch.testing.assert_close(out.pred_original_sample, torch.tensor([[-0.5, -0.2, 0.3, 0.5]]))


@settings(max_examples=200, deadline=None)
@given(T=st.integers(1, 1000), frac=st.floats(0.0, 1.0), spacing=st.sampled_from(["linspace", "leading", "trailing"]))
def test_timestep_counts_property(T, frac, spacing):
    """Exact mode runs exactly S distinct descending steps in [0, T); official trailing/leading run
    ceil(T / (T // S)) steps with the integer stride T // S."""
    S = max(1, round(frac * T))
    sched = DDIMScheduler(SchedulerConfig(num_diffusion_train_steps=T, timestep_spacing=spacing))
    exact = sched.set_timesteps(S, official_stride=False).tolist()
    assert len(exact) == S == len(set(exact)) and exact == sorted(exact, reverse=True)
    assert 0 <= exact[-1] and exact[0] <= T - 1
    official = sched.set_timesteps(S).tolist()
    if spacing != "linspace":
        stride = T // S
        assert len(official) == -(-T // stride)
        assert all(a - b == stride for a, b in zip(official, official[1:]))


def test_named_paper_schedules():
    from lcm_fast.diffusion import NOISE_SCHEDULES, named_schedule

    snr_mid = {}
    for name in NOISE_SCHEDULES:
        sched = DDIMScheduler(named_schedule(name))
        a = sched.alphas_cumprod
        assert len(a) == 100 and a[-1] == 0 and bool((a[1:] <= a[:-1]).all()), name
        snr_mid[name] = float(a[50] / (1 - a[50]))
    # quadratic-2 puts more weight on low log-SNR than quadratic-1; sigmoid gamma shifts it left
    assert snr_mid["quadratic-2"] < snr_mid["quadratic-1"]
    assert snr_mid["sigmoid(1.5,-2)"] < snr_mid["sigmoid(1.5,-1)"]
    with pytest.raises(KeyError, match="unknown noise schedule 'linear-3'"):
        named_schedule("linear-3")


@pytest.mark.parametrize("guidance", [1.0, 3.0])
def test_the_guided_chain_asks_for_unconditional_rows_at_every_cfg_step_but_the_first(guidance):
    """GuidedDDIM holds the first-CFG-step rule once: generation (both engines) and evaluation step through it."""
    from lcm_fast.diffusion import GuidedDDIM

    ddim = GuidedDDIM(DDIMScheduler(SchedulerConfig(num_diffusion_train_steps=100)), 10, guidance_scale=guidance,
                      device=torch.device("cpu"), dim=8)
    asked = []

    def denoise(i, t, unconditional):
        asked.append((i, t, unconditional))
        return torch.zeros(4 if unconditional else 2, 8)

    latents, x0 = torch.randn(2, 8), torch.empty(2, 8)
    ddim.run(latents, x0, denoise)
    assert [i for i, _, _ in asked] == list(range(len(ddim.timesteps))) and asked[0][1] == 99
    assert [u for _, _, u in asked] == [False] + [guidance != 1.0] * (len(asked) - 1)
    # a "sample" prediction of zeros: x0 is that prediction (through guided epsilons with CFG: to rounding)
    torch.testing.assert_close(x0, torch.zeros(2, 8), atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", ["cosine", "quadratic-2", "sigmoid(1.5,-1)", "sigmoid(3.5,0)"])
def test_every_named_schedule_samples_finite_sentences(name):
    """Sampling that visits t = 0 with CFG: the wide sigmoid(3.5, 0) gave alpha-bar_0 = 1.0 in fp32 and NaN sentences
    (epsilon = 0 / 0) before alpha-bar was kept below 1."""
    import dataclasses

    import lcm_fast
    from lcm_fast.diffusion import named_schedule

    from .conftest import random_model, tiny_config

    model = random_model(tiny_config("two_tower_diffusion_lcm",
                                     noise_scheduler=dataclasses.asdict(named_schedule(name))))
    assert float(model.noise_scheduler.alphas_cumprod.max()) < 1.0
    prompts = torch.randn(2, 3, model.sonar_dim, generator=torch.Generator().manual_seed(0))
    for steps in (10, 30, 40, 100):
        options = lcm_fast.GenerationOptions.recommended(seed=1, inference_timesteps=steps, guidance_scale=3.0,
                                                         eos_threshold=None)
        for engine in ("fast", "reference"):
            out = lcm_fast.generate(model, prompts, torch.tensor([3, 3]), options=options, max_gen_len=1, engine=engine)
            assert all(torch.isfinite(s).all() for s in out.sequences), (name, steps, engine)
