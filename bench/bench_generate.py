"""Generation throughput, fast vs reference engine (the official algorithm), in one run.

Run: ``python -m pytest bench/bench_generate.py -m "slow or not slow" --benchmark-json=gen.json``
(the largest reference cases are marked slow). Each call generates one sentence per document after
a prompt of ``context`` sentences; ``extra_info`` has engine, device, model_dim, context, batch,
dtype and sentences_per_s.

Models: randomly initialised, in the released 1.6B recipe's shape (5 contextualizer + 13 denoiser layers,
RMSNorm, SwiGLU, RoPE, T = 100) at model dims 256 and 512; the paper's recommended sampling
(40 requested = 50 executed steps, CFG 3.0, rescale 0.7, initial noise 0.6).

GPU (``test_generate_two_tower_gpu``, skipped without one): the 1.6B shape, reference fp32 vs fast bf16 with and
without CUDA graphs, at (batch, context) (1, 50) and (64, 200); the fast rows also record the denoiser weight
bytes streamed per second and a device-copy peak to compare them with (the issue's bandwidth floor).

``test_generate_base_lcm_interleaved``: Base-LCM, 16 sentences after a prompt of 50, both engines alternated;
``test_generate_one_tower_interleaved`` and ``test_generate_quant_lcm_interleaved``: One-Tower and Quant-LCM-D,
one sentence after 50, likewise.

``test_beam_search_cost_interleaved``: beam search over concepts (K candidates x B beams) against sampling one.

``test_target_ratio_interleaved`` measures the issue's CPU target case (C = 50, batch 1) with the two
engines alternated A/B/A/B in one window, median of ``REPEATS`` each, so the ratio does not depend on which
minute of a noisy machine each engine ran in (separate tests run minutes apart).
"""

from __future__ import annotations

import copy
import statistics
import time

import pytest
import torch

import lcm_fast

_MODELS: dict = {}
REPEATS = 7


def scaled_model(arch: str, model_dim: int) -> torch.nn.Module:
    """Preset ``arch`` (a 1.6B recipe) at model dim ``model_dim`` (heads of 64, FFN 4 x dim), random weights (the
    default init keeps activations sane), max_seq_len 512; built once per process."""
    if (arch, model_dim) not in _MODELS:
        config = lcm_fast.get_arch(arch)
        config.model_dim = model_dim
        stacks = [config.context_encoder, config.denoiser] if hasattr(config, "denoiser") else [config.lcm]
        for stack in stacks:
            stack.num_attn_heads, stack.ffn_inner_dim = model_dim // 64, 4 * model_dim
        for owner in (config, getattr(config, "denoiser", None)):  # timestep embeddings at the model dim
            if hasattr(owner, "timestep_embed_dim"):
                owner.timestep_embed_dim = model_dim
        config.max_seq_len = 512
        torch.manual_seed(0)
        model = lcm_fast.build_model(config).eval()
        if isinstance(model, lcm_fast.QuantLCM):  # random RVQ codebooks (generation needs installed ones)
            model.rvq_codebooks.normal_(0, 0.03)
        _MODELS[arch, model_dim] = model
    return _MODELS[arch, model_dim]


def two_tower(model_dim: int) -> lcm_fast.TwoTowerLCM:
    return scaled_model("two_tower_diffusion_lcm_1_6B", model_dim)


def _cases():
    for engine in ("reference", "fast"):
        for model_dim in (256, 512):
            for context in (10, 50, 200):
                for batch in (1, 8, 64):
                    heavy = engine == "reference" and context * batch * model_dim >= 200 * 8 * 256
                    yield pytest.param(engine, model_dim, context, batch, marks=[pytest.mark.slow] if heavy else [])


@pytest.mark.parametrize("engine,model_dim,context,batch", list(_cases()))
def test_generate_two_tower(benchmark, engine, model_dim, context, batch):
    model = two_tower(model_dim)
    prompts = torch.randn(batch, context, model.sonar_dim) * 0.01
    generator = lcm_fast.Generator(model, lcm_fast.GenerationOptions.recommended(seed=1), engine=engine)
    benchmark.group = f"generate/two_tower/d{model_dim}/c{context}/b{batch}"
    out = benchmark.pedantic(generator, args=(prompts,), kwargs=dict(max_gen_len=1), rounds=3, warmup_rounds=1)
    assert out.lengths.tolist() == [context + 1] * batch
    median = benchmark.stats.stats.median if benchmark.stats else float("nan")
    benchmark.extra_info.update(engine=engine, device="cpu", model_dim=model_dim, context=context, batch=batch,
                                dtype="float32", sentences_per_s=batch / median)


