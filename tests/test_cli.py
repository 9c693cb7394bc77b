"""``lcm-fast`` as a new user meets it: training says what it does, the same command twice gives the same
checkpoints, the model fits the data, and the README's own-data path runs as written. (Bad inputs and the
messages they get: the catalogue in ``test_errors.py``.)"""

from __future__ import annotations

import glob
import os
import json
import shlex
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import lcm_fast
from lcm_fast.cli.__main__ import main
from lcm_fast.text.corpus import CORPUS_DIR
from lcm_fast.training import Trainer, write_documents

from .conftest import CLI_CONFIG


def test_train_says_what_it_does_and_reproduces(run, tmp_path, capsys):
    """A fresh run logs a line per log_every step when stderr is not a terminal, and ends with what it wrote;
    --resume says what it found; the same command twice gives bit-identical checkpoints (initial weights,
    dropout and batches all come from train.seed). The YAML's `lr: 1e-3` (a string to YAML 1.1) is a float."""
    (tmp_path / "cfg.yaml").write_text(CLI_CONFIG.replace("log_every: 1", "log_every: 1, lr: 1e-3"))
    main(run("--steps", "3", "--resume"))
    captured = capsys.readouterr()
    assert "no checkpoint in" in captured.err and "starting from step 0" in captured.err
    assert "train two_tower step 3/3: loss" in captured.err and "lr " in captured.err
    assert "trained to step 3; latest checkpoint" in captured.out
    main(run("--steps", "4", "--resume"))
    assert "resuming from" in capsys.readouterr().err
    main(run("--steps", "3", out="again"))
    first, second = (load_file(tmp_path / name / "checkpoints/step_3/model.safetensors") for name in ("run", "again"))
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    lr = [json.loads(line)["lr"] for line in (tmp_path / "again/metrics.jsonl").read_text().splitlines()]
    assert max(lr) == pytest.approx(1e-3)
    assert Trainer.latest_checkpoint(tmp_path / "run").name == "step_4"


def test_train_builds_the_model_for_the_datas_dim(tmp_path, capsys):
    """Data prepared with a 384-d encoder trains without a model section: the model takes the data's dim."""
    g = torch.Generator().manual_seed(0)
    write_documents(tmp_path / "shard.parquet", [torch.randn(5, 40, generator=g) for _ in range(3)])
    (tmp_path / "cfg.yaml").write_text("model: {model_dim: 16, lcm: {num_layers: 1, num_attn_heads: 2, "
                                       "ffn_inner_dim: 32}}\ndata: {max_concepts: 48, max_sentences: 16}\n")
    main(["train", "--variant", "base", "--data", str(tmp_path / "shard.parquet"), "--out", str(tmp_path / "run"),
          "--steps", "1", "--config", str(tmp_path / "cfg.yaml")])
    model = lcm_fast.from_pretrained(tmp_path / "run/checkpoints/step_1")
    assert model.sonar_dim == 40


