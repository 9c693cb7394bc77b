#!/usr/bin/env python3
"""Where a training step's time goes on a GPU: ``torch.profiler`` over ``Trainer.train`` in the setting of
``bench/bench_train.py``'s 1.6B case (synthetic parquet data, batches of up to 4096 concepts, bf16 autocast,
no checkpoints), after an unprofiled warm-up call.

    python3 scripts/profile_train.py --arch base_lcm_1_6B --steps 3

Prints the wall time per step, the GPU's busy time per step (the union of its kernels' intervals), and the
operations with the most GPU time and the most CPU time.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

import lcm_fast
from lcm_fast.training import DataConfig, TrainConfig, Trainer, write_documents

VARIANTS = {"base_lcm_1_6B": "base", "two_tower_diffusion_lcm_1_6B": "two_tower"}


def _busy_us(events) -> float:
    """Microseconds during which at least one GPU kernel ran (overlapping kernels counted once)."""
    cuda = torch.autograd.DeviceType.CUDA
    spans = sorted((e.time_range.start, e.time_range.end) for e in events if e.device_type == cuda)
    busy, end = 0.0, float("-inf")
    for start, stop in spans:
        if stop > end:
            busy += stop - max(start, end)
            end = stop
    return busy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="base_lcm_1_6B", choices=sorted(VARIANTS))
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--concepts", type=int, default=4096, help="concepts per batch (bench_train's 1.6B case)")
    args = parser.parse_args()
    torch.manual_seed(0)
    model = lcm_fast.build_model(lcm_fast.get_arch(args.arch), device="cuda")
    with tempfile.TemporaryDirectory() as tmp:
        g = torch.Generator().manual_seed(0)
        write_documents(Path(tmp) / "data.parquet",
                        [torch.randn(64, model.sonar_dim, generator=g) * 0.1 for _ in range(64)])
        data = DataConfig(files=[str(Path(tmp) / "data.parquet")], dim=model.sonar_dim, max_sentences=64,
                          max_concepts=args.concepts, shuffle_buffer=16)
        cfg = TrainConfig(variant=VARIANTS[args.arch], steps=args.steps, warmup_steps=1, save_every=0, log_every=1,
                          tensorboard=False, precision="bf16", out_dir=str(Path(tmp) / "run"))
        Trainer(model, cfg, data).train(progress=False)  # warm-up: allocator, cuBLAS, autocast caches
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            start = time.perf_counter()
            Trainer(model, cfg, data).train(progress=False)
            torch.cuda.synchronize()
            wall = time.perf_counter() - start
    busy = _busy_us(prof.events()) / 1e6
    print(f"{args.arch}: {wall / args.steps * 1e3:.0f} ms per step (whole call / steps), GPU busy "
          f"{busy / args.steps * 1e3:.0f} ms per step ({busy / wall:.0%} of the wall time)")
    averages = prof.key_averages()
    print(averages.table(sort_by="self_device_time_total", row_limit=20, max_name_column_width=60))
    print(averages.table(sort_by="self_cpu_time_total", row_limit=15, max_name_column_width=60))


if __name__ == "__main__":
    main()
