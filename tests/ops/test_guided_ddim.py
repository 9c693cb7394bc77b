"""guided_ddim_step_: compiled kernel vs its PyTorch reference, opcheck, torch.compile, dispatch."""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import lcm_fast
from lcm_fast import DDIMScheduler, SchedulerConfig
from lcm_fast.ops import guided_ddim_step_, guided_ddim_step_ref, sampler_params
from lcm_fast.ops.guided_ddim import SPEC

from ..tolerances import GUIDED_DDIM_ATOL, GUIDED_DDIM_FP32

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() and SPEC.has_kernel("cuda") else [])
DTYPES = [torch.float32, torch.bfloat16, torch.float16]

# real coefficient rows: T=100 cosine + zero-terminal-SNR, 10 trailing steps, eta 0.4 (row 0 is t=T-1)
_SCHED = DDIMScheduler(SchedulerConfig(num_diffusion_train_steps=100))
_SCHED.set_timesteps(10)
TABLE = _SCHED.coefficient_table(0.4, guided=True)


def _inputs(B, D, dtype, device, *, cfg, row, noise, seed=0):
    g = torch.Generator().manual_seed(seed)
    mk = lambda *shape: torch.randn(*shape, generator=g).to(device=device, dtype=dtype)
    latents = mk(B, D)
    model_out = mk((2 if cfg else 1) * B, D)
    n = mk(B, D) if noise else None
    return latents, model_out, TABLE[row].to(device), n


def _run(fn, latents, model_out, coef, params, noise, pt, **kw):
    lat, x0 = latents.clone(), torch.empty_like(latents)
    fn(lat, x0, model_out, coef, params, noise, pt, **kw)
    return lat, x0


def _check(latents, model_out, coef, params, noise, pt):
    """Kernel against the reference: fp32 tight; half types by the 2x rule against an fp64 oracle."""
    ext = _run(guided_ddim_step_, latents, model_out, coef, params, noise, pt, backend="ext")
    ref = _run(guided_ddim_step_ref, latents, model_out, coef, params, noise, pt)
    d64 = lambda t: t.double() if t is not None else None
    oracle = _run(guided_ddim_step_ref, d64(latents), d64(model_out), coef.double(), params.double(), d64(noise), pt)
    D = latents.shape[-1]
    fp32 = latents.dtype == torch.float32
    # fp32: within GUIDED_DDIM_FP32 of the fp32 reference (growing like sqrt(D): the rescale ratio sums
    # D terms). Ill-conditioned rows (std(g) ~ 0 with tiny D) may exceed that; then, as for half types,
    # the kernel must be no worse than twice the reference's own error against the fp64 oracle.
    tol = GUIDED_DDIM_FP32 * max(1.0, math.sqrt(D / 1024))
    for got, same_dtype, best in zip(ext, ref, oracle):
        assert got.dtype == latents.dtype
        finite = torch.isfinite(best)
        assert torch.equal(torch.isfinite(got), finite) and torch.equal(torch.isfinite(same_dtype), finite)
        if fp32 and torch.allclose(got[finite], same_dtype[finite], atol=tol, rtol=tol):
            continue
        err = (got.double() - best)[finite].abs().max().item() if finite.any() else 0.0
        err_ref = (same_dtype.double() - best)[finite].abs().max().item() if finite.any() else 0.0
        atol = tol if fp32 else GUIDED_DDIM_ATOL[str(latents.dtype)]
        assert err <= 2 * err_ref + atol, (err, err_ref)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("D", [1, 3, 1023, 1024, 1025, 2048, 4096])
@pytest.mark.parametrize("cfg", [True, False], ids=["cfg", "nocfg"])
def test_kernel_matches_reference(device, dtype, D, cfg):
    params = sampler_params(3.0, 0.7, 1.00045, 100.0, device=device)
    for pt in (0, 1, 2):
        for row in (0, 1, 5, 9):  # row 0: t = T-1 (first step under CFG; a_t = 0)
            if pt != 0 and row == 0:
                continue  # epsilon/v at a_t = 0 divide by zero in the official code too
            for noise in (False, True):
                inputs = _inputs(3, D, dtype, device, cfg=cfg, row=row, noise=noise, seed=D + row)
                _check(*inputs[:3], params, inputs[3], pt)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("B", [1, 64, 257])
def test_batch_sizes_and_clips(device, B):
    """Many rows (parallel_for chunks), active clip_noise and clip_sample."""
    params = sampler_params(2.0, 0.5, None, 0.8, clip_sample_range=0.5, device=device)
    latents, model_out, coef, noise = _inputs(B, 1024, torch.float32, device, cfg=True, row=3, noise=True)
    _check(latents * 3, model_out * 3, coef, params, noise, 0)
    lat, x0 = _run(guided_ddim_step_, latents * 3, model_out * 3, coef, params, noise, 0, backend="ext")
    assert lat.abs().max() <= 0.8 and x0.abs().max() <= 0.5


