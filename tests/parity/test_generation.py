"""Every recorded generation run, replaying the official noise and re-drawing it from the seed."""

from __future__ import annotations

import pytest
import torch

import lcm_fast
from lcm_fast.models import TwoTowerLCM

from ..tolerances import PARITY_GENERATION_NORMALIZED, PARITY_GENERATION_RAW, PARITY_SCHEDULER
from .conftest import generation_runs, loaded_model, model_fixture, record


def _run(name: str, tag: str, replay: bool, trajectory: list | None = None, backend: str = "auto",
         engine: str = "fast"):
    """engine: "reference", "fast", or "fast/static": the fast engine's static-buffer sentence loop or decoder
    pass (what it replays as a CUDA graph on a GPU), run without a graph here."""
    engine, _, static = engine.partition("/")
    fx, model = model_fixture(name), loaded_model(name)
    run = fx.spec["generate"][tag]
    options = lcm_fast.GenerationOptions.from_dict(run["options"])
    noise = lcm_fast.ReplayNoise([fx[n] for n in run.get("noise", [])]) if replay else None
    eos = fx[run["eos_vec"]] if run.get("eos_vec") else None
    callback = None
    if trajectory is not None:
        def callback(position, t, out, rows):
            trajectory.append((position, t, out, rows))
    with lcm_fast.set_backend(backend):
        out = lcm_fast.generate(
            model, fx[fx.spec["prompt"]["raw_seqs"]], fx[fx.spec["prompt"]["seq_lens"]],
            options=options, eos_vec=eos, noise=noise, step_callback=callback, engine=engine,
            cuda_graphs=bool(static), **run["call"],
        )
    if replay:
        assert noise.remaining == 0, f"{noise.remaining} recorded noise tensors were not drawn"
    return fx, model, run, out


def _compare(name, tag, mode, model, fx, run, out):
    seqs, lens = out.padded()
    assert torch.equal(lens, fx[run["output_lens"]]), f"output_lens {lens.tolist()} != {fx[run['output_lens']].tolist()}"
    expected = fx[run["output_seqs"]]
    assert seqs.shape == expected.shape
    where = f"{name}/{tag} ({mode})"
    record(f"generation/{mode}", where, seqs, expected)
    if model.normalizer is not None:
        valid = torch.arange(seqs.shape[1])[None, :] < lens[:, None]
        actual, ref = model.normalizer.normalize(seqs)[valid], model.normalizer.normalize(expected)[valid]
        torch.testing.assert_close(actual, ref, **PARITY_GENERATION_NORMALIZED, msg=lambda m: f"{where}: {m}")
    else:
        torch.testing.assert_close(seqs, expected, **PARITY_GENERATION_RAW, msg=lambda m: f"{where}: {m}")


ENGINES = ["reference", "fast", "fast/static"]


@pytest.mark.parametrize("backend", ["ref", "ext"])
@pytest.mark.parametrize("name,tag,engine", [(n, t, e) for n, t in generation_runs() for e in ENGINES])
def test_generation_replayed_noise(name, tag, backend, engine):
    """Both engines (the fast one also in static shapes), through both paths of the fused ops (PyTorch
    references, compiled kernels)."""
    fx, model, run, out = _run(name, tag, replay=True, backend=backend, engine=engine)
    _compare(name, tag, f"replay/{engine}/{backend}", model, fx, run, out)


@pytest.mark.parametrize("name,tag", generation_runs())
def test_generation_from_seed(name, tag):
    """Drawing the noise ourselves from the run's seed (or none) gives the official noise bit for bit."""
    fx, model, run, out = _run(name, tag, replay=False)
    _compare(name, tag, "seeded", model, fx, run, out)


@pytest.mark.parametrize("engine,backend", [("reference", "ref"), ("reference", "ext"), ("fast", "ext")])
@pytest.mark.parametrize(
    "name,tag",
    [(n, t) for n, t in generation_runs() if "trajectory_first_generated_position" in model_fixture(n).spec["generate"][t]],
)
def test_diffusion_trajectory(name, tag, backend, engine):
    """Every DDIM step of the first generated position (prev_sample and x0), for the rows the engine
    denoised (the fast engine skips teacher-forced rows)."""
    trajectory: list = []
    fx, model, run, _ = _run(name, tag, replay=True, trajectory=trajectory, backend=backend, engine=engine)
    assert isinstance(model, TwoTowerLCM)
    spec = run["trajectory_first_generated_position"]
    first, rows = trajectory[0][0], trajectory[0][3]
    steps = [(t, out) for pos, t, out, _ in trajectory if pos == first]
    assert [t for t, _ in steps] == spec["timesteps"] == run["scheduler_timesteps"]
    clip = run["options"]["clip_noise"]
    # the recorded prev_sample precedes the clip_noise clamp; ours follows it: equal while inside
    assert fx[spec["prev_sample"]].abs().max() < clip
    for field in ("prev_sample", "pred_original_sample"):
        actual, expected = torch.stack([getattr(out, field) for _, out in steps]), fx[spec[field]][:, rows]
        record(f"generation/trajectory/{engine}/{backend}", f"{name}/{tag} {field}", actual, expected)
        torch.testing.assert_close(actual, expected, **PARITY_SCHEDULER)


@pytest.mark.parametrize("name,tag", [(n, t) for n, t in generation_runs() if model_fixture(n).spec["model_type"] != "base_lcm"])
def test_scheduler_timesteps_of_run(name, tag):
    run = model_fixture(name).spec["generate"][tag]
    sched = loaded_model(name).noise_scheduler.with_options()
    options = lcm_fast.GenerationOptions.from_dict(run["options"])
    assert sched.set_timesteps(options.inference_timesteps).tolist() == run["scheduler_timesteps"]
