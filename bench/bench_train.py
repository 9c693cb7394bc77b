"""Training throughput (concepts/s) per variant, on CPU, at two small sizes.

Run: ``python -m pytest bench/bench_train.py --benchmark-json=train.json``. Each benchmark trains 3
optimizer steps on synthetic parquet data (batches of up to 512 padded concepts, 64 sentences per
document); ``extra_info`` has variant, size, device and concepts_per_s.
"""

from __future__ import annotations

import pytest
import torch

import lcm_fast
from lcm_fast.config import config_from_dict
from lcm_fast.training import DataConfig, TrainConfig, Trainer, write_documents

SIZES = {  # model dim, layers (each tower), heads, sonar dim
    "d128": (128, 2, 2, 256),
    "d512": (512, 4, 8, 1024),
}
FAMILIES = {"base": "base_lcm", "two_tower": "two_tower_diffusion_lcm", "one_tower": "one_tower_diffusion_lcm"}


def _model(variant: str, size: str):
    dim, layers, heads, sonar = SIZES[size]
    stack = dict(num_layers=layers, num_attn_heads=heads, ffn_inner_dim=4 * dim, dropout_p=0.1, final_dropout_p=0.0,
                 layer_normalization_style="rms", use_swiglu=True)
    common = dict(sonar_embed_dim=sonar, model_dim=dim, max_seq_len=128, sonar_normalizer_name="n")
    if variant == "base":
        mapping = dict(common, lcm=dict(stack, pos_embedding_style="rope"))
    elif variant == "one_tower":
        mapping = dict(common, lcm=dict(stack, pos_embedding_style="learned"), timestep_embed_dim=dim)
    else:
        mapping = dict(common, context_encoder=dict(stack, pos_embedding_style="rope"),
                       denoiser=dict(stack, pos_embedding_style="none", timestep_embed_dim=dim),
                       noise_scheduler=dict(num_diffusion_train_steps=100))
    torch.manual_seed(0)
    return lcm_fast.build_model(config_from_dict(FAMILIES[variant], mapping))


@pytest.mark.parametrize("size", sorted(SIZES))
@pytest.mark.parametrize("variant", sorted(FAMILIES))
def test_train_throughput(benchmark, tmp_path, variant, size):
    sonar = SIZES[size][3]
    g = torch.Generator().manual_seed(0)
    write_documents(tmp_path / "data.parquet", [torch.randn(64, sonar, generator=g) * 0.1 for _ in range(64)])
    data = DataConfig(files=[str(tmp_path / "data.parquet")], dim=sonar, max_sentences=64, max_concepts=512,
                      shuffle_buffer=16)
    runs = iter(range(1000))
    model = _model(variant, size)  # built once: the timing covers the training steps (and data reading)

    def train():
        cfg = TrainConfig(variant=variant, steps=3, warmup_steps=1, save_every=10**6, log_every=10**6,
                          out_dir=str(tmp_path / f"run{next(runs)}"))
        Trainer(model, cfg, data).train(progress=False)

    benchmark.group = f"train/{size}"
    benchmark.pedantic(train, rounds=3, warmup_rounds=1)
    median = benchmark.stats.stats.median if benchmark.stats else float("nan")
    benchmark.extra_info.update(variant=variant, size=size, device="cpu", dtype="float32",
                                concepts_per_s=3 * 512 / median)
