"""`lcm-fast repro --quick`: the paper's Table 3 pipeline end to end on a few documents with tiny models."""

from __future__ import annotations

import pytest

from lcm_fast.cli.__main__ import main
from lcm_fast.text.corpus import load_corpus
from lcm_fast.text.repro import METRICS, VARIANTS, markdown, split_of

def test_quick_run_writes_the_table_and_the_chart(tmp_path, capsys):
    main(["repro", "--out", str(tmp_path / "r"), "--quick"])
    table = (tmp_path / "r" / "table.md").read_text()
    assert table in capsys.readouterr().out
    for name in VARIANTS:
        row = next(line for line in table.splitlines() if line.startswith(f"| {name} |"))
        values = [float(v) for v in row.strip("|").split("|")[1:]]
        assert len(values) == 4 and all(v >= 0 for v in values)  # l2, l2-r, PAR, CA (MI needs --mi-model)
    assert (tmp_path / "r" / "table.png").stat().st_size > 10_000
    with pytest.raises(SystemExit):
        main(["repro", "--out", str(tmp_path / "x"), "--steps", "0"])

def test_the_split_is_by_document_and_fixed():
    docs = load_corpus()
    splits = [split_of(d) for d in docs]
    assert {s: splits.count(s) / len(docs) for s in ("test", "valid")} == pytest.approx({"test": 0.05, "valid": 0.05},
                                                                                         abs=0.015)
    assert all(split_of(d) == "test" for d in docs if d.held_out)

def test_markdown_gives_the_spread_over_seeds():
    table = {"Two-Tower": {m: 0.5 for m in METRICS} | {m + "_std": 0.1 for m in METRICS}}
    text = markdown(table, seeds=3, steps=10, minutes=1.0, overlap=0.0)
    assert "| Two-Tower | 0.500 ± 0.100 |" in text and "(paper, ROC-stories)" in text