def _interleaved(generators: dict, prompts: torch.Tensor, max_gen_len: int, repeats: int) -> dict:
    """Median seconds per call of each generator, the calls alternated A/B/A/B after one warm-up call each."""
    times: dict = {e: [] for e in generators}
    for generator in generators.values():  # warm-up: the fast engine's tables are built here
        generator(prompts, max_gen_len=max_gen_len)
    for _ in range(repeats):
        for engine, generator in generators.items():
            start = time.perf_counter()
            generator(prompts, max_gen_len=max_gen_len)
            times[engine].append(time.perf_counter() - start)
    return {e: statistics.median(t) for e, t in times.items()}


def _interleaved_case(benchmark, family: str, model: torch.nn.Module, batch: int, max_gen_len: int,
                      **others: lcm_fast.Generator) -> dict:
    """Reference and fast engines (and ``others``) on ``batch`` prompts of 50 sentences, alternated in one window;
    sets the benchmark's group and extra_info (reference_s, fast_s, ratio, ``<other>_s``) -> medians."""
    prompts = torch.randn(batch, 50, model.sonar_dim) * 0.01
    options = lcm_fast.GenerationOptions.recommended(seed=1, eos_threshold=None)
    engines = {e: lcm_fast.Generator(model, options, engine=e) for e in ("reference", "fast")} | others
    median = _interleaved(engines, prompts, max_gen_len, 1 if benchmark.disabled else REPEATS)
    fast, reference = median["fast"], median["reference"]
    benchmark.group = f"generate/{family}/d{model.config.model_dim}/c50/b{batch}/interleaved"
    out = benchmark.pedantic(engines["fast"], args=(prompts,), kwargs=dict(max_gen_len=max_gen_len), rounds=1,
                             iterations=1)
    assert out.lengths.tolist() == [50 + max_gen_len] * batch
    benchmark.extra_info.update(engine="fast", device="cpu", model_dim=model.config.model_dim, context=50,
                                batch=batch, dtype="float32", sentences_per_s=batch * max_gen_len / fast,
                                reference_s=reference, fast_s=fast, ratio=reference / fast,
                                **{f"{name}_s": median[name] for name in others})
    return median


@pytest.mark.parametrize("model_dim", [256, 512])
def test_target_ratio_interleaved(benchmark, model_dim):
    """extra_info also has, in the same window, ``fast_bf16_s`` (the fast engine on a bf16 copy of the model),
    ``fast_int8_s`` (int8 weights, fp32 activations), ``fast_bf16_int8_s`` (int8 weights, bf16 activations),
    ``fast_fp8_s`` (fp8 weights, fp32 activations: a GPU format, widened by F16C here) and the ratios of int8 to
    bf16."""
    model = two_tower(model_dim)
    options = lcm_fast.GenerationOptions.recommended(seed=1, eos_threshold=None)
    half = copy.deepcopy(model).to(torch.bfloat16)
    median = _interleaved_case(benchmark, "two_tower", model, 1, 1, fast_bf16=lcm_fast.Generator(half, options),
                               fast_int8=lcm_fast.Generator(model, options, weights="int8"),
                               fast_bf16_int8=lcm_fast.Generator(half, options, weights="int8"),
                               fast_fp8=lcm_fast.Generator(model, options, weights="fp8"))
    benchmark.extra_info.update(int8_over_bf16=median["fast_bf16"] / median["fast_int8"],
                                bf16_int8_over_bf16=median["fast_bf16"] / median["fast_bf16_int8"],
                                int8_ratio=median["reference"] / median["fast_int8"],
                                fp8_over_bf16=median["fast_bf16"] / median["fast_fp8"])


