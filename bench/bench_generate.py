"""Reference-engine generation throughput: the baseline the fast engine is measured against.

Run: ``python -m pytest bench/bench_generate.py --benchmark-columns=min,median,rounds``.
``extra_info["sentences"]`` is the number of sentences generated per call (sentences/s = that / time).
"""

from __future__ import annotations

import pytest
import torch

import lcm_fast

CASES = {
    # model, options, max_gen_len
    "two_tower_cfg40": ("two_tower_a", lcm_fast.GenerationOptions.recommended(seed=1), 4),
    "two_tower_nocfg10": ("two_tower_a", lcm_fast.GenerationOptions(inference_timesteps=10, seed=1), 4),
    "base_lcm_greedy": ("base_lcm_a", lcm_fast.GenerationOptions(sample_latent_variable=False), 16),
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("batch", [1, 8])
def test_reference_generation(benchmark, reference_dir, case, batch):
    name, options, max_gen_len = CASES[case]
    model = lcm_fast.load_official(reference_dir / name / "checkpoints/step_1")
    prompts = torch.randn(batch, 4, model.sonar_dim) * 0.006
    generator = lcm_fast.Generator(model, options)
    benchmark.group = f"generate/{case}"
    benchmark.extra_info.update(engine="reference", model=name, batch=batch, sentences=batch * max_gen_len,
                                device="cpu", dtype="float32")
    out = benchmark(generator, prompts, max_gen_len=max_gen_len)
    assert out.lengths.tolist() == [4 + max_gen_len] * batch
