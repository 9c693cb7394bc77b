"""Every scheduler case: betas, alphas_cumprod, timesteps, step(), get_epsilon, add_noise, thresholding."""

from __future__ import annotations

import pytest
import torch

from lcm_fast import DDIMScheduler, SchedulerConfig
from lcm_fast.config import merge_into

from ..tolerances import PARITY_SCHEDULER
from .conftest import record, scheduler_cases, scheduler_fixture


def _case(name: str) -> dict:
    return next(c for c in scheduler_fixture().spec["cases"] if c["name"] == name)


def _scheduler(case: dict, **overrides) -> DDIMScheduler:
    return DDIMScheduler(merge_into(SchedulerConfig(), {**case["config"], **overrides}))


def _check(where: str, actual: torch.Tensor, expected: torch.Tensor) -> None:
    record("scheduler", where, actual, expected)
    torch.testing.assert_close(actual, expected, **PARITY_SCHEDULER, msg=lambda m: f"{where}: {m}")


@pytest.mark.parametrize("name", scheduler_cases())
def test_schedule_tables(name):
    case, fx = _case(name), scheduler_fixture()
    sched = _scheduler(case)
    _check(f"{name} betas", sched.betas, fx[case["betas"]])
    _check(f"{name} alphas_cumprod", sched.alphas_cumprod, fx[case["alphas_cumprod"]])
    assert float(sched.final_alpha_cumprod) == pytest.approx(case["final_alpha_cumprod"], abs=1e-7)
    for steps, ref in case["timesteps"].items():
        assert torch.equal(sched.set_timesteps(int(steps)), fx[ref]), f"{name}: set_timesteps({steps})"


@pytest.mark.parametrize("name", scheduler_cases())
def test_step(name):
    case, fx = _case(name), scheduler_fixture()
    sched = _scheduler(case)
    for i, st in enumerate(case["steps"]):
        sched.set_timesteps(st["num_inference_steps"])
        assert sched.prev_timestep(st["timestep"]) == st["prev_timestep"]
        out = sched.step(
            fx[st["model_output"]], st["timestep"], fx[st["sample"]], eta=st["eta"],
            prediction_type=st["prediction_type"], epsilon_scaling=st["epsilon_scaling"],
            variance_noise=fx[st["variance_noise"]] if st["variance_noise"] else None,
        )
        _check(f"{name} step{i:02d} prev_sample", out.prev_sample, fx[st["prev_sample"]])
        _check(f"{name} step{i:02d} pred_original_sample", out.pred_original_sample, fx[st["pred_original_sample"]])


@pytest.mark.parametrize("name", scheduler_cases())
def test_non_finite_cases_stay_non_finite(name):
    """Cases the official code cannot compute (epsilon prediction at t=T-1 under zero-terminal SNR)."""
    case = _case(name)
    sched = _scheduler(case)
    sched.set_timesteps(40)
    for st in case.get("skipped_non_finite") or []:
        x = torch.randn(3, 1, 16)
        out = sched.step(x, st["timestep"], x, eta=st["eta"], prediction_type=st["prediction_type"],
                         epsilon_scaling=st["epsilon_scaling"])
        assert not torch.isfinite(out.pred_original_sample).all()


@pytest.mark.parametrize("name", scheduler_cases())
def test_get_epsilon_and_add_noise(name):
    case, fx = _case(name), scheduler_fixture()
    sched = _scheduler(case)
    for ge in case["get_epsilon"]:
        eps = _scheduler(case, prediction_type=ge["prediction_type"]).get_epsilon(
            fx[ge["model_output"]], fx[ge["sample"]], ge["timestep"]
        )
        _check(f"{name} get_epsilon t={ge['timestep']}", eps, fx[ge["epsilon"]])
    an = case["add_noise"]
    noisy = sched.add_noise(fx[an["original"]], fx[an["noise"]], fx[an["timesteps"]])
    _check(f"{name} add_noise", noisy, fx[an["noisy"]])


@pytest.mark.parametrize("name", [n for n in scheduler_cases() if _case(n).get("thresholding_step")])
def test_dynamic_thresholding(name):
    case, fx = _case(name), scheduler_fixture()
    th = case["thresholding_step"]
    sched = _scheduler(case, thresholding=True, dynamic_thresholding_ratio=th["dynamic_thresholding_ratio"],
                       sample_max_value=th["sample_max_value"])
    sched.set_timesteps(th["num_inference_steps"])
    out = sched.step(fx[th["model_output"]], th["timestep"], fx[th["sample"]], eta=th["eta"],
                     prediction_type=th["prediction_type"])
    _check(f"{name} thresholding prev_sample", out.prev_sample, fx[th["prev_sample"]])
    _check(f"{name} thresholding pred_original_sample", out.pred_original_sample, fx[th["pred_original_sample"]])
