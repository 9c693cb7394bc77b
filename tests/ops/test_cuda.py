"""GPU-only checks (marked ``cuda``; they skip on machines without a GPU or without the CUDA build).
The kernel-vs-reference grids of test_guided_ddim.py / test_adaln.py also run on CUDA there."""

from __future__ import annotations

import pytest
import torch

import lcm_fast
from lcm_fast import DDIMScheduler, SchedulerConfig
from lcm_fast.ops import OPS, guided_ddim_step_, sampler_params

from ..tolerances import CUDA_GRAPHS_VS_EAGER

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


def test_fast_engine_sentence_graph_replays_eager_bit_for_bit():
    """The fast engine's captured sentence loop (every denoiser call and sampler step of a sentence, static
    shapes) replays exactly what the same loop computes eagerly, for two different inputs."""
    from lcm_fast.inference.generator import _TwoTowerStepper
    from lcm_fast.inference.graphs import CapturedCall

    from ..conftest import random_model, tiny_config

    model = random_model(tiny_config("two_tower_diffusion_lcm")).cuda()
    options = lcm_fast.GenerationOptions.recommended(seed=0, ddim_eta=0.3, inference_timesteps=12)
    B = 3
    stepper = _TwoTowerStepper(model, options, True, 16, lcm_fast.TorchNoise(0), fast=True, static_batch=B)
    D, steps = model.sonar_dim, len(stepper.timesteps)
    stepper.prefill(torch.randn(B, 5, D, device="cuda"))
    inputs = [(torch.randn(B, 1, D, device="cuda"), torch.zeros(B, 1, D, device="cuda"),
               torch.randn(steps, B, 1, D, device="cuda")) for _ in range(2)]
    call = CapturedCall(stepper._sentence, *inputs[0])
    assert call.graph is not None
    for latents, x0, noise in inputs:
        eager_latents, eager_x0 = latents.clone(), x0.clone()
        stepper._sentence(eager_latents, eager_x0, noise)
        got_latents, got_x0, _ = call(latents, x0, noise)
        torch.cuda.synchronize()
        assert torch.equal(got_latents, eager_latents) and torch.equal(got_x0, eager_x0)


def test_base_lcm_decoder_graph_replays_eager_bit_for_bit():
    """The fast engine's captured Base-LCM decoder pass (static shapes, the new keys/values written into the
    caches) replays exactly what the same pass computes eagerly, for two different inputs."""
    from lcm_fast.inference.fast import FastDecoder
    from lcm_fast.inference.graphs import CapturedCall
    from lcm_fast.nn.attention import KVCache

    from ..conftest import random_model, tiny_config

    model = random_model(tiny_config("base_lcm", lcm=dict(pos_embedding_style="rope"))).cuda()
    cache = [KVCache(16, zeroed=True) for _ in model.lcm.layers]
    with torch.no_grad():
        model(torch.randn(3, 5, model.sonar_dim, device="cuda"), cache=cache)  # the prefill
    decoder = FastDecoder(model, cache, static_shapes=True)
    decoder.length.fill_(5)
    inputs = [torch.randn(3, 1, model.sonar_dim, device="cuda") for _ in range(2)]
    call = CapturedCall(lambda x, out: out.copy_(decoder(x)), inputs[0], torch.empty_like(inputs[0]))
    assert call.graph is not None
    for x in inputs:
        eager = decoder(x)
        eager_keys = [c.k.clone() for c in cache]
        got = call(x)[1]
        torch.cuda.synchronize()
        assert torch.equal(got, eager) and all(torch.equal(c.k, k) for c, k in zip(cache, eager_keys))


def test_a_failed_capture_leaves_no_state_behind():
    """A capture that fails (here on a host sync that the guard cannot see: torch.cuda.synchronize is no aten op)
    raises an error naming what was captured, and the process is as before: the current stream, random draws
    (torch left the generator in capture mode: "Offset increment outside graph capture encountered
    unexpectedly" at every later draw) and later captures."""
    from lcm_fast.inference.graphs import CapturedCall

    def noisy_step(x: torch.Tensor) -> None:
        x.add_(torch.randn_like(x))
        torch.cuda.synchronize()

    stream = torch.cuda.current_stream()
    with pytest.raises(RuntimeError, match=r"CUDA graph capture of .*noisy_step failed, nothing was captured"):
        CapturedCall(noisy_step, torch.zeros(4, device="cuda"))
    assert torch.cuda.current_stream() == stream
    torch.manual_seed(0)
    first = torch.randn(3, device="cuda")
    torch.manual_seed(0)
    assert torch.equal(torch.randn(3, device="cuda"), first)
    call = CapturedCall(lambda x: x.mul_(2), torch.ones(3, device="cuda"))
    assert call.graph is not None
    assert torch.equal(call(torch.ones(3, device="cuda"))[0], torch.full((3,), 2.0, device="cuda"))


@pytest.mark.parametrize("family", ["two_tower_diffusion_lcm", "base_lcm"])
def test_generation_with_cuda_graphs_matches_the_eager_fast_engine(family):
    """Generator(cuda_graphs=True) against the per-step fast engine: in a first call sentences 2+ of a batch bucket
    replay, also after documents finish and the caches are compacted under a captured graph; in a second call on
    the same buffers every sentence replays."""
    from ..conftest import random_model, tiny_config

    model = random_model(tiny_config(family)).cuda()
    options = lcm_fast.GenerationOptions.recommended(seed=3, ddim_eta=0.3, inference_timesteps=12, eos_threshold=None)
    prompts, lens = torch.randn(5, 5, model.sonar_dim, device="cuda"), torch.tensor([5, 5, 5, 1, 3])
    graphed, eager = lcm_fast.Generator(model, options, cuda_graphs=True), lcm_fast.Generator(model, options)
    for _ in range(2):
        runs = [generator(prompts, lens, max_gen_len=6) for generator in (graphed, eager)]
        assert runs[0].lengths.tolist() == runs[1].lengths.tolist()
        for a, b in zip(runs[0].sequences, runs[1].sequences):
            torch.testing.assert_close(a, b, **CUDA_GRAPHS_VS_EAGER)
