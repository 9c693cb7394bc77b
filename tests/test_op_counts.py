"""The static (CUDA-graph) decoding step of each family on CPU: the operations it dispatches, and that
``torch.compile(fullgraph=True)`` traces it as one graph (the other route to fewer launches on a GPU).

On a GPU every operation of a step is a kernel launch or more, and a step of the 1.6B recipes at batch 1 reads its
weights in a fraction of the time its launches take (bench/RESULTS.md, "GPU check"): the count is the GPU cost that a
CPU run can see. The models have the layer structure of the paper's 1.6B recipes (the count depends on the layers,
not the width) at model dim 64. Budgets are per layer plus a per-step allowance; bench/RESULTS.md ("Operations per
decoding step") records the counts.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

import lcm_fast
from lcm_fast.archs import base_lcm_1_6B, one_tower_1_6B, quant_lcm_1_6B, two_tower_1_6B
from lcm_fast.inference.fast import FastDecoder, FastDenoiser
from lcm_fast.inference.generator import _QuantStepper
from lcm_fast.inference.graphs import OpCounter
from lcm_fast.nn.attention import KVCache

B = 2  # documents; with CFG twice as many rows


def _narrow(config):
    """The config's layer structure at model dim 64 (4 heads, FFN 128, sonar dim 32)."""
    stacks = {name: dataclasses.replace(getattr(config, name), num_attn_heads=4, ffn_inner_dim=128)
              for name in ("context_encoder", "denoiser", "lcm") if hasattr(config, name)}
    if "denoiser" in stacks:
        stacks["denoiser"] = dataclasses.replace(stacks["denoiser"], timestep_embed_dim=64)
    extra = dict(timestep_embed_dim=64) if hasattr(config, "timestep_embed_dim") else {}
    return dataclasses.replace(config, model_dim=64, sonar_embed_dim=32, max_seq_len=128, **stacks, **extra)


def _count(step) -> OpCounter:
    with torch.no_grad(), OpCounter() as ops:
        step()
    return ops


def _within(ops: OpCounter, layers: int, per_layer: int, per_step: int = 10) -> None:
    assert ops.total <= per_layer * layers + per_step, (
        f"{ops.total} ops for {layers} layers ({ops.total / layers:.1f} per layer), budget {per_layer} per layer + "
        f"{per_step}: {ops.counts.most_common()}")


def _two_tower_step(weights=None):
    """-> (step of latents [2B, 1, 32]: a CFG denoising step, its layers)."""
    torch.manual_seed(0)
    model = lcm_fast.build_model(_narrow(two_tower_1_6B())).eval()
    fast = FastDenoiser(model, list(range(99, -1, -10)), capacity=16, static_shapes=True, weights=weights)
    fast.append(torch.randn(B, 5, 64))
    return (lambda latents: fast(latents, 3, B)), len(model.denoiser.layers)  # conditional rows, then unconditional


def _decoder_step(config, weights=None):
    """-> (step of x [B, 1, 32] after one cached position, its layers): Base-LCM's prediction, or a One-Tower
    denoising step with CFG (the unconditional rows attend to themselves only)."""
    torch.manual_seed(0)
    model = lcm_fast.build_model(_narrow(config())).eval()
    stack = model if hasattr(model, "lcm") else model.backbone
    decoder = FastDecoder(stack, [KVCache(64, zeroed=True) for _ in stack.lcm.layers], static_shapes=True,
                          weights=weights)
    step = decoder if config is base_lcm_1_6B else (lambda x: decoder.denoise(x, 50, None, cfg=True))
    with torch.no_grad():
        step(torch.randn(B, 1, 32))
    decoder.advance()
    return step, len(stack.lcm.layers)


def _quant_pass(weights=None):
    """-> (a codebook pass of intermediate representations [B, 1, 32] after one cached position, its layers):
    Quant-LCM-D's static step with CFG, its 8192 units scored and sampled (top-k, Gumbel-max) and the centroid
    added."""
    torch.manual_seed(0)
    model = lcm_fast.build_model(_narrow(quant_lcm_1_6B())).eval()
    model.set_codebooks(0.1 * torch.randn(model.rvq_codebooks.shape))
    options = lcm_fast.GenerationOptions(top_k=3, lcm_temperature=0.7, guidance_scale=2.0)
    stepper = _QuantStepper(model, options, 64, lcm_fast.TorchNoise(0), fast=True, static_batch=B, weights=weights)
    with torch.no_grad():
        stepper.prefill(torch.randn(B, 1, 32))
    normals = torch.randn(B, model.config.codebook_size)

    def step(x):
        inter = x[:, 0].clone()
        stepper._pass(inter, 3, normals)
        return inter

    return step, len(model.lcm.layers)


STEPS = {"two_tower": (_two_tower_step, 2 * B), "base_lcm": (lambda: _decoder_step(base_lcm_1_6B), B),
         "one_tower": (lambda: _decoder_step(one_tower_1_6B), B), "quant_lcm": (_quant_pass, B)}


def test_two_tower_denoising_step():
    step, layers = _two_tower_step()
    latents = torch.randn(2 * B, 1, 32)
    ops = _count(lambda: step(latents))
    assert ops.counts["aten::clone"] == 0  # modulations are read in place, never expanded into copies
    _within(ops, layers, per_layer=10)  # 138 ops, 10.6 per layer (26.5 at 5412cce)


# Quant-LCM's pass is One-Tower's step plus the CFG combination, the units' scores, their sampling and the centroid's
# addition: 11 ops of the step's own
@pytest.mark.parametrize("family,per_layer,per_step", [("base_lcm", 10, 10), ("one_tower", 12, 10),
                                                       ("quant_lcm", 12, 20)])
def test_decoder_step(family, per_layer, per_step):
    step, layers = STEPS[family][0]()
    x = torch.randn(B, 1, 32)
    # 331, 379 and 390 ops (36.4 per layer for Base-LCM at 5412cce)
    _within(_count(lambda: step(x)), layers, per_layer, per_step)


@pytest.mark.parametrize("family", sorted(STEPS))
def test_the_step_compiles_as_one_graph(family):
    make, rows = STEPS[family]
    step, _ = make()
    x = torch.randn(rows, 1, 32)
    with torch.no_grad():
        eager = step(x)
        compiled = torch.compile(step, fullgraph=True, backend="eager")(x)  # fullgraph: a graph break fails
    torch.testing.assert_close(compiled, eager)


@pytest.mark.parametrize("family", ["two_tower", "base_lcm", "quant_lcm"])
def test_packed_weights_add_no_op_per_step(family):
    """The int8 / fp8 pack is made once, outside the step: the captured step dispatches the same ops (no dequantize,
    no copy of a weight), reads packed weights through the same linear ops, and still compiles as one graph."""
    make = {"two_tower": _two_tower_step, "quant_lcm": _quant_pass,
            "base_lcm": lambda weights=None: _decoder_step(base_lcm_1_6B, weights)}[family]
    rows = STEPS[family][1]
    x = torch.randn(rows, 1, 32)
    counts = []
    for weights in (None, "int8", "fp8"):
        step, _ = make(weights=weights)
        counts.append(_count(lambda: step(x)).counts)
    assert counts[0] == counts[1] == counts[2]
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(step, fullgraph=True, backend="eager")(x), step(x))
