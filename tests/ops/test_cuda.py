"""GPU-only checks (marked ``cuda``; they skip on machines without a GPU or without the CUDA build).
The kernel-vs-reference grids of test_guided_ddim.py / test_adaln.py also run on CUDA there."""

from __future__ import annotations

import pytest
import torch

from lcm_fast import DDIMScheduler, SchedulerConfig
from lcm_fast.ops import OPS, guided_ddim_step_, sampler_params

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(
        not (torch.cuda.is_available() and all("cuda" in spec.kernels for spec in OPS.values() if "cuda" in spec.devices)),
        reason="needs a GPU and the CUDA build of lcm_fast._C",
    ),
]


def test_guided_ddim_cuda_graph_replay_equals_eager():
    """A whole denoising loop captured in one CUDA graph (each step bakes its own coefficient row)
    replays bit for bit like eager execution."""
    sched = DDIMScheduler(SchedulerConfig(num_diffusion_train_steps=100))
    sched.set_timesteps(40)
    table = sched.coefficient_table(guided=True).cuda()
    params = sampler_params(3.0, 0.7, 1.00045, 100.0, device="cuda")
    model_out = torch.randn(2 * 8, 1024, device="cuda")
    start = torch.randn(8, 1024, device="cuda")

    def loop(latents, x0):
        for i in range(table.shape[0]):
            guided_ddim_step_(latents, x0, model_out, table[i], params, None, 0)

    eager_lat, eager_x0 = start.clone(), torch.empty_like(start)
    loop(eager_lat, eager_x0)
    lat, x0 = start.clone(), torch.empty_like(start)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        loop(lat.clone(), x0)  # warm-up outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        loop(lat, x0)
    lat.copy_(start)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(lat, eager_lat) and torch.equal(x0, eager_x0)


def test_coefficients_must_live_on_the_device():
    lat = torch.randn(2, 64, device="cuda")
    with pytest.raises(RuntimeError, match="coef and params must be on"):
        torch.ops.lcm_fast.guided_ddim_step_(
            lat, torch.empty_like(lat), torch.randn(4, 64, device="cuda"), torch.zeros(6), torch.zeros(6), None, 0
        )