def _non_finite(t: torch.Tensor) -> tuple:
    return torch.isnan(t), torch.isposinf(t), torch.isneginf(t)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_non_finite_values_propagate_alike(device, dtype):
    """Every backend gives the reference's non-finite pattern (NaN, +inf, -inf per element): a NaN passes both
    clips (torch.clamp keeps it) and is never turned into +-clip. The degenerate D = 1 rescale (std of one value:
    0/0) is NaN at every guided step, as in the official code; the first CFG step, which takes no guidance, and
    steps without CFG stay finite."""
    params = sampler_params(3.0, 0.7, 1.00045, 100.0, device=device)
    latents, model_out, coef, noise = _inputs(3, 64, dtype, device, cfg=True, row=4, noise=True)
    model_out[0, 5], model_out[1, 7], model_out[4, 9] = math.nan, math.inf, -math.inf
    latents[2, 3] = math.nan
    for cfg_out in (model_out, model_out[:3]):
        ext = _run(guided_ddim_step_, latents, cfg_out, coef, params, noise, 0, backend="ext")
        ref = _run(guided_ddim_step_ref, latents, cfg_out, coef, params, noise, 0)
        for got, want in zip(ext, ref):
            assert not torch.isfinite(want).all()
            assert all(torch.equal(a, b) for a, b in zip(_non_finite(got), _non_finite(want)))
    params = sampler_params(3.0, 0.0, None, 100.0, device=device)  # rescale 0: the ratio is still formed
    for row, finite in ((0, True), (4, False)):
        latents, model_out, coef, _ = _inputs(2, 1, dtype, device, cfg=True, row=row, noise=False)
        for backend in ("ext", "ref"):
            lat, x0 = _run(guided_ddim_step_, latents, model_out, coef, params, None, 0, backend=backend)
            assert bool(torch.isfinite(lat).all()) == bool(torch.isfinite(x0).all()) == finite
            assert finite or (torch.isnan(lat).all() and torch.isnan(x0).all())


@settings(max_examples=500, deadline=None)
@given(
    B=st.integers(1, 9),
    D=st.integers(8, 300),  # D < 8 with random data is often ill-conditioned (std(g) ~ 0): see the grid test
    dtype=st.sampled_from(DTYPES),
    cfg=st.booleans(),
    row=st.integers(1, 9),
    pt=st.integers(0, 2),
    noise=st.booleans(),
    w=st.floats(0.0, 8.0),
    phi=st.floats(0.0, 1.0),
    scaling=st.sampled_from([None, 1.0005, 1.1]),
    seed=st.integers(0, 2**16),
)
def test_fuzz(B, D, dtype, cfg, row, pt, noise, w, phi, scaling, seed):
    params = sampler_params(w, phi, scaling, 100.0)
    inputs = _inputs(B, D, dtype, "cpu", cfg=cfg, row=row, noise=noise, seed=seed)
    _check(*inputs[:3], params, inputs[3], pt)


def test_first_step_ignores_guidance():
    """coef[first_step] = 1 selects the conditional prediction: the unconditional half has no effect."""
    params = sampler_params(3.0, 0.7, 1.00045, 100.0)
    latents, model_out, coef, _ = _inputs(2, 64, torch.float32, "cpu", cfg=True, row=0, noise=False)
    other = model_out.clone()
    other[2:] = 1e3
    for backend in ("ext", "ref"):
        a = _run(guided_ddim_step_, latents, model_out, coef, params, None, 0, backend=backend)
        b = _run(guided_ddim_step_, latents, other, coef, params, None, 0, backend=backend)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and torch.equal(a[1], model_out[:2])


