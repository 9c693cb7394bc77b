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