def test_the_readme_own_data_path_end_to_end(tmp_path, monkeypatch, capsys):
    """prepare -> fit-normalizer -> train -> eval -> generate, then the corpus generation of "Generating for a
    corpus": the README's blocks, run line by line with their exact flags (the shell's globbing done here), on 24
    Jargon File entries (about 40 s on a 2-core CPU)."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    blocks = [readme.split(title, 1)[1].split("```bash\n", 1)[1].split("```", 1)[0]
              for title in ("Your own data, end to end", "## Generating for a corpus")]
    lines = [shlex.split(line) for block in blocks for line in block.strip().splitlines()]
    assert [line[1] for line in lines] == ["prepare", "fit-normalizer", "train", "eval", "generate", "generate"]
    source = CORPUS_DIR / "jargon.jsonl"
    monkeypatch.chdir(tmp_path)
    Path("docs.jsonl").write_text("".join(source.read_text().splitlines(keepends=True)[:24]))
    for line in lines:
        assert line[0] == ".venv/bin/lcm-fast"
        main([match for arg in line[1:] for match in (sorted(glob.glob(arg)) if "*" in arg else [arg])])
    out = capsys.readouterr().out
    assert "teacher_forced: l2=" in out and "generation: rouge_l=" in out
    assert [p.name for p in Trainer.complete_checkpoints("run")] == ["step_100"]
    assert lcm_fast.from_pretrained("run/checkpoints/step_100").sonar_dim == 384  # the data's (MiniLM) dim
    manifest = json.loads(Path("generated/generate.json").read_text())
    assert manifest["complete"] and sum(s["documents"] for s in manifest["shards"].values()) == 24


def test_the_readme_beam_search_section(capsys):
    """The README's beam search section as written: the CLI on the demo, then the Python API (about 10 s)."""
    section = (Path(__file__).resolve().parents[1] / "README.md").read_text().split("## Beam search over concepts", 1)[1]
    section = section.split("\n## ", 1)[0]
    line = shlex.split(section.split("```bash\n", 1)[1].split("```", 1)[0].strip())
    assert line[:2] == [".venv/bin/lcm-fast", "generate"] and "--beam-size" in line
    main(line[1:])
    assert len(capsys.readouterr().out.strip().splitlines()) == 3  # three decoded sentences
    exec(compile(section.split("```python\n", 1)[1].split("```", 1)[0], "README.md", "exec"), {})
    with pytest.raises(SystemExit):
        main(["generate", "--num-candidates", "0", "A sentence."])
    assert "GenerationOptions.num_candidates must be an integer >= 1, got 0" in capsys.readouterr().err


def test_the_readme_sonar_path(tmp_path, monkeypatch, capsys):
    """The README's SONAR section as written, with the toy SONAR-architecture weights of the test fixtures: the
    Python round trip, then prepare -> train -> generate with --encoder sonar --decoder sonar (about 15 s)."""
    root = Path(__file__).resolve().parents[1]
    section = (root / "README.md").read_text().split("## SONAR: text in, text out", 1)[1].split("\n## ", 1)[0]
    python = section.split("```python\n", 1)[1].split("```", 1)[0]
    lines = [shlex.split(line) for line in section.split("```bash\n", 1)[1].split("```", 1)[0].strip().splitlines()]
    assert [line[1] for line in lines] == ["prepare", "train", "generate"]
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tests/fixtures").mkdir(parents=True)
    (tmp_path / "tests/fixtures/sonar").symlink_to(root / "tests/fixtures/sonar")
    exec(compile(python, "README.md", "exec"), {})
    assert len(eval(capsys.readouterr().out)) == 2  # the printed list of two texts
    Path("docs.jsonl").write_text("".join((CORPUS_DIR / "jargon.jsonl").read_text().splitlines(keepends=True)[:12]))
    for line in lines:
        assert line[0] == ".venv/bin/lcm-fast"
        capsys.readouterr()
        main([match for arg in line[1:] for match in (sorted(glob.glob(arg)) if "*" in arg else [arg])])
    assert len(capsys.readouterr().out.strip().splitlines()) == 3  # generate: three decoded sentences
    assert lcm_fast.from_pretrained("sonar-run/checkpoints/step_20").sonar_dim == 32  # the toy SONAR's width


def test_the_thread_count_leaves_busy_cores_alone(monkeypatch, capsys):
    """Without --threads or OMP_NUM_THREADS, the CLI takes the cores that the load average leaves idle (OpenMP
    threads on busy cores spin: 100x slower measured); main() leaves the caller's thread count as it was."""
    from lcm_fast.cli.__main__ import _thread_count

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    for load, threads in ((0.2, 4), (2.6, 1), (1.4, 3), (9.0, 1)):
        monkeypatch.setattr(os, "getloadavg", lambda load=load: (load, 0.0, 0.0))
        assert _thread_count(None) == threads
    assert _thread_count(3) == 3
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert _thread_count(None) is None  # the user's setting stands
    before = torch.get_num_threads()
    with pytest.raises(SystemExit):
        main(["--threads", "1", "generate", "--sentences", "0", "Some text."])
    assert torch.get_num_threads() == before
