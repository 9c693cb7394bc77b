"""Native SONAR against sonar-space's own outputs (``tests/fixtures/sonar``, made by
``scripts/make_sonar_fixtures.py`` with sonar-space 0.5 / fairseq2 0.8 / torch 2.9.1 in their own environment):
tokenizer ids, encoder embeddings within fp32 rounding, decoder token ids exactly (greedy and beam 5, every
hypothesis, two target languages), the checkpoint layouts, and the errors a user meets."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch

from lcm_fast.text import load_encoder
from lcm_fast.text.sonar import SonarConfig, SonarDecoder, SonarEncoder, SonarTokenizer, load_sonar_checkpoint

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "sonar"
CONFIG = json.loads((FIXTURES / "config.json").read_text())


@pytest.fixture(scope="module")
def expected() -> dict:
    return torch.load(FIXTURES / "outputs.pt", weights_only=True)


@pytest.fixture(scope="module")
def encoder() -> SonarEncoder:
    return SonarEncoder(weights_dir=FIXTURES)


@pytest.fixture(scope="module")
def decoder() -> SonarDecoder:
    return SonarDecoder(weights_dir=FIXTURES)


def test_tokenizer_ids_are_fairseq2s(expected):
    tokenizer = SonarTokenizer(FIXTURES / "sentencepiece.source.256000.model", CONFIG["langs"])
    assert tokenizer.vocab_size == 1024
    for text, source, target in zip(expected["encoder_inputs"], expected["tokens_source"], expected["tokens_target"]):
        assert tokenizer.encode(text, "fra_Latn").tolist() == source
        assert target == [*tokenizer.target_prefix("fra_Latn").tolist(), *source[1:]]  # [</s>, lang, pieces, </s>]


@pytest.mark.parametrize("lang", ["eng_Latn", "fra_Latn", "zho_Hans"])
def test_encoder_matches_sonar_space(encoder, expected, lang):
    """Every input (empty, blank, over-long and mostly-unknown ones included) within fp32 rounding (measured
    2.4e-7 against values up to 2.6), for batches padded as sonar-space pads them and for other batchings."""
    with pytest.warns(UserWarning, match="3 sentence.s. exceed SONAR's 64 tokens and were truncated"):
        for batch_size in (5, 1, 64):
            got = encoder.encode(expected["encoder_inputs"], batch_size=batch_size, source_lang=lang)
            torch.testing.assert_close(got, expected[f"embeddings_{lang}"], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("lang", ["eng_Latn", "deu_Latn"])
@pytest.mark.parametrize("beam", [1, 5])
def test_decoder_matches_sonar_space(decoder, expected, lang, beam):
    """Token ids of every hypothesis equal, best first, scores within fp32 rounding, texts equal: for the
    encoder's own embeddings, random ones and zero; sentences ending early, late and at the length limit, in
    one batch and in sonar-space's batches of 5."""
    key = f"{lang}_beam{beam}"
    for batch_size in (5, 64):
        hypotheses = decoder.generate(expected["decoder_inputs"], target_lang=lang, beam_size=beam, batch_size=batch_size)
        assert [[h.tokens.tolist() for h in hs] for hs in hypotheses] == expected[f"ids_{key}"]
        got = torch.tensor([[h.score for h in hs] for hs in hypotheses])
        torch.testing.assert_close(got, torch.tensor(expected[f"scores_{key}"]), rtol=1e-5, atol=1e-5)
    assert decoder.decode(expected["decoder_inputs"], target_lang=lang, beam_size=beam) == expected[f"texts_{key}"]
    lengths = {len(ids[0]) for ids in expected[f"ids_{key}"]}
    assert 160 in lengths and min(lengths) < 60  # the fixtures cover both ends


