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


@pytest.mark.parametrize("inductor", [False, True], ids=["composed", "inductor"])
@pytest.mark.parametrize("family", ["two_tower_diffusion_lcm", "base_lcm", "one_tower_diffusion_lcm", "quant_lcm"])
def test_generation_with_cuda_graphs_matches_the_eager_fast_engine(family, inductor):
    """Generator(cuda_graphs=True) against the per-step fast engine: in a first call sentences 2+ of a batch bucket
    replay, also after documents finish and the caches are compacted under a captured graph; in a second call on
    the same buffers every sentence replays. inductor: the captured step's layers compiled by Inductor."""
    from ..conftest import SAMPLED_UNITS, random_model, tiny_config

    model = random_model(tiny_config(family)).cuda()
    sampled_units = SAMPLED_UNITS if family == "quant_lcm" else {}
    options = lcm_fast.GenerationOptions.recommended(seed=3, ddim_eta=0.3, inference_timesteps=12, eos_threshold=None,
                                                     **sampled_units)
    prompts, lens = torch.randn(5, 5, model.sonar_dim, device="cuda"), torch.tensor([5, 5, 5, 1, 3])
    graphed = lcm_fast.Generator(model, options, cuda_graphs=True, inductor=inductor)
    eager = lcm_fast.Generator(model, options)
    for _ in range(2):
        runs = [generator(prompts, lens, max_gen_len=6) for generator in (graphed, eager)]
        assert runs[0].lengths.tolist() == runs[1].lengths.tolist()
        for a, b in zip(runs[0].sequences, runs[1].sequences):
            torch.testing.assert_close(a, b, **CUDA_GRAPHS_VS_EAGER)


# -- the RVQ candidate search on CUDA (cuBLAS scores on tensor cores, certified): the fp32 search's codes --