@pytest.mark.filterwarnings("ignore:cuda_graphs=True on a model that is not on a GPU")
def test_static_step_routes_interleaved(benchmark):
    """The static (graph-captured) Two-Tower step's two routes, on CPU without graphs, against the per-step fast engine
    in one window: ``static_s`` (its layers as composed fused ops) and ``static_inductor_s`` (compiled by Inductor;
    the warm-up call compiles). A GPU replays either as a CUDA graph (bench_generate -k gpu); on CPU this measures what
    Inductor's fusion does to the same computation, not the GPU's choice."""
    model = two_tower(256)
    options = lcm_fast.GenerationOptions.recommended(seed=1, eos_threshold=None)
    median = _interleaved_case(benchmark, "two_tower", model, 1, 2,
                               static=lcm_fast.Generator(model, options, cuda_graphs=True),
                               static_inductor=lcm_fast.Generator(model, options, cuda_graphs=True, inductor=True))
    benchmark.extra_info.update(inductor_over_composed=median["static"] / median["static_inductor"],
                                inductor_over_fast=median["fast"] / median["static_inductor"])


# Beam search over sampled concepts (issue 26): K candidates x B beams per document run as K x B rows through the fast
# engine's step, plus one scoring pass (the denoising-consistency scorer) per sentence; BEAM_SENTENCES sentences
# after a prompt of 50, every setting in one interleaved window against sampling one (1 x 1).
BEAMS = {"beam_1x1": (1, 1), "beam_4x1": (4, 1), "beam_2x2": (2, 2), "beam_4x2": (4, 2)}
BEAM_SENTENCES = 4


@pytest.mark.parametrize("batch", [1, 8])
def test_beam_search_cost_interleaved(benchmark, batch):
    """extra_info: each setting's seconds per call, sentences per second and cost (seconds over sampling one's)."""
    model = two_tower(256)
    prompts = torch.randn(batch, 50, model.sonar_dim) * 0.01
    generators = {name: lcm_fast.Generator(model, lcm_fast.GenerationOptions.recommended(
        seed=1, eos_threshold=None, num_candidates=k, beam_size=b)) for name, (k, b) in BEAMS.items()}
    median = _interleaved(generators, prompts, BEAM_SENTENCES, 1 if benchmark.disabled else REPEATS)
    benchmark.group = f"generate/two_tower/d256/c50/b{batch}/beams"
    out = benchmark.pedantic(generators["beam_4x2"], args=(prompts,), kwargs=dict(max_gen_len=BEAM_SENTENCES),
                             rounds=1, iterations=1)
    assert out.lengths.tolist() == [50 + BEAM_SENTENCES] * batch and len(out.beams[0]) == 2
    benchmark.extra_info.update(engine="fast", device="cpu", model_dim=256, context=50, batch=batch, dtype="float32",
                                **{f"{name}_s": median[name] for name in BEAMS},
                                **{f"{name}_sentences_per_s": batch * BEAM_SENTENCES / median[name] for name in BEAMS},
                                **{f"{name}_cost": median[name] / median["beam_1x1"] for name in BEAMS})


# Base-LCM in the 1.6B recipe's shape (32 layers, RMSNorm, SwiGLU, RoPE): a prompt of 50 sentences, then
# BASE_SENTENCES generated ones per document (one decoder pass each, on the KV cache); the prefill of the prompt
# is the same in both engines. One-Tower in the paper's 1.6B shape (32 layers, learned positions, RMSNorm): one
# sentence after 50 (the paper's sampling: 50 executed steps with CFG).
BASE_SENTENCES = 16


@pytest.mark.parametrize("model_dim", [256, 512])
@pytest.mark.parametrize("batch", [1, 8])
def test_generate_base_lcm_interleaved(benchmark, model_dim, batch):
    _interleaved_case(benchmark, "base_lcm", scaled_model("base_lcm_1_6B", model_dim), batch, BASE_SENTENCES)


@pytest.mark.parametrize("model_dim", [256, 512])
def test_generate_one_tower_interleaved(benchmark, model_dim):
    _interleaved_case(benchmark, "one_tower", scaled_model("one_tower_diffusion_lcm_1_6B", model_dim), 1, 1)


# Quant-LCM-D in the paper's shape (the One-Tower 1.6B stack over 64 x 8192 codebooks): one sentence after 50,
# 64 codebook passes with CFG on the logits.
@pytest.mark.parametrize("model_dim", [256, 512])
def test_generate_quant_lcm_interleaved(benchmark, model_dim):
    _interleaved_case(benchmark, "quant_lcm", scaled_model("quant_lcm_1_6B", model_dim), 1, 1)


