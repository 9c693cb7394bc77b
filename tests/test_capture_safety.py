"""Capture safety on CPU: every function the fast engine captures in a CUDA graph (the Two-Tower, One-Tower and
Quant-LCM sentence loops, the Base-LCM decoder step) runs under :class:`~lcm_fast.inference.graphs.CaptureGuard`, which fails at the first
operation a CUDA graph cannot hold. The GPU finds such a bug only when a capture fails; these tests find it here."""

from __future__ import annotations

import pytest
import torch

import lcm_fast
from lcm_fast.inference.fast import FastDecoder
from lcm_fast.inference.generator import _OneTowerStepper, _QuantStepper, _TwoTowerStepper
from lcm_fast.inference.graphs import CapturedCall, CaptureGuard, CaptureUnsafeError
from lcm_fast.nn.attention import KVCache

from .conftest import SAMPLED_UNITS, random_model, tiny_config


@pytest.mark.parametrize("step,op", [
    (lambda x, i: x.add_(float(x.sum())), "_local_scalar_dense"),
    (lambda x, i: x[i].add_(1), "_local_scalar_dense"),  # a 0-d tensor as an index: its value on the host
    (lambda x, i: x.nonzero(), "nonzero"),
    (lambda x, i: x[x > 0].add_(1), "index"),  # boolean mask
    (lambda x, i: x.masked_fill_(x > 0, 0).add_(torch.tensor([1.0])), "lift_fresh"),  # a tensor from Python data
    (lambda x, i: torch.equal(x, x), "equal"),
])
def test_the_guard_names_what_a_cuda_graph_cannot_capture(step, op):
    x, index = torch.randn(4), torch.tensor(2)
    with pytest.raises(CaptureUnsafeError, match=rf"my step cannot be captured in a CUDA graph: aten\.{op}\b.* at "
                                                  rf".*test_capture_safety\.py"):
        with CaptureGuard("my step"):
            step(x, index)
    with pytest.raises(CaptureUnsafeError, match="cannot be captured"), torch.inference_mode():
        with CaptureGuard():  # inference mode dispatches aten.item, not _local_scalar_dense
            float(torch.randn(2).sum())


def test_the_guard_lets_capturable_indexing_and_factories_through():
    x, cache = torch.randn(4, 3), torch.zeros(2, 8, 3)
    length = torch.tensor(5)
    with CaptureGuard():
        cache[torch.arange(2), length.reshape(1)] = x[:2]  # a 1-d index tensor: index_put_ on the device
        cache.index_copy_(1, length.reshape(1), x[:2, None])
        x.index_select(0, length.reshape(1) - 4)
        torch.where(x > 0, x, torch.zeros_like(x))
        torch.full((2, 2), 3, device=x.device) + torch.arange(2)


def test_captured_call_checks_its_function_on_cpu():
    """A CapturedCall's warm-up (on CPU: the run standing in for the capture) goes through the guard."""
    def step(x: torch.Tensor) -> None:
        x.mul_(int(x.argmax()))

    with pytest.raises(CaptureUnsafeError, match="step cannot be captured in a CUDA graph: aten._local_scalar_dense"):
        CapturedCall(step, torch.randn(3))
    call = CapturedCall(lambda x: x.mul_(2), torch.ones(3))
    assert torch.equal(call(torch.full((3,), 2.0))[0], torch.full((3,), 4.0))


# the decode step on the model's own weights and on packed int8 / fp8 ones (the weight-only linear's path)
WEIGHTS = pytest.mark.parametrize("weights", [None, "int8", "fp8"])


