"""Training throughput (concepts/s) per variant: two small sizes on CPU (fp32; bf16 autocast at d128), and
the released 1.6B shape on a GPU when there is one.

Run: ``python -m pytest bench/bench_train.py --benchmark-json=train.json``. Each benchmark round is a
``Trainer.train`` of 3 optimizer steps on synthetic parquet data (batches of up to 512 padded concepts, 64
sentences per document; no checkpoints); ``extra_info`` has variant, size, device, precision, concepts_per_s,
the model FLOPs of one step (forward + backward, counted by ``FlopCounterMode``) and the achieved TFLOP/s, plus
on GPUs of known peak the model FLOP utilisation (MFU). Those count the whole call (the trainer's start, the
first step's optimizer state); the ``steady_`` figures take the median of the trainer's own per-step rate
(``metrics.jsonl``) over steps 2 and 3 of every round: the step alone.
"""

from __future__ import annotations

import json
import statistics

import pytest
import torch

import lcm_fast
from lcm_fast.config import config_from_dict
from lcm_fast.flops import count_flops
from lcm_fast.training import DataConfig, TrainConfig, Trainer, write_documents
from lcm_fast.training.data import batches
from lcm_fast.training.losses import LOSSES

SIZES = {  # model dim, layers (each tower), heads, sonar dim
    "d128": (128, 2, 2, 256),
    "d512": (512, 4, 8, 1024),
}
#: dense bf16 tensor-core peaks (TFLOP/s, vendor datasheets) for the MFU of GPU runs
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}
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


def _step_flops(model, variant: str, data: DataConfig, precision: str) -> int:
    """Model FLOPs of one optimizer step's forward and backward (every batch of the step)."""
    batch = next(batches(data))
    device = next(model.parameters()).device
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
        flops, _ = count_flops(lambda: LOSSES[variant](model, batch, torch.Generator().manual_seed(0))[0].backward())
    model.zero_grad(set_to_none=True)
    return flops


def _run(benchmark, tmp_path, model, variant: str, size: str, precision: str, max_concepts: int = 512,
         rounds: int = 3) -> None:
    sonar = model.sonar_dim
    device = next(model.parameters()).device
    g = torch.Generator().manual_seed(0)
    write_documents(tmp_path / "data.parquet", [torch.randn(64, sonar, generator=g) * 0.1 for _ in range(64)])
    data = DataConfig(files=[str(tmp_path / "data.parquet")], dim=sonar, max_sentences=64, max_concepts=max_concepts,
                      shuffle_buffer=16)
    # no checkpoints (a 1.6B one with its optimizer state is ~19 GB: four rounds filled a 64 GB disk)
    cfg = TrainConfig(variant=variant, steps=3, warmup_steps=1, save_every=0, log_every=1, tensorboard=False,
                      precision=precision, out_dir=str(tmp_path / "run"))

    def train():
        Trainer(model, cfg, data).train(progress=False)
        if device.type == "cuda":
            torch.cuda.synchronize()

    benchmark.group = f"train/{size}"
    benchmark.pedantic(train, rounds=rounds, warmup_rounds=1)
    assert not any(tmp_path.rglob("checkpoints")), "a timed training round wrote a checkpoint"
    median = benchmark.stats.stats.median if benchmark.stats else float("nan")
    flops = _step_flops(model, variant, data, precision)
    tflops = 3 * flops / median / 1e12
    records = [json.loads(line) for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    steady = statistics.median(r["concepts_per_s"] for r in records if r["step"] > 1)  # full batches: ~max_concepts
    steady_tflops = flops * steady / max_concepts / 1e12
    info = dict(variant=variant, size=size, device=device.type, precision=precision,
                concepts_per_s=3 * max_concepts / median, step_flops=flops, achieved_tflops=tflops,
                steady_concepts_per_s=steady, steady_tflops=steady_tflops)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        peak = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)
        bf16 = peak is not None and precision == "bf16"
        info.update(gpu=name, mfu=tflops / peak if bf16 else None, steady_mfu=steady_tflops / peak if bf16 else None)
    benchmark.extra_info.update(info)


# bf16 autocast only at the small size: AVX2 CPUs have no bf16 arithmetic, so it is emulated and slow
@pytest.mark.parametrize("size,precision", [("d128", "fp32"), ("d128", "bf16"), ("d512", "fp32")])
@pytest.mark.parametrize("variant", sorted(FAMILIES))
def test_train_throughput(benchmark, tmp_path, variant, size, precision):
    # the model is built once: the timing covers the training steps (and data reading)
    _run(benchmark, tmp_path, _model(variant, size), variant, size, precision)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the 1.6B shape is measured on a GPU")
@pytest.mark.parametrize("variant", ["base", "two_tower"])
def test_train_throughput_1_6b_gpu(benchmark, tmp_path, variant):
    arch = {"base": "base_lcm_1_6B", "two_tower": "two_tower_diffusion_lcm_1_6B"}[variant]
    torch.manual_seed(0)
    model = lcm_fast.build_model(lcm_fast.get_arch(arch), device="cuda")
    _run(benchmark, tmp_path, model, variant, "1.6B", "bf16", max_concepts=4096)
