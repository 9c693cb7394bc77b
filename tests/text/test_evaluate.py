"""Text metrics and `lcm-fast eval`."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from lcm_fast.evaluation import ovl3, rep4, rouge_l, word_count_ratio
from lcm_fast.text.pipeline import DEMO_DIR


def test_text_metrics():
    assert rouge_l("the cat sat on the mat", "the cat sat on the mat") == 1.0
    # LCS "the cat the mat" (4) over 6 and 5 words: P = 4/6, R = 4/5
    assert rouge_l("the cat sat on the mat", "the cat ate the mat") == pytest.approx(2 * (4 / 6) * 0.8 / (4 / 6 + 0.8))
    assert rouge_l("", "x") == 0.0 and rouge_l("a b", "c d") == 0.0
    assert ovl3("a b c d", "x a b c y") == 0.5  # source 3-grams (a b c), (b c d): one copied
    assert rep4("a b c d a b c d") == pytest.approx(1 / 5)  # 5 4-grams, one repeats
    assert rep4("a b c") == 0.0
    assert word_count_ratio("a b c", "A, b!") == 1.5


def test_cli_eval_on_the_demo_data(tmp_path):
    """`lcm-fast eval` on documents prepared from text: every metric is reported."""
    from lcm_fast.text import load_encoder
    from lcm_fast.text.prepare import prepare

    docs = [{"text": "The system crashed at night. Nobody noticed until morning. Then the admin rebooted it. "
                     "Everything came back. The logs were full of errors. A patch followed."},
            {"text": "Hackers enjoy clever code. They share it freely. Some write long programs. Others tinker. "
                     "Bugs are found and fixed. The cycle repeats."}]
    (tmp_path / "held_out.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    manifest = prepare([tmp_path / "held_out.jsonl"], tmp_path / "data", load_encoder(), progress=False)
    shards = [str(tmp_path / "data" / s) for s in manifest["shards"]]
    cli = subprocess.run([sys.executable, "-m", "lcm_fast", "eval", "--model", str(DEMO_DIR), "--data", *shards,
                          "--steps", "10", "--json", str(tmp_path / "m.json")], capture_output=True, text=True)
    assert cli.returncode == 0, cli.stderr
    result = json.loads((tmp_path / "m.json").read_text())
    assert set(result["teacher_forced"]) == {"l2", "ca", "par", "l2_r"}
    assert set(result["generation"]) == {"rouge_l", "ovl3", "rep4", "word_ratio", "similarity"}
    assert 0 <= result["generation"]["rouge_l"] <= 1 and 0 <= result["teacher_forced"]["ca"] <= 1
    assert result["decoder"] == {"bank_overlap": 0.0} and "leak" not in cli.stderr  # the demo's bank: other text

    # the data's own bank holds every evaluated sentence: reported, and warned about
    cli = subprocess.run([sys.executable, "-m", "lcm_fast", "eval", "--model", str(DEMO_DIR), "--data", *shards,
                          "--decoder", str(tmp_path / "data" / "bank"), "--steps", "10", "--max-docs", "1"],
                         capture_output=True, text=True)
    assert cli.returncode == 0, cli.stderr
    assert "decoder: bank_overlap=1.0000" in cli.stdout
    assert "the sentence bank holds 100% of the evaluated sentences" in cli.stderr


def test_validation_warns_on_a_leaking_bank(tmp_path):
    """Training validation with valid_bank = the validation data's own bank: warned once; l2_r still reported."""

    from lcm_fast.text import load_encoder
    from lcm_fast.text.prepare import prepare
    from lcm_fast.text.retrieval import RetrievalDecoder
    from lcm_fast.training import DataConfig, TrainConfig, Trainer

    from ..conftest import random_model, tiny_config

    docs = [{"text": f"Sentence one of {i}. Sentence two of {i}. Sentence three of {i}. And a fourth."} for i in range(3)]
    (tmp_path / "valid.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    manifest = prepare([tmp_path / "valid.jsonl"], tmp_path / "data", load_encoder(), progress=False)
    files = [str(tmp_path / "data" / s) for s in manifest["shards"]]
    model = random_model(tiny_config("two_tower_diffusion_lcm", sonar_embed_dim=384))
    data = DataConfig(files=files, dim=384)
    cfg = TrainConfig(variant="two_tower", steps=1, valid_bank=str(tmp_path / "data" / "bank"), valid_batches=1,
                      valid_diffusion_steps=2, out_dir=str(tmp_path / "run"))
    trainer = Trainer(model, cfg, data, data)
    with pytest.warns(UserWarning, match="validation: the sentence bank holds 100% of the evaluated sentences"):
        metrics = trainer.validate()
    assert metrics["l2_r"] >= 0
    bank = RetrievalDecoder.load(tmp_path / "data" / "bank")
    assert bank.overlap(["Sentence one of 0.", "not in the bank"]) == 0.5 and bank.overlap([]) == 0.0

