"""Fused ops vs eager PyTorch: backend axis {ref (eager), compile (ref under torch.compile), ext}.

Run: ``python -m pytest bench/bench_ops.py --benchmark-columns=min,median --benchmark-json=ops.json``.
Every benchmark records ``extra_info`` keys op, backend, device, B, D, dtype and gbps (bytes moved
per second at the median time), so runs compare from the JSON file.
"""

from __future__ import annotations

import pytest
import torch

from lcm_fast import DDIMScheduler, SchedulerConfig
from lcm_fast.ops import (
    OPS,
    adaln_gated_residual_norm_modulate,
    adaln_gated_residual_norm_modulate_ref,
    adaln_norm_modulate,
    adaln_norm_modulate_ref,
    denoiser_layers_decode,
    denoiser_layers_decode_ref,
    guided_ddim_step_,
    guided_ddim_step_ref,
    sampler_params,
    skinny_linear,
    skinny_linear_ref,
)
from lcm_fast.ops.linear import PACKED_FORMATS, quantize_weight

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() and all("cuda" in s.kernels for s in OPS.values() if "cuda" in s.devices) else [])
BACKENDS = ["ref", "compile", "ext"]
SHAPES = [(B, D) for B in (1, 64, 4096) for D in (1024, 2048, 4096)]
# one static-shape compilation per (op, B, D) of the grid (dynamo's default limit is 8 per function)
torch._dynamo.config.recompile_limit = 64

_compiled: dict = {}


def _backend_fn(ref, ext, backend: str):
    """The callable for a backend: the reference, the reference under torch.compile, or the op."""
    if backend == "ext":
        return lambda *args, **kw: ext(*args, **kw, backend="ext")
    if backend == "ref":
        return ref
    if ref not in _compiled:
        _compiled[ref] = torch.compile(ref, fullgraph=True, dynamic=False)
    return _compiled[ref]


def _measure(benchmark, run, *, op, backend, device, B, D, dtype, moved_bytes):
    def timed():
        run()
        if device == "cuda":
            torch.cuda.synchronize()

    timed()  # warm-up (and compilation for the compile backend)
    benchmark.group = f"{op}/{device}/B{B}/D{D}"
    benchmark(timed)
    median = benchmark.stats.stats.median if benchmark.stats else float("nan")
    benchmark.extra_info.update(op=op, backend=backend, device=device, B=B, D=D,
                                dtype=str(dtype).removeprefix("torch."), gbps=moved_bytes / median / 1e9)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("B,D", SHAPES)
def test_guided_ddim_step(benchmark, device, backend, B, D):
    """CFG on: reads x [B, D] and model_out [2B, D], writes latents and x0."""
    sched = DDIMScheduler(SchedulerConfig(num_diffusion_train_steps=100))
    sched.set_timesteps(40)
    coef = sched.coefficient_table(guided=True)[10].to(device)
    params = sampler_params(3.0, 0.7, 1.00045, 100.0, device=device)
    latents = torch.randn(B, D, device=device)
    model_out = torch.randn(2 * B, D, device=device)
    x0 = torch.empty_like(latents)
    fn = _backend_fn(guided_ddim_step_ref, guided_ddim_step_, backend)
    _measure(benchmark, lambda: fn(latents, x0, model_out, coef, params, None, 0), op="guided_ddim_step_",
             backend=backend, device=device, B=B, D=D, dtype=latents.dtype, moved_bytes=6 * latents.nbytes)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("B,D", SHAPES)
@pytest.mark.parametrize("op", ["adaln_norm_modulate", "adaln_gated_residual_norm_modulate"])
def test_adaln(benchmark, device, backend, B, D, op):
    """RMSNorm with weight (the released archs' norm), fp32; B rows of D."""
    x, shift, scale, branch, gate = (torch.randn(B, D, device=device) for _ in range(5))
    weight = torch.randn(D, device=device)
    if op == "adaln_norm_modulate":
        fn = _backend_fn(adaln_norm_modulate_ref, adaln_norm_modulate, backend)
        run, moved = (lambda: fn(x, shift, scale, weight, None, rms=True)), 4 * x.nbytes
    else:
        fn = _backend_fn(adaln_gated_residual_norm_modulate_ref, adaln_gated_residual_norm_modulate, backend)
        run, moved = (lambda: fn(x, branch, gate, shift, scale, weight, None, rms=True)), 7 * x.nbytes
    _measure(benchmark, run, op=op, backend=backend, device=device, B=B, D=D, dtype=x.dtype, moved_bytes=moved)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", ["ref", "ext"])
@pytest.mark.parametrize("B,D", [(4096, 1024), (4096, 2048)])
def test_adaln_norm_modulate_backward(benchmark, device, backend, B, D):
    """Forward + backward of norm_modulate (training), RMSNorm with weight, fp32."""
    x, shift, scale = (torch.randn(B, D, device=device, requires_grad=True) for _ in range(3))
    weight = torch.randn(D, device=device, requires_grad=True)
    grad = torch.randn(B, D, device=device)
    fn = _backend_fn(adaln_norm_modulate_ref, adaln_norm_modulate, backend)

    def run():
        torch.autograd.grad(fn(x, shift, scale, weight, None, rms=True), (x, shift, scale, weight), grad)

    _measure(benchmark, run, op="adaln_norm_modulate+backward", backend=backend, device=device, B=B, D=D,
             dtype=x.dtype, moved_bytes=9 * x.nbytes)