@pytest.mark.filterwarnings("ignore:.*exceed SONAR's 64 tokens")
def test_round_trip_and_the_encoder_protocol(expected):
    """load_encoder("sonar") is the native encoder; text -> embedding -> text runs (the toy weights are random,
    so the text is not the input)."""
    encoder = load_encoder("sonar", weights_dir=FIXTURES)
    assert isinstance(encoder, SonarEncoder) and encoder.dim == 32 and encoder.name == "sonar"
    texts = SonarDecoder(weights_dir=FIXTURES, beam_size=1).decode(encoder.encode(expected["encoder_inputs"][:6]))
    assert texts == expected["texts_eng_Latn_beam1"][:6]


def _fairseq_encoder_layout(state: dict) -> dict:
    """A fairseq2-native encoder state dict in fairseq's names and control-token order."""
    names = [(r"\.self_attn\.output_proj\.", ".self_attn.out_proj."), (r"\.ffn\.inner_proj\.", ".fc1."),
             (r"\.ffn\.output_proj\.", ".fc2."), (r"\.ffn_layer_norm\.", ".final_layer_norm."),
             (r"^encoder\.layers\.", "layers."), (r"^encoder_frontend\.embed\.", "embed_tokens.")]
    out = {}
    for key, value in state.items():
        for pattern, replacement in names:
            key = re.sub(pattern, replacement, key)
        out[key] = value
    embed = out["embed_tokens.weight"].clone()
    embed[[1, 3, 0, 2]] = out["embed_tokens.weight"][[0, 1, 2, 3]]
    out["embed_tokens.weight"] = embed
    return {"state_dict": {**out, "version": torch.tensor([3.0])}}


def test_checkpoint_layouts_load_the_same_weights(tmp_path):
    """Meta's layouts: the encoder fairseq2-native under "model" (as distributed), plain, or in the fairseq layout;
    the decoder in the fairseq layout (as distributed: loaded by sonar-space for the fixtures) or native."""
    config = SonarConfig.from_dict(CONFIG["encoder"], 1024)
    encoder = load_sonar_checkpoint(FIXTURES / "sonar_text_encoder.pt", "encoder", config)
    native = torch.load(FIXTURES / "sonar_text_encoder.pt", weights_only=True)["model"]
    torch.save(native, tmp_path / "plain.pt")
    torch.save(_fairseq_encoder_layout(native), tmp_path / "fairseq.pt")
    for name in ("plain.pt", "fairseq.pt"):
        other = load_sonar_checkpoint(tmp_path / name, "encoder", config)
        assert all(torch.equal(a, b) for a, b in zip(encoder.state_dict().values(), other.state_dict().values()))
    config = SonarConfig.from_dict(CONFIG["decoder"], 1024)
    decoder = load_sonar_checkpoint(FIXTURES / "sonar_text_decoder.pt", "decoder", config)
    torch.save({"model": {**decoder.state_dict(), "final_proj.weight": decoder.decoder_frontend.embed.weight}},
               tmp_path / "decoder.pt")
    other = load_sonar_checkpoint(tmp_path / "decoder.pt", "decoder", config)
    assert all(torch.equal(a, b) for a, b in zip(decoder.state_dict().values(), other.state_dict().values()))


@pytest.mark.filterwarnings("ignore:.*exceed SONAR's 64 tokens")
def test_bf16_stays_close_to_fp32(encoder, expected):
    """dtype=bfloat16 (the CUDA default) on the CPU: embeddings within bf16's rounding of fp32's."""
    half = SonarEncoder(weights_dir=FIXTURES, dtype=torch.bfloat16)
    sentences = expected["encoder_inputs"][:20]
    cosine = torch.nn.functional.cosine_similarity(half.encode(sentences), encoder.encode(sentences))
    assert half.model.layer_norm.weight.dtype == torch.bfloat16 and cosine.min() > 0.99


