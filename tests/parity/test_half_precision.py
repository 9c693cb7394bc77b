"""bf16 and fp16 generation (the official code only runs fp32): close to the official fp32 outputs.

The noise is drawn from each run's seed (the same stream as the official fp32 run), so a half-precision
run that stops at another length still draws valid noise.

Measured on the public fixtures (normalized space, fast engine with its composed self-attention
projection): bf16 max|err| 0.13, min cosine 0.9983 (two_tower_b, 40 CFG steps); fp16 max|err| 0.011, min
cosine 0.99999 (earlier engine: bf16 0.23 / 0.9950, fp16 0.015 / 0.99998). The thresholds leave >= 2x
headroom in 1 - cosine.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import lcm_fast

from .conftest import FIXTURES, generation_runs, loaded_model, model_fixture

MIN_COSINE = {torch.bfloat16: 0.99, torch.float16: 0.9999}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("name,tag", generation_runs())
def test_half_precision_generation(name, tag, dtype):
    fx = model_fixture(name)
    model = lcm_fast.load_official(FIXTURES / fx.spec["model_card"], dtype=dtype)
    assert next(model.parameters()).dtype == dtype
    run = fx.spec["generate"][tag]
    out = lcm_fast.generate(
        model, fx[fx.spec["prompt"]["raw_seqs"]], fx[fx.spec["prompt"]["seq_lens"]],
        options=lcm_fast.GenerationOptions.from_dict(run["options"]),
        eos_vec=fx[run["eos_vec"]] if run.get("eos_vec") else None,
        **run["call"],
    )
    expected, lens = fx[run["output_seqs"]], fx[run["output_lens"]]
    norm = loaded_model(name).normalizer  # fp32
    for doc, seq in enumerate(out.sequences):
        assert seq.dtype == dtype and torch.isfinite(seq).all()
        n = min(seq.shape[0], int(lens[doc]))
        a, b = seq[:n].float(), expected[doc, :n]
        if norm is not None:
            a, b = norm.normalize(a), norm.normalize(b)
        assert F.cosine_similarity(a, b).min() >= MIN_COSINE[dtype]