# (K, N) of the Two-Tower denoiser's projections at model dim 256 / 1024 (q/o/v, SwiGLU in, SwiGLU out)
LINEAR_SHAPES = [(256, 256), (256, 768), (768, 256), (1024, 1024), (1024, 2816), (2816, 1024)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 2, 16, 50, 64])  # 50, 64: a batch-1 prompt's prefill
@pytest.mark.parametrize("K,N", LINEAR_SHAPES)
def test_skinny_linear(benchmark, device, backend, dtype, rows, K, N):
    """Decoding conditions: one call runs x [rows, K] through a set of distinct weights [N, K] (+ bias)
    totalling >= 64 MB, so every weight comes from memory as in a denoiser step, not from cache.
    gbps = weight bytes per second (B = rows, D = K; extra_info N)."""
    per = N * K * torch.tensor([], dtype=dtype).element_size()
    weights = [(torch.randn(N, K, device=device).to(dtype), torch.randn(N, device=device).to(dtype))
               for _ in range(max(1, (64 << 20) // per))]
    x = torch.randn(rows, K, device=device).to(dtype)
    fn = _backend_fn(skinny_linear_ref, skinny_linear, backend)

    def run():
        for w, b in weights:
            fn(x, w, b)

    _measure(benchmark, run, op="skinny_linear", backend=backend, device=device, B=rows, D=K, dtype=dtype,
             moved_bytes=per * len(weights))
    benchmark.extra_info["N"] = N


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("fmt", ["bf16", *PACKED_FORMATS])
@pytest.mark.parametrize("rows", [1, 2])  # batch 1 without and with CFG
@pytest.mark.parametrize("K,N", LINEAR_SHAPES)
def test_packed_skinny_linear(benchmark, device, fmt, rows, K, N):
    """Weight-only int8 / fp8 (fp32 x) against bf16 weights (bf16 x) at decoding's rows, through distinct weights
    totalling >= 64 MB of bf16 as test_skinny_linear (half of that packed). gbps = weight bytes read per second;
    compare the formats by time (the group's medians): a packed weight is half of bf16's bytes."""
    count = max(1, (64 << 20) // (2 * N * K))
    dense = [torch.randn(N, K) for _ in range(count)]
    weights = [(w.to(device, torch.bfloat16) if fmt == "bf16" else quantize_weight(w, fmt).to(device)) for w in dense]
    x = torch.randn(rows, K, device=device, dtype=torch.bfloat16 if fmt == "bf16" else torch.float32)

    def run():
        for w in weights:
            skinny_linear(x, w, backend="ext")

    _measure(benchmark, run, op="packed_skinny_linear", backend=fmt, device=device, B=rows, D=K, dtype=x.dtype,
             moved_bytes=sum(w.numel() * w.element_size() for w in weights))
    benchmark.extra_info.update(N=N, weights=fmt)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("chunk_kb", [256, 768, 1024, 4096, 65536])
def test_weight_streaming_floor(benchmark, device, chunk_kb):
    """The bandwidth a decoding step can hope for: ``torch.sum`` over distinct fp32 chunks of the size
    of one weight matrix, 64 MB in all (from memory, as test_skinny_linear). gbps = bytes read per second."""
    numel = chunk_kb << 8
    chunks = [torch.randn(numel, device=device) for _ in range(max(1, (64 << 20) // (numel * 4)))]

    def run():
        for c in chunks:
            c.sum()

    _measure(benchmark, run, op="weight_streaming_floor", backend="torch.sum", device=device, B=1, D=numel,
             dtype=torch.float32, moved_bytes=numel * 4 * len(chunks))


@pytest.mark.parametrize("backend", ["ref", "composed", "ext"])
@pytest.mark.parametrize("model_dim", [256, 512])
def test_denoiser_layers_decode(benchmark, backend, model_dim):
    """One fast-engine denoiser step, with the engine's arguments (composed self-attention projections,
    io_params): the 1.6B recipe's denoiser (13 layers, RMSNorm, SwiGLU, sonar dim 1024) at this model
    dim on a CFG pair (2 rows, context 50). ref: plain PyTorch; composed: the same ops with their fused
    kernels, issued from Python (the path on CUDA); ext: one C++ call. gbps = weight bytes per second
    (every projection the step reads; B = rows, D = model dim)."""
    from lcm_fast.config import DenoiserConfig
    from lcm_fast.inference.fast import decoding_tables
    from lcm_fast.models.two_tower import Denoiser
    from lcm_fast.nn.attention import KVCache

    config = DenoiserConfig(num_layers=13, num_attn_heads=model_dim // 64, ffn_inner_dim=4 * model_dim,
                            use_swiglu=True, layer_normalization_style="rms", mha_output_proj_bias=True,
                            pos_embedding_style="none", timestep_embed_dim=model_dim)
    torch.manual_seed(0)
    den = Denoiser(1024, model_dim, 512, config).eval().requires_grad_(False)
    tables = decoding_tables(den, [99, 97])
    caches = [KVCache(51) for _ in den.layers]
    for layer, cache in zip(den.layers, caches):
        cache.append(*layer.cross_attention.project_kv(torch.randn(1, 51, model_dim)))
    params, rms, eps, act, post_norms, qk_norm = tables.layers_args
    args = (torch.randn(2, 1024), tables.modulations[1], params, [c.k for c in caches], [c.v for c in caches], 51,
            None, 1, tables.uncond_cross, rms, eps, act, post_norms, qk_norm, tables.io_params)
    fn = {"ref": denoiser_layers_decode_ref, "composed": denoiser_layers_decode_ref, "ext": denoiser_layers_decode}
    sub = {"ref": "ref", "composed": None, "ext": "ext"}[backend]
    weights = sum(p.numel() * 4 for p in [*params, *tables.io_params] if p is not None and p.dim() == 2)
    _measure(benchmark, lambda: fn[backend](*args, backend=sub), op="denoiser_layers_decode", backend=backend,
             device="cpu", B=2, D=model_dim, dtype=torch.float32, moved_bytes=weights)