@WEIGHTS
@pytest.mark.parametrize("positions", ["rope", "learned", "sine"])
def test_base_lcm_decoder_step_is_capture_safe(positions, weights):
    """The static (CUDA-graph) Base-LCM decoder step under the guard. On the code before this test (5412cce) it
    failed, as the capture did on the H200 (cudaErrorStreamCaptureUnsupported)::

        CaptureUnsafeError: base-LCM decoder step cannot be captured in a CUDA graph: aten.item reads a tensor's
        value on the host (.item(), int/float/bool of a tensor, a 0-d tensor as a Python index), at
        python/lcm_fast/ops/decoder.py:117 (k_cache[batch, :, length], v_cache[batch, :, length] = k[:C, :, 0], ...)

    and with learned or sine positions also at ``self.positions[self.length]`` (inference/fast.py)."""
    model = random_model(tiny_config("base_lcm", lcm=dict(pos_embedding_style=positions)))
    cache = [KVCache(16, zeroed=True) for _ in model.lcm.layers]
    with torch.inference_mode():
        model(torch.randn(3, 5, model.sonar_dim), cache=cache)  # the prefill
        decoder = FastDecoder(model, cache, static_shapes=True, weights=weights)
        decoder.length.fill_(5)
        x = torch.randn(3, 1, model.sonar_dim)
        eager = FastDecoder(model, cache, weights=weights)(x)  # the per-step engine writes the same position
        with CaptureGuard("base-LCM decoder step"):
            out = decoder(x)
    torch.testing.assert_close(out, eager)


@WEIGHTS
@pytest.mark.parametrize("guidance,eta", [(3.0, 0.3), (1.0, 0.0)])
def test_two_tower_sentence_loop_is_capture_safe(guidance, eta, weights):
    """The static Two-Tower sentence (every DDIM step: the denoiser and the fused sampler) under the guard."""
    model = random_model(tiny_config("two_tower_diffusion_lcm"))
    options = lcm_fast.GenerationOptions.recommended(seed=0, guidance_scale=guidance, ddim_eta=eta,
                                                     inference_timesteps=6)
    stepper = _TwoTowerStepper(model, options, True, 16, lcm_fast.TorchNoise(0), fast=True, static_batch=4,
                               weights=weights)
    steps, D = len(stepper.timesteps), model.sonar_dim
    with torch.inference_mode():
        stepper.prefill(torch.randn(4, 5, D))
        latents, x0 = torch.randn(4, 1, D), torch.zeros(4, 1, D)
        noise = torch.randn(steps, 4, 1, D) if eta > 0 else None
        with CaptureGuard("two-tower sentence"):
            stepper._sentence(latents, x0, noise)
    assert torch.isfinite(x0).all() and x0.abs().sum() > 0


@WEIGHTS
def test_one_tower_sentence_loop_is_capture_safe(weights):
    """The static One-Tower sentence (every DDIM step: the decoder on its context cache and the fused sampler) under
    the guard."""
    model = random_model(tiny_config("one_tower_diffusion_lcm"))
    options = lcm_fast.GenerationOptions.recommended(seed=0, ddim_eta=0.3, inference_timesteps=6)
    stepper = _OneTowerStepper(model, options, 16, lcm_fast.TorchNoise(0), fast=True, static_batch=4, weights=weights)
    steps, D = len(stepper.timesteps), model.sonar_dim
    with torch.inference_mode():
        stepper.prefill(torch.randn(4, 5, D))
        latents, x0 = torch.randn(4, 1, D), torch.zeros(4, 1, D)
        with CaptureGuard("one-tower sentence"):
            stepper._sentence(latents, x0, torch.randn(steps, 4, 1, D))
    assert torch.isfinite(x0).all() and x0.abs().sum() > 0


@pytest.mark.parametrize("target", ["discrete", "continuous"])
@pytest.mark.parametrize("sampling", [dict(top_k=1), SAMPLED_UNITS])
@WEIGHTS
def test_quant_lcm_sentence_loop_is_capture_safe(target, sampling, weights):
    """The static Quant-LCM sentence (every codebook pass: the decoder on its context cache, the units' scores, their
    greedy or top-k/top-p draw and the centroid's addition) under the guard."""
    model = random_model(tiny_config("quant_lcm", target=target))
    options = lcm_fast.GenerationOptions(seed=0, **sampling)
    stepper = _QuantStepper(model, options, 16, lcm_fast.TorchNoise(0), fast=True, static_batch=4, weights=weights)
    M, K, D = model.config.n_codebooks, model.config.codebook_size, model.sonar_dim
    with torch.inference_mode():
        stepper.prefill(torch.randn(4, 5, D))
        inter = torch.zeros(4, D)
        with CaptureGuard("quant-LCM sentence"):
            stepper._sentence(inter, torch.randn(M, 4, K) if stepper.sampling else None)
    assert torch.isfinite(inter).all() and inter.abs().sum() > 0
