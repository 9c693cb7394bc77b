"""``lcm-fast {info, train}``: defaults come from the config dataclasses, never redefined here."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import Optional, Sequence

import yaml


def _train(args: argparse.Namespace) -> None:
    import lcm_fast
    from lcm_fast.config import merge_into
    from lcm_fast.training import DataConfig, TrainConfig, Trainer

    overrides = yaml.safe_load(Path(args.config).read_text()) if args.config else {}
    arch = args.arch or ("toy_base_lcm" if args.variant == "base" else "toy_two_tower_diffusion_lcm")
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
    Trainer(model, train_cfg, data_cfg).train(resume=args.resume)
    print(f"checkpoints in {Path(train_cfg.out_dir) / 'checkpoints'}")


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
    args = parser.parse_args(argv)
    if args.command == "info":
        from lcm_fast.info import main as info

        info()
    else:
        _train(args)


if __name__ == "__main__":
    main(sys.argv[1:])
