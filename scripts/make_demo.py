"""Rebuilds the shipped demo (python/lcm_fast/data/demo/): prepares the Jargon File excerpt with the default
MiniLM encoder, trains a small Two-Tower LCM on it with lcm_fast's own trainer, and writes the model
(native format, fp16) and the sentence bank. Deterministic given the seed; a few minutes on 2 CPU cores.

    python scripts/make_demo.py [--steps 3000] [--work /tmp/lcm_demo]
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "python"))

import lcm_fast  # noqa: E402
from lcm_fast.config import config_from_dict  # noqa: E402
from lcm_fast.nn.normalizer import SonarNormalizer  # noqa: E402
from lcm_fast.text import load_encoder  # noqa: E402
from lcm_fast.text.pipeline import DEMO_DIR  # noqa: E402
from lcm_fast.text.prepare import prepare  # noqa: E402
from lcm_fast.training import DataConfig, TrainConfig, Trainer  # noqa: E402
from lcm_fast.training.data import sample_embeddings  # noqa: E402

STACK = dict(num_attn_heads=4, ffn_inner_dim=768, dropout_p=0.1, final_dropout_p=0.0, layer_normalization_style="rms")
CONFIG = dict(sonar_embed_dim=384, model_dim=192, max_seq_len=64, sonar_normalizer_name="demo",
              context_encoder=dict(STACK, num_layers=2), denoiser=dict(STACK, num_layers=3, timestep_embed_dim=192),
              noise_scheduler=dict(num_diffusion_train_steps=100), trained_with_cf_guidance=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--work", default="/tmp/lcm_demo")
    parser.add_argument("--out", default=str(DEMO_DIR))
    args = parser.parse_args()
    work, out = Path(args.work), Path(args.out)
    corpus = ROOT / "python/lcm_fast/data/jargon/jargon.jsonl"
    manifest = prepare([corpus], work / "data", load_encoder("minilm"), shard_docs=100)
    files = [str(work / "data" / s) for s in manifest["shards"]]
    torch.manual_seed(0)
    model = lcm_fast.build_model(config_from_dict("two_tower_diffusion_lcm", CONFIG))
    model.normalizer.load_state_dict(SonarNormalizer.fit(sample_embeddings([(f, 1.0) for f in files], 384, 100_000),
                                                         "standard").state_dict())
    data = DataConfig(files=files, dim=384, max_sentences=32, max_concepts=512, shuffle_buffer=256)
    cfg = TrainConfig(variant="two_tower", steps=args.steps, lr=1e-3, warmup_steps=100, weight_decay=0.01,
                      save_every=args.steps, log_every=50, out_dir=str(work / "run"))
    model = Trainer(model, cfg, data).train()
    if out.exists():
        shutil.rmtree(out)
    model.half().sonar_normalizer.float()  # fp16 weights (a few MB); normalizer statistics stay fp32
    model.save_pretrained(out)
    shutil.copytree(work / "data" / "bank", out / "bank")
    print(f"demo model and bank -> {out}")


if __name__ == "__main__":
    main()
