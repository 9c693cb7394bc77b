"""The MI coherence metric with a real (tiny, randomly initialised) GPT-2 and a byte-level BPE tokenizer
trained here on the vendored corpus: the batched, left-padded scorer against one unpadded forward pass
per sequence."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch

from lcm_fast.text.mutual_information import CONTEXT_SENTENCES, MI_MODEL_ENV, MutualInformation, weighted_mean
from lcm_fast.text.corpus import CORPUS_DIR
from lcm_fast.text.pipeline import DEMO_DIR

transformers = pytest.importorskip("transformers")
N_POSITIONS = 64
CORPUS = CORPUS_DIR / "jargon.jsonl"


@pytest.fixture(scope="module")
def lm_dir(tmp_path_factory):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    text = " ".join(json.loads(line)["text"] for line in CORPUS.read_text().splitlines()[:40])
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator([text], trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>"],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<|endoftext|>",
                                                     eos_token="<|endoftext|>")
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=len(tokenizer), n_positions=N_POSITIONS, n_embd=32, n_layer=2, n_head=2)
    path = tmp_path_factory.mktemp("tiny_gpt2")
    tokenizer.save_pretrained(path)
    transformers.GPT2LMHeadModel(config).save_pretrained(path)
    return path


def _direct_mi(scorer: MutualInformation, sentence: str, context: list[str], max_tokens: int) -> float:
    """log p(target | head + prefix) - log p(target | prefix), per token, from unpadded forwards."""
    tok = scorer.tokenizer
    target = tok(sentence, add_special_tokens=False).input_ids
    head = tok(" ".join(context[-CONTEXT_SENTENCES:]), add_special_tokens=False).input_ids if context else []
    cond = (head + scorer.prefix + target)[-max_tokens:]

    def logp(ids):
        logits = scorer.model(torch.tensor([ids])).logits[0].double()
        return torch.log_softmax(logits[:-1], -1).gather(-1, torch.tensor(ids[1:])[:, None])[-len(target):].sum()

    return ((logp(cond) - logp(scorer.prefix + target)) / len(target)).item()


SENTENCES = ["The kernel panicked.", "Hackers share code freely with anyone who asks for it.", "Bugs!",
             "A byte is eight bits on most machines.", "Nobody noticed until morning."]
CONTEXTS = [["The system crashed at night.", "Logs were full."], [], ["One.", "Two.", "Three.", "Four."],
            [f"Sentence number {i}." for i in range(15)], ["Everything came back after the admin rebooted it."]]


@pytest.mark.parametrize("batch_size", [1, 3, 16])
def test_batched_scores_match_unpadded_forwards(lm_dir, batch_size):
    scorer = MutualInformation(lm_dir, batch_size=batch_size)
    assert scorer.max_tokens == N_POSITIONS
    assert scorer.prefix == scorer.tokenizer("\n", add_special_tokens=False).input_ids  # the paper's newline
    mi, tokens = scorer.score(SENTENCES, CONTEXTS)
    assert mi.dtype == torch.float64 and tokens.tolist() == [len(scorer._ids(s)) for s in SENTENCES]
    expected = [_direct_mi(scorer, s, c, N_POSITIONS) for s, c in zip(SENTENCES, CONTEXTS)]
    assert mi.tolist() == pytest.approx(expected, abs=1e-5)
    assert mi[1].item() == pytest.approx(0.0, abs=1e-5)  # no context: both likelihoods are the same


def test_long_contexts_keep_their_newest_tokens(lm_dir):
    scorer = MutualInformation(lm_dir, max_tokens=24)
    context = ["An old remark that is far too long to fit in the window of the language model."] * 3
    mi, _ = scorer.score(["Short tail."], [context])
    assert mi.item() == pytest.approx(_direct_mi(scorer, "Short tail.", context, 24), abs=1e-5)
    # only the last CONTEXT_SENTENCES sentences are read
    many = [f"Line {i}." for i in range(CONTEXT_SENTENCES + 5)]
    assert scorer.score(["X."], [many])[0].item() == pytest.approx(
        scorer.score(["X."], [many[-CONTEXT_SENTENCES:]])[0].item(), abs=1e-6)


def test_weighted_mean_and_empty_sentences(lm_dir):
    scorer = MutualInformation(lm_dir)
    mi, tokens = scorer.score(["", "Two words."], [["Context."], ["Context."]])
    assert tokens[0] == 0 and mi[0] == 0.0
    assert weighted_mean(mi, tokens) == pytest.approx(mi[1].item())
    assert weighted_mean(torch.tensor([1.0, 4.0]), torch.tensor([3, 1])) == pytest.approx(7 / 4)
    assert weighted_mean(torch.zeros(0), torch.zeros(0, dtype=torch.int64)) == 0.0


def test_tokenizer_without_newline_uses_bos(lm_dir, tmp_path):
    """A tokenizer that drops whitespace encodes '\\n' to nothing: the BOS token gives the first token its context."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    words = Tokenizer(models.WordLevel(unk_token="<unk>"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    words.train_from_iterator([" ".join(SENTENCES + [s for c in CONTEXTS for s in c])],
                              trainers.WordLevelTrainer(special_tokens=["<unk>", "<s>"]))
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=words, bos_token="<s>", unk_token="<unk>")
    path = tmp_path / "wordlevel_gpt2"
    tokenizer.save_pretrained(path)
    torch.manual_seed(1)
    transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=len(tokenizer), n_positions=N_POSITIONS, n_embd=32,
                                                         n_layer=2, n_head=2)).save_pretrained(path)
    scorer = MutualInformation(path, batch_size=2)
    assert tokenizer("\n", add_special_tokens=False).input_ids == [] and scorer.prefix == [tokenizer.bos_token_id]
    mi, _ = scorer.score(SENTENCES[:3], CONTEXTS[:3])
    expected = [_direct_mi(scorer, s, c, N_POSITIONS) for s, c in zip(SENTENCES[:3], CONTEXTS[:3])]
    assert mi.tolist() == pytest.approx(expected, abs=1e-5)


