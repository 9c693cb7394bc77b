"""Fused ops vs eager PyTorch: backend axis {ref (eager), compile (ref under torch.compile), ext}.

Run: ``python -m pytest bench/bench_ops.py --benchmark-columns=min,median --benchmark-json=ops.json``.
Every benchmark records ``extra_info`` keys op, backend, device, B, D, dtype and gbps (bytes moved
per second at the median time), so runs compare from the JSON file.
"""

from __future__ import annotations

import pytest
import torch

from lcm_fast import DDIMScheduler, SchedulerConfig
from lcm_fast.ops import guided_ddim_step_, guided_ddim_step_ref, sampler_params
from lcm_fast.ops.guided_ddim import SPEC

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() and SPEC.has_kernel("cuda") else [])
BACKENDS = ["ref", "compile", "ext"]
_compiled = {}
# one static-shape compilation per (B, D) of the grid (dynamo's default limit is 8 per function)
torch._dynamo.config.recompile_limit = 64


def _guided_ddim_fn(backend: str):
    if backend == "ext":
        return lambda *args: guided_ddim_step_(*args, backend="ext")
    if backend == "ref":
        return guided_ddim_step_ref
    if "fn" not in _compiled:
        _compiled["fn"] = torch.compile(guided_ddim_step_ref, fullgraph=True, dynamic=False)
    return _compiled["fn"]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("D", [1024, 2048, 4096])
@pytest.mark.parametrize("B", [1, 64, 4096])
def test_guided_ddim_step(benchmark, device, backend, B, D):
    dtype = torch.float32
    sched = DDIMScheduler(SchedulerConfig(num_diffusion_train_steps=100))
    sched.set_timesteps(40)
    coef = sched.coefficient_table(guided=True)[10].to(device)
    params = sampler_params(3.0, 0.7, 1.00045, 100.0, device=device)
    latents = torch.randn(B, D, device=device, dtype=dtype)
    model_out = torch.randn(2 * B, D, device=device, dtype=dtype)
    x0 = torch.empty_like(latents)
    fn = _guided_ddim_fn(backend)

    def run():
        fn(latents, x0, model_out, coef, params, None, 0)
        if device == "cuda":
            torch.cuda.synchronize()

    run()  # warm-up (and compilation for the compile backend)
    benchmark.group = f"guided_ddim_step_/{device}/B{B}/D{D}"
    benchmark(run)
    moved = (latents.numel() * 3 + model_out.numel()) * latents.element_size()  # read x, out; write x, x0
    median = benchmark.stats.stats.median if benchmark.stats else float("nan")
    benchmark.extra_info.update(op="guided_ddim_step_", backend=backend, device=device, B=B, D=D,
                                dtype=str(dtype).removeprefix("torch."), gbps=moved / median / 1e9)