def test_matches_scheduler_chain():
    """One CFG step equals the official chain: get_epsilon, guidance + rescale, step(epsilon), clip."""
    from lcm_fast.diffusion import classifier_free_guidance

    latents, model_out, _, noise = _inputs(4, 256, torch.float32, "cpu", cfg=True, row=4, noise=True)
    t = _SCHED.timesteps[4].item()
    eps = _SCHED.get_epsilon(model_out, torch.cat((latents, latents)), t)
    guided = classifier_free_guidance(eps[:4], eps[4:], 3.0, 0.7)
    out = _SCHED.step(guided, t, latents, eta=0.4, prediction_type="epsilon", epsilon_scaling=1.00045, variance_noise=noise)
    params = sampler_params(3.0, 0.7, 1.00045, 100.0)
    for backend in ("ref", "ext"):
        lat, x0 = _run(guided_ddim_step_, latents, model_out, TABLE[4], params, noise, 0, backend=backend)
        torch.testing.assert_close(lat, out.prev_sample, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(x0, out.pred_original_sample, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("cfg", [True, False])
@pytest.mark.parametrize("noise", [True, False])
def test_opcheck(cfg, noise):
    latents, model_out, coef, n = _inputs(3, 40, torch.float32, "cpu", cfg=cfg, row=2, noise=noise)
    args = (latents.clone(), torch.empty_like(latents), model_out, coef, sampler_params(3.0, 0.7, None, 100.0), n, 0)
    torch.library.opcheck(torch.ops.lcm_fast.guided_ddim_step_.default, args)


def test_torch_compile_fullgraph():
    params = sampler_params(3.0, 0.7, 1.00045, 100.0)
    latents, model_out, _, _ = _inputs(2, 128, torch.float32, "cpu", cfg=True, row=1, noise=False)

    def loop(lat, x0, table):
        for i in range(1, 4):
            guided_ddim_step_(lat, x0, model_out, table[i], params, None, 0)
        return lat, x0

    compiled = torch.compile(loop, fullgraph=True, backend="aot_eager")
    a = compiled(latents.clone(), torch.empty_like(latents), TABLE)
    b = loop(latents.clone(), torch.empty_like(latents), TABLE)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_argument_errors():
    latents, model_out, coef, _ = _inputs(2, 16, torch.float32, "cpu", cfg=True, row=1, noise=False)
    params = sampler_params(3.0, 0.7, None, 100.0)
    op = torch.ops.lcm_fast.guided_ddim_step_
    x0 = torch.empty_like(latents)
    with pytest.raises(RuntimeError, match=r"model_out must be \[B, D\] or \[2B, D\]"):
        op(latents, x0, model_out[:3], coef, params, None, 0)
    with pytest.raises(RuntimeError, match="coef must be a contiguous float32"):
        op(latents, x0, model_out, coef[:4], params, None, 0)
    with pytest.raises(RuntimeError, match="must be contiguous"):
        op(latents.t().contiguous().t(), x0, model_out, coef, params, None, 0)
    with pytest.raises(RuntimeError, match="one dtype and device"):
        op(latents, x0, model_out.double(), coef, params, None, 0)
    with pytest.raises(RuntimeError, match="prediction_type must be"):
        op(latents, x0, model_out, coef, params, None, 7)


def test_dispatch_rules(monkeypatch, recwarn):
    assert SPEC.choose("cpu", torch.float32) == "ext"
    assert SPEC.choose("cpu", torch.float32, "ref") == "ref"
    with lcm_fast.set_backend("ref"):
        assert SPEC.choose("cpu", torch.float32) == "ref"
        assert SPEC.choose("cpu", torch.float32, "ext") == "ext"  # explicit argument wins
    monkeypatch.setenv("LCM_FAST_BACKEND", "ref")
    assert SPEC.choose("cpu", torch.float32) == "ref"
    monkeypatch.setenv("LCM_FAST_BACKEND", "auto")
    with pytest.raises(RuntimeError, match=r"backend 'ext' requested but it cannot run: dtype torch.float64 not supported"):
        SPEC.choose("cpu", torch.float64, "ext")
    assert SPEC.choose("cpu", torch.float64) == "ref"
    assert any("falls back to the PyTorch reference" in str(w.message) for w in recwarn)
    if not SPEC.has_kernel("cuda"):
        with pytest.raises(RuntimeError, match="no cuda kernel compiled"):
            SPEC.choose("cuda", torch.float32, "ext")
    assert SPEC.reasons("cuda", torch.float32, dim=10000)[-1] == "D=10000 > 8192 (one block per row)"
    with pytest.raises(ValueError, match="unknown backend 'fast'"):
        SPEC.choose("cpu", torch.float32, "fast")


def test_multithreaded_equals_single_threaded():
    """Rows are independent: the result does not depend on the thread count."""
    code = """
import torch
from lcm_fast.ops import guided_ddim_step_, sampler_params
torch.manual_seed(0)
lat, out, c = torch.randn(64, 1024), torch.randn(128, 1024), torch.tensor([0.5, 0.8, 0.6, 0.7, 0.0, 0.0])
x0 = torch.empty_like(lat)
guided_ddim_step_(lat, x0, out, c, sampler_params(3.0, 0.7, None, 100.0), None, 0, backend="ext")
torch.save((lat, x0), "{path}")
"""
    results = []
    for threads in ("1", "2"):
        path = f"/tmp/lcm_fast_threads_{threads}_{os.getpid()}.pt"
        env = dict(os.environ, OMP_NUM_THREADS=threads)
        subprocess.run([sys.executable, "-c", code.format(path=path)], check=True, env=env)
        results.append(torch.load(path))
        os.unlink(path)
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])


@pytest.mark.slow
@settings(max_examples=5000, deadline=None)
@given(
    B=st.integers(1, 33), D=st.integers(8, 2100), dtype=st.sampled_from(DTYPES), cfg=st.booleans(),
    row=st.integers(1, 9), pt=st.integers(0, 2), noise=st.booleans(), w=st.floats(0.0, 8.0),
    phi=st.floats(0.0, 1.0), seed=st.integers(0, 2**16),
)
def test_fuzz_slow(B, D, dtype, cfg, row, pt, noise, w, phi, seed):
    inputs = _inputs(B, D, dtype, "cpu", cfg=cfg, row=row, noise=noise, seed=seed)
    _check(*inputs[:3], sampler_params(w, phi, 1.0005, 100.0), inputs[3], pt)