def test_bad_input(lm_dir, tmp_path, monkeypatch):
    monkeypatch.delenv(MI_MODEL_ENV, raising=False)
    with pytest.raises(ValueError, match=MI_MODEL_ENV):
        MutualInformation()
    with pytest.raises(FileNotFoundError, match="no causal LM at"):
        MutualInformation(tmp_path)
    monkeypatch.setenv(MI_MODEL_ENV, str(lm_dir))
    scorer = MutualInformation()  # from the environment
    with pytest.raises(ValueError, match="2 sentences but 1 contexts"):
        scorer.score(["a", "b"], [[]])
    with pytest.raises(ValueError, match="batch_size"):
        MutualInformation(lm_dir, batch_size=0)


def test_cli_constant_matches():
    from lcm_fast.cli.__main__ import MI_MODEL_ENV as CLI_ENV

    assert CLI_ENV == MI_MODEL_ENV


def test_cli_eval_reports_mi(lm_dir, tmp_path):
    from lcm_fast.text import load_encoder
    from lcm_fast.text.prepare import prepare

    doc = ("The system crashed at night. Nobody noticed until morning. Then the admin rebooted it. "
           "Everything came back. The logs were full of errors. A patch followed.")
    (tmp_path / "held_out.jsonl").write_text(json.dumps({"text": doc}) + "\n")
    manifest = prepare([tmp_path / "held_out.jsonl"], tmp_path / "data", load_encoder(), progress=False)
    shards = [str(tmp_path / "data" / s) for s in manifest["shards"]]
    base = [sys.executable, "-m", "lcm_fast", "eval", "--model", str(DEMO_DIR), "--data", *shards, "--steps", "4",
            "--mi-model", str(lm_dir)]
    cli = subprocess.run(base + ["--json", str(tmp_path / "m.json")], capture_output=True, text=True)
    assert cli.returncode == 0, cli.stderr
    mi = json.loads((tmp_path / "m.json").read_text())["teacher_forced"]["mi"]
    assert math.isfinite(mi) and mi != 0.0 and "mi=" in cli.stdout
    cli = subprocess.run(base + ["--decoder", "none"], capture_output=True, text=True)
    assert cli.returncode != 0 and "MI scores decoded sentences" in cli.stderr