@pytest.mark.parametrize("M,K", [(8, 256), (16, 1024), (32, 4096), (64, 8192)])
def test_rvq_candidate_search_codes_equal_the_fp32_search(M, K):
    """The shapes of bench_rvq.py (d = 1024, its random codebooks and data): the codes of the fp32 CUDA kernel,
    except float64 near-ties, over two chunks of scores, the last one ragged."""
    from lcm_fast.ops import rvq_encode
    from lcm_fast.ops.rvq import search_codebooks

    from .test_rvq import assert_codes_match

    D, g = 1024, torch.Generator("cuda").manual_seed(M * K)
    cb = torch.randn(M, K, D, device="cuda", generator=g) / D**0.5
    x = torch.randn((1 << 25) // K + 37, D, device="cuda", generator=g) / D**0.5
    fast = rvq_encode(x, cb, search_codebooks=search_codebooks(cb, "bf16"), backend="ext")
    assert_codes_match(fast, rvq_encode(x, cb, backend="ext"), x, cb)


@pytest.mark.parametrize("n,m,k,d", [(None, 2, 3, 7), (None, 3, 9, 33), (None, 2, 300, 1), (None, 3, 64, 2),
                                     (2100, 2, 2000, 24), (None, 2, 700, 1027)])
def test_rvq_candidate_search_paths(n, m, k, d):
    """Fewer centroids than the shortlist holds, centroids closer together than bf16 resolves (d = 1, 2: most
    rows are rechecked), d not a multiple of the warp: the fp32 search's codes."""
    from lcm_fast.ops import rvq_encode, rvq_encode_ref
    from lcm_fast.ops.rvq import RVQ_SEARCH_MIN_SCORES, search_codebooks, sq_norms

    from .test_rvq import assert_codes_match, clustered

    n = n or -(-RVQ_SEARCH_MIN_SCORES // k)
    x = clustered(n, d, seed=n + d).cuda()
    cb = (0.5 * torch.randn(m, k, d, generator=torch.Generator().manual_seed(k))).cuda()
    codes = rvq_encode(x, cb, search_codebooks=search_codebooks(cb, "bf16"), backend="ext")
    assert_codes_match(codes, rvq_encode_ref(x.double(), cb.double(), sq_norms(cb.double())), x, cb,
                       min_rate=0.9 if d <= 2 else 1.0)


def test_rvq_candidate_search_ties_and_nan_rows():
    """More duplicates of the nearest centroid than the shortlist holds: the lowest index wins; a NaN row gets
    code 0, as from the fp32 kernel."""
    from lcm_fast.ops import rvq_encode
    from lcm_fast.ops.rvq import search_codebooks

    torch.manual_seed(0)
    cb = torch.randn(2, 4096, 64, device="cuda")
    cb[0, 4000] = cb[0, 100]
    cb[0, 2000:2024] = cb[0, 100]
    x = torch.cat([cb[0, 100:101] + 1e-3 * torch.randn(1, 64, device="cuda"), torch.randn(4, 64, device="cuda"),
                   torch.full((1, 64), float("nan"), device="cuda")])
    codes = rvq_encode(x, cb, search_codebooks=search_codebooks(cb, "bf16"), backend="ext")
    assert torch.equal(codes, rvq_encode(x, cb, backend="ext"))
    assert codes[0, 0] == 100 and codes[5].tolist() == [0, 0]


def test_rvq_training_on_gpu_takes_the_search():
    """Codebooks trained on the GPU: assignments by the candidate search are the fp32 search's; the tensor on the
    device (residuals kept) and the same data streamed from the host train equal codebooks; the trained
    codebooks encode alike with either search."""
    from lcm_fast.quant import ResidualQuantizer, kmeans, train_residual_kmeans

    from .test_rvq import assert_codes_match, clustered

    x = clustered(20000, 64, seed=11)
    xc = x.cuda()
    # the searches agree up to fp32 near-ties (other summation orders), which can move a point in a Lloyd iteration:
    # the same quality, not necessarily the same bits
    mse = lambda c: float(((xc - c[torch.cdist(xc, c).argmin(1)]) ** 2).sum(1).mean())
    assert abs(mse(kmeans(xc, 256, search="bf16")) / mse(kmeans(xc, 256, search="exact")) - 1) < 1e-3
    kw = dict(chunk_size=6000, search="bf16", progress=False)
    cb, codes = train_residual_kmeans(xc, 4, 256, **kw)
    cb_streamed, codes_streamed = train_residual_kmeans(x.numpy(), 4, 256, device="cuda", **kw)
    assert torch.equal(cb, cb_streamed) and torch.equal(codes, codes_streamed)
    rq = ResidualQuantizer.from_codebooks(cb)
    assert_codes_match(rq.encode(xc, search="bf16"), rq.encode(xc, search="exact"), xc, cb)
    assert_codes_match(rq.encode(xc, search="auto"), codes, x, cb.cpu())


# -- weight-only int8 / fp8 on CUDA: the GEMV for few rows, a GEMM on the dequantized weight past kPackedGemvMaxRows --

@pytest.mark.parametrize("fmt", ["int8", "fp8"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("M", [1, 2, 3, 8, 9, 40])
@pytest.mark.parametrize("K,N", [(1024, 520), (1027, 33), (2048, 4096)])
def test_packed_skinny_linear_cuda_matches_reference(M, K, N, dtype, fmt):
    from lcm_fast.ops import skinny_linear, skinny_linear_ref
    from lcm_fast.ops.linear import quantize_weight, unpack

    g = torch.Generator().manual_seed(M + K)
    x, w, b = torch.randn(M, K, generator=g), torch.randn(N, K, generator=g), torch.randn(N, generator=g)
    packed = quantize_weight(w, fmt).cuda()
    x, b = x.to("cuda", dtype), b.to("cuda", dtype)
    got = skinny_linear(x, packed, b, backend="ext")
    q, scale = unpack(packed)
    exact = (x.double() @ q.double().T) * scale.double() + b.double()
    ref = skinny_linear_ref(x, packed, b)
    ulp = exact.abs().max() * {torch.float32: 2**-23, torch.bfloat16: 2**-8, torch.float16: 2**-11}[dtype]
    # past 8 rows the weight is dequantized to x's dtype first: one more rounding per weight
    slack = 0 if M <= 8 or dtype == torch.float32 else exact.abs().max() * 2**-7
    assert (got.double() - exact).abs().max() <= 2 * (ref.double() - exact).abs().max() + ulp + slack + 1e-4


@pytest.mark.parametrize("fmt", ["int8", "fp8"])
@pytest.mark.parametrize("family", ["two_tower_diffusion_lcm", "base_lcm"])
def test_packed_generation_on_cuda(family, fmt):
    """Generation with int8 / fp8 weights on the GPU, eager and with CUDA graphs: close to the model's own weights."""
    import torch.nn.functional as F

    from ..conftest import random_model, tiny_config

    model = random_model(tiny_config(family)).cuda()
    options = lcm_fast.GenerationOptions.recommended(seed=3, inference_timesteps=6, eos_threshold=None)
    prompts, lens = torch.randn(3, 5, model.sonar_dim, device="cuda"), torch.tensor([5, 2, 4])
    own = lcm_fast.generate(model, prompts, lens, max_gen_len=3, options=options).sequences
    for graphs in (False, True):
        packed = lcm_fast.generate(model, prompts, lens, max_gen_len=3, options=options, weights=fmt,
                                   cuda_graphs=graphs).sequences
        for a, b, n in zip(own, packed, lens.tolist()):
            assert F.cosine_similarity(a[n:], b[n:], dim=-1).min() >= 0.97
