"""``lcm-fast {info, train, fit-normalizer}``: defaults come from the config dataclasses."""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path
from typing import Optional, Sequence

import yaml


def _train(args: argparse.Namespace) -> None:
    import torch
    import torch.distributed as dist

    import lcm_fast
    from lcm_fast.config import merge_into
    from lcm_fast.training import DataConfig, TrainConfig, Trainer

    overrides = yaml.safe_load(Path(args.config).read_text()) if args.config else {}
    arch = args.arch or {"base": "toy_base_lcm", "two_tower": "toy_two_tower_diffusion_lcm",
                         "one_tower": "toy_one_tower_diffusion_lcm"}[args.variant]
    model_cfg = lcm_fast.get_arch(arch)
    model_cfg = merge_into(model_cfg, overrides.get("model", {}))
    train_cfg = merge_into(TrainConfig(variant=args.variant, out_dir=args.out), overrides.get("train", {}))
    if args.steps is not None:
        train_cfg.steps = args.steps
    data_cfg = merge_into(DataConfig(files=args.data, dim=model_cfg.sonar_embed_dim), overrides.get("data", {}))
    if args.init:
        model = lcm_fast.from_pretrained(args.init)
    else:
        model = lcm_fast.build_model(model_cfg)
    if args.normalizer:
        if model.normalizer is None:
            raise SystemExit(f"--normalizer given but the {arch} model has none (set sonar_normalizer_name)")
        model.normalizer.load_state_dict(lcm_fast.load_normalizer(args.normalizer).state_dict())
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():  # launched by torchrun
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    device = args.device or (f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if torch.cuda.is_available() else "cpu")
    Trainer(model.to(device), train_cfg, data_cfg).train(resume=args.resume)
    if dist.is_initialized():
        dist.destroy_process_group()
    print(f"checkpoints in {Path(train_cfg.out_dir) / 'checkpoints'}")


def _weighted(item: str) -> tuple[str, float]:
    """``FILE`` or ``FILE:WEIGHT`` -> (file, weight)."""
    file, sep, weight = item.rpartition(":")
    try:
        return (file, float(weight)) if sep else (item, 1.0)
    except ValueError:  # a ':' that is part of the path
        return item, 1.0


def _fit_normalizer(args: argparse.Namespace) -> None:
    from lcm_fast.nn.normalizer import SonarNormalizer
    from lcm_fast.training.data import sample_embeddings

    sample = sample_embeddings([_weighted(item) for item in args.data], args.dim, args.sample, seed=args.seed)
    SonarNormalizer.fit(sample, args.method).save(args.out)
    print(f"fitted on {sample.shape[0]} sentence embeddings ({args.method}) -> {args.out}")


def main(argv: Optional[Sequence[str]] = None) -> None:
    from lcm_fast.archs import ARCHS
    from lcm_fast.training import LOSSES, TrainConfig

    parser = argparse.ArgumentParser(prog="lcm-fast", description="Large Concept Models: train, inspect.")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="build, environment and op backends (paste into bug reports)")
    train = sub.add_parser(
        "train",
        help="train an LCM on parquet embedding data",
        description="Train an LCM. Optimisation defaults are the official recipes' (TrainConfig): "
        + ", ".join(f"{f.name}={f.default!r}" for f in dataclasses.fields(TrainConfig) if f.name not in ("variant", "out_dir")),
    )
    train.add_argument("--variant", choices=sorted(LOSSES), required=True, help="which LCM variant to train")
    train.add_argument("--data", nargs="+", required=True, help="parquet files (column 'embeddings', optional 'prompt_len')")
    train.add_argument("--arch", choices=sorted(ARCHS), help="model preset (default: the variant's toy arch)")
    train.add_argument("--config", help="YAML with optional sections model:, train:, data: overriding the defaults")
    train.add_argument("--init", help="start from a model saved with save_pretrained instead of random weights")
    train.add_argument("--out", default="lcm_run", help="output directory (checkpoints/, metrics.jsonl)")
    train.add_argument("--steps", type=int, help="optimizer steps (overrides the config)")
    train.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    train.add_argument("--normalizer", help="normalizer statistics (.pt from fit-normalizer or an official one)")
    train.add_argument("--device", help="default: cuda (cuda:LOCAL_RANK under torchrun) when available, else cpu")
    fit = sub.add_parser("fit-normalizer", help="fit the SONAR normalizer on a weighted mix of parquet files")
    fit.add_argument("--data", nargs="+", required=True, help="parquet files, each optionally FILE:WEIGHT (default 1)")
    fit.add_argument("--dim", type=int, default=1024, help="embedding dim")
    fit.add_argument("--sample", type=int, default=1_000_000, help="sentence embeddings to sample in total")
    fit.add_argument("--method", choices=["gaussian_robust", "robust", "standard"], default="gaussian_robust")
    fit.add_argument("--seed", type=int, default=0)
    fit.add_argument("--out", required=True, help="output .pt (official normalizer format)")
    args = parser.parse_args(argv)
    if args.command == "info":
        from lcm_fast.info import main as info

        info()
    elif args.command == "fit-normalizer":
        _fit_normalizer(args)
    else:
        _train(args)


if __name__ == "__main__":
    main(sys.argv[1:])