# GPU: the 1.6B recipe's shape, random weights; the reference engine in fp32 (the official setting), the
# fast one in bf16 with and without CUDA-graph replay. Each call generates GPU_SENTENCES sentences per
# document; with graphs, the warm-up call captures them and every sentence of the timed calls replays (the
# generator keeps its buffers and graphs for calls of the same batch bucket and length bucket).
GPU_SENTENCES = 4
_GPU_MODELS: dict = {}


def gpu_two_tower(dtype: torch.dtype) -> lcm_fast.TwoTowerLCM:
    if dtype not in _GPU_MODELS:
        torch.manual_seed(0)
        config = lcm_fast.get_arch("two_tower_diffusion_lcm_1_6B")
        config.max_seq_len = 512
        _GPU_MODELS[dtype] = lcm_fast.build_model(config, device="cuda", dtype=dtype).eval()
    return _GPU_MODELS[dtype]


def _device_copy_bandwidth() -> float:
    """Bytes read + written per second by a 1 GiB device-to-device copy (the achievable peak)."""
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    dst.copy_(src)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(10):
        dst.copy_(src)
    torch.cuda.synchronize()
    return 2 * src.numel() * 10 / (time.perf_counter() - start)


def _gpu_cases():
    for batch, context in ((1, 50), (64, 200)):
        # the static step's two routes to few launches: composed fused ops, or Inductor (its warm-up compiles)
        for engine, dtype, graphs, weights, inductor in (
                ("reference", torch.float32, False, None, False), ("fast", torch.bfloat16, False, None, False),
                ("fast", torch.bfloat16, True, None, False), ("fast", torch.bfloat16, True, None, True),
                ("fast", torch.bfloat16, True, "int8", False), ("fast", torch.bfloat16, True, "fp8", False)):
            heavy = engine == "reference" and batch > 1  # ~30 s a call on an H200
            name = "-".join([engine, str(dtype).removeprefix("torch."), *(["graphs"] if graphs else []),
                             *([weights] if weights else []), *(["inductor"] if inductor else []), f"b{batch}"])
            yield pytest.param(engine, dtype, graphs, weights, inductor, batch, context, id=name,
                               marks=[pytest.mark.slow] if heavy else [])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("engine,dtype,graphs,weights,inductor,batch,context", list(_gpu_cases()))
def test_generate_two_tower_gpu(benchmark, engine, dtype, graphs, weights, inductor, batch, context):
    from lcm_fast.inference.fast import decoding_tables

    model = gpu_two_tower(dtype)
    options = lcm_fast.GenerationOptions.recommended(seed=1, eos_threshold=None)
    prompts = torch.randn(batch, context, model.sonar_dim, device="cuda") * 0.01
    generator = lcm_fast.Generator(model, options, engine=engine, cuda_graphs=graphs, weights=weights,
                                   inductor=inductor)

    def run():
        out = generator(prompts, max_gen_len=GPU_SENTENCES)
        torch.cuda.synchronize()
        return out

    benchmark.group = f"generate/two_tower/1.6B/c{context}/b{batch}"
    out = benchmark.pedantic(run, rounds=3, warmup_rounds=1)
    assert out.lengths.tolist() == [context + GPU_SENTENCES] * batch
    median = benchmark.stats.stats.median if benchmark.stats else float("nan")
    info = dict(engine=engine, device=torch.cuda.get_device_name(), model_dim=model.config.model_dim, context=context,
                batch=batch, dtype=str(dtype).removeprefix("torch."), cuda_graphs=graphs, weights=weights,
                inductor=inductor,
                sentences_per_s=batch * GPU_SENTENCES / median)
    if engine == "fast":  # denoiser weights streamed per step (composed; the modulation table replaces its MLP)
        sched = model.noise_scheduler.with_options()
        sched.set_timesteps(options.inference_timesteps, official_stride=options.official_timestep_stride)
        tables = decoding_tables(model.denoiser, sched.timesteps.tolist(), weights)  # the generator's, already built
        weight_bytes = sum(p.numel() * p.element_size() for p in [*tables.layers_args[0], *tables.io_params]
                           if p is not None and p.dim() == 2)
        info.update(weight_bytes_per_step=weight_bytes, steps=len(tables.timesteps),
                    weight_bytes_per_s=weight_bytes * len(tables.timesteps) * GPU_SENTENCES / median,
                    peak_copy_bytes_per_s=_device_copy_bandwidth())
    benchmark.extra_info.update(info)