def test_errors_say_what_is_wrong(tmp_path, encoder, decoder):
    with pytest.raises(FileNotFoundError, match=r"lacks \['sonar_text_encoder.pt', 'sentencepiece.source.256000.model'\]"):
        SonarEncoder(weights_dir=tmp_path)
    shutil.copy(FIXTURES / "sonar_text_encoder.pt", tmp_path)
    with pytest.raises(FileNotFoundError, match=r"lacks \['sentencepiece.source.256000.model'\].*LCM_FAST_SONAR_DIR"):
        SonarEncoder(weights_dir=tmp_path)
    with pytest.raises(ValueError, match=r"unknown language 'fra_Latm' \(did you mean fra_Latn\?\)"):
        SonarEncoder(weights_dir=FIXTURES, source_lang="fra_Latm")
    with pytest.raises(ValueError, match="unknown language 'klingon'"):
        decoder.decode(torch.zeros(1, 32), target_lang="klingon")
    with pytest.raises(ValueError, match=r"takes \[N, 32\] embeddings, got \(2, 1024\)"):
        decoder.decode(torch.zeros(2, 1024))
    bad = torch.zeros(3, 32)
    bad[1, 4] = float("nan")
    with pytest.raises(ValueError, match=r"sentence embeddings \[1\] hold NaN"):
        decoder.decode(bad)
    with pytest.raises(TypeError, match="list of sentences"):
        encoder.encode("one string")
    with pytest.raises(TypeError, match="sentence 1 is a int"):
        encoder.encode(["fine", 3])
    # nothing to do is not an error: an empty batch in, an empty batch out
    assert encoder.encode([]).shape == (0, 32) and decoder.decode(torch.zeros(0, 32)) == []
    # a checkpoint of another architecture: the basic (1024-d) shape expected from a 32-d file
    with pytest.raises(ValueError, match=r"encoder_frontend.embed.weight has shape \(1024, 32\).*expects \(1024, 1024\)"):
        load_sonar_checkpoint(FIXTURES / "sonar_text_encoder.pt", "encoder")
    with pytest.raises(ValueError, match=r"holds a 2-layer SONAR text encoder, not the 3 layers expected"):
        load_sonar_checkpoint(FIXTURES / "sonar_text_encoder.pt", "encoder", SonarConfig(32, 3, 4, 128, 1024, 62))
    with pytest.raises(ValueError, match=r"no decoder_frontend.embed.weight"):
        load_sonar_checkpoint(FIXTURES / "sonar_text_encoder.pt", "decoder")
    (tmp_path / "corrupt.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a readable SONAR encoder checkpoint"):
        load_sonar_checkpoint(tmp_path / "corrupt.pt", "encoder")
    (tmp_path / "sentencepiece.source.256000.model").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="is not a sentencepiece model"):
        SonarEncoder(weights_dir=tmp_path)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.filterwarnings("ignore:.*exceed SONAR's 64 tokens")
def test_sonar_on_cuda_matches_the_fixtures(expected):
    """fp32 on the GPU: embeddings within fp32 rounding, greedy and beam token ids equal; bf16 (the CUDA default)
    close to fp32."""
    encoder = SonarEncoder("cuda", FIXTURES, dtype=torch.float32)
    got = encoder.encode(expected["encoder_inputs"], source_lang="fra_Latn")
    torch.testing.assert_close(got, expected["embeddings_fra_Latn"], rtol=1e-5, atol=1e-5)
    decoder = SonarDecoder("cuda", FIXTURES, dtype=torch.float32)
    for beam in (1, 5):
        hypotheses = decoder.generate(expected["decoder_inputs"], beam_size=beam)
        assert [hs[0].tokens.tolist() for hs in hypotheses] == [ids[0] for ids in expected[f"ids_eng_Latn_beam{beam}"]]
    half = SonarEncoder("cuda", FIXTURES)
    assert half.model.layer_norm.weight.dtype == torch.bfloat16
    assert torch.nn.functional.cosine_similarity(half.encode(expected["encoder_inputs"]), got).min() > 0.99
    assert len(SonarDecoder("cuda", FIXTURES).decode(expected["decoder_inputs"][:4])) == 4
