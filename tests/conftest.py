"""Shared helpers: the fixture directory, tiny randomly initialised models, official-format writers."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest
import torch
import yaml

import lcm_fast
from lcm_fast.config import BaseLCMConfig, TwoTowerConfig, config_from_dict

REFERENCE = Path(
    os.environ.get("LCM_FAST_REFERENCE_FIXTURES", Path(__file__).resolve().parents[1].parent / "shared/fixtures/reference_lcm")
)


def tiny_config(family: str, **overrides) -> BaseLCMConfig | TwoTowerConfig:
    """A small config (sonar dim 24, model dim 16, 2 heads) with ``overrides`` merged in."""
    stack = dict(num_layers=2, num_attn_heads=2, ffn_inner_dim=32, dropout_p=0.0, final_dropout_p=0.0)
    base = dict(sonar_embed_dim=24, model_dim=16, max_seq_len=32, sonar_normalizer_name="n")
    if family == "base_lcm":
        mapping = dict(base, lcm=stack)
    elif family == "one_tower_diffusion_lcm":
        mapping = dict(base, timestep_embed_dim=8, lcm=stack)
    elif family == "quant_lcm":
        mapping = dict(base, codebook_embed_dim=8, n_codebooks=4, codebook_size=16, lcm=stack)
    else:
        mapping = dict(base, context_encoder=stack, denoiser=dict(stack, timestep_embed_dim=16),
                       noise_scheduler=dict(num_diffusion_train_steps=100))
    return config_from_dict(family, _deep_merge(mapping, overrides))


def _deep_merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


#: Quant-LCM options whose every unit is drawn (top-k and top-p over the Gumbel-max draw) under CFG
SAMPLED_UNITS = dict(top_k=5, top_p=0.9, lcm_temperature=0.7, guidance_scale=2.0)


def random_model(config, seed: int = 0):
    """A model with random weights (non-trivial norms and normalizer statistics; a Quant-LCM's codebooks), in eval
    mode."""
    torch.manual_seed(seed)
    model = lcm_fast.build_model(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn_like(p) * (0.3 if p.dim() > 1 else 0.1) + (1.0 if name.endswith("norm.weight") else 0.0))
        if model.normalizer is not None:
            model.normalizer.center.normal_(0, 0.01)
            model.normalizer.scale.uniform_(0.5, 1.5)
        if hasattr(model, "rvq_codebooks"):  # Quant-LCM: random codebooks at the scale of the embeddings' residuals
            codebooks = 0.3 * torch.randn(model.rvq_codebooks.shape, generator=torch.Generator().manual_seed(seed + 1))
            model.set_codebooks(codebooks)
    return model.eval()


def write_official(directory: Path, model, state: dict | None = None, card_overrides: dict | None = None) -> Path:
    """Writes ``model`` as an official training run would: model.pt + model_card.yaml. Returns the card."""
    directory.mkdir(parents=True, exist_ok=True)
    torch.save({"model": state if state is not None else model.state_dict(), "model_key": "model"}, directory / "model.pt")
    card = {
        "name": "test_model",
        "model_family": model.config.model_type,
        "checkpoint": f"file:///nonexistent/{directory.name}/model.pt",
        "model_config": dataclasses.asdict(model.config),
        "__source__": "inproc",
        **(card_overrides or {}),
    }
    path = directory / "model_card.yaml"
    path.write_text(yaml.safe_dump(card))
    return path


@pytest.fixture(scope="session")
def faiss():
    """The faiss module, for the tests that compare with faiss; they skip where it is not installed (the GPU machine
    has none), and every other test of their module still runs."""
    return pytest.importorskip("faiss")


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    if not (REFERENCE / "manifest.json").is_file():
        pytest.fail(f"reference fixtures not found at {REFERENCE}; set LCM_FAST_REFERENCE_FIXTURES")
    return REFERENCE


CLI_DIM = 24
# a tiny Two-Tower (the toy arch's 1024-d stacks take minutes on CPU) and a quick schedule
CLI_CONFIG = ("model: {model_dim: 16, max_seq_len: 32, context_encoder: {num_layers: 1, num_attn_heads: 2, "
              "ffn_inner_dim: 32}, denoiser: {num_layers: 1, num_attn_heads: 2, ffn_inner_dim: 32, "
              "timestep_embed_dim: 16}}\ntrain: {warmup_steps: 1, save_every: 2, log_every: 1}\n"
              "data: {max_concepts: 48, max_sentences: 16}\n")


@pytest.fixture
def run(tmp_path):
    """run(*train flags, out="run") -> the argv of `lcm-fast train` on tiny data (tmp_path/train.parquet: 4
    documents of 6 random 24-d sentences) with the tiny config (tmp_path/cfg.yaml)."""
    from lcm_fast.training import write_documents

    g = torch.Generator().manual_seed(0)
    write_documents(tmp_path / "train.parquet", [torch.randn(6, CLI_DIM, generator=g) for _ in range(4)])
    (tmp_path / "cfg.yaml").write_text(CLI_CONFIG)

    def argv(*flags: str, out: str = "run") -> list[str]:
        return ["train", "--variant", "two_tower", "--data", str(tmp_path / "train.parquet"), "--config",
                str(tmp_path / "cfg.yaml"), "--out", str(tmp_path / out), *flags]

    return argv
