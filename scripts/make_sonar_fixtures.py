"""Build the SONAR parity fixtures (``tests/fixtures/sonar/``) with sonar-space itself.

Small models of SONAR's own architecture with random weights, a sentencepiece model trained on the shipped
corpus, saved in the formats Meta distributes, and sonar-space's outputs on them: embeddings of
``TextToEmbeddingModelPipeline``, texts of ``EmbeddingToTextModelPipeline`` and the generator's token ids
(greedy and beam, several target languages, empty and over-long inputs). lcm_fast's native SONAR
(``lcm_fast.text.sonar``) must reproduce them; its tests never need fairseq2.

sonar-space pins its own torch through fairseq2, so this runs in a separate environment (about 10 minutes to
install, 7.4 GB; fairseq2n needs the system library libsndfile1):

    apt-get install -y libsndfile1
    python3.11 -m venv /work/sonarvenv
    /work/sonarvenv/bin/pip install sonar-space==0.5.0 sentencepiece
    /work/sonarvenv/bin/python scripts/make_sonar_fixtures.py            # fixtures (about 1 minute)
    /work/sonarvenv/bin/python scripts/make_sonar_fixtures.py --timings  # + sonar-space's speed (toy, real shape)

Files (about 1 MB, all from random weights: no SONAR weights are involved):
- ``sentencepiece.source.256000.model``: the toy tokenizer (named as Meta's, so the directory works as
  ``--sonar-weights``; sentencepiece's trainer is not byte-reproducible, but two runs gave the fixtures the same token ids);
  ``config.json``: the toy dimensions and the tokenizer's language list;
- ``sonar_text_encoder.pt``: fairseq2-native state dict under "model" (the layout of Meta's encoder file);
- ``sonar_text_decoder.pt``: the fairseq layout (``{"state_dict": ...}``, fairseq key names and control-token
  order, as Meta's decoder file), loaded here through a fairseq2 asset card, i.e. sonar-space's own loader;
- ``outputs.pt``: the recorded outputs (tensors, lists and strings only: loads with weights_only=True);
- ``sonar_timings.json`` (``--timings``): sonar-space's sentences/s, read by ``bench/bench_sonar.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import tempfile
import time
from pathlib import Path

import sentencepiece as spm
import torch

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "tests" / "fixtures" / "sonar"
LANGS = ["eng_Latn", "fra_Latn", "deu_Latn", "spa_Latn", "zho_Hans"]
SPM_VOCAB = 1024 - 1 - len(LANGS) - 3  # + <pad>@0, the language tokens and 3 data tokens = sonar's "toy" 1024
ENCODER = dict(model_dim=32, num_layers=2, num_heads=4, ffn_inner_dim=128, max_seq_len=62)  # 32-d: fits the decoder
DECODER = dict(model_dim=32, num_layers=2, num_heads=4, ffn_inner_dim=128, max_seq_len=512)  # sonar's "toy" arch


def corpus_sentences() -> list[str]:
    """Sentences of the shipped corpus (jargon + kjv), split on sentence ends: the tokenizer's training text."""
    out = []
    for source in ("jargon", "kjv"):
        with open(ROOT / "python" / "lcm_fast" / "data" / "corpus" / f"{source}.jsonl", encoding="utf-8") as f:
            for row in map(json.loads, f):
                out += [s.strip() for s in re.split(r"(?<=[.!?])\s+", row["text"]) if s.strip()]
    return out


def train_tokenizer(sentences: list[str], path: Path) -> None:
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False, encoding="utf-8") as f:
        f.write("\n".join(sentences))
    # default control ids (unk 0, bos 1, eos 2, no pad): fairseq2's NLLB tokenizer inserts <pad> at 0
    spm.SentencePieceTrainer.train(input=f.name, model_prefix=str(path.with_suffix("")), vocab_size=SPM_VOCAB,
                                   model_type="unigram", character_coverage=1.0, num_threads=1, seed_sentencepiece_size=100000,
                                   minloglevel=2)
    os.unlink(f.name)
    path.with_suffix(".vocab").unlink()


def vocab_info(size: int):
    """The models' vocabulary info as sonar's archs give it (pad_idx 1 is fairseq's: only the position offset uses it)."""
    from fairseq2.data.tokenizers import VocabularyInfo

    return VocabularyInfo(size=size, unk_idx=1, bos_idx=2, eos_idx=3, pad_idx=1)


def fairseq_decoder_layout(state: dict) -> dict:
    """A fairseq2-native SONAR decoder state dict in the fairseq layout of Meta's decoder file: fairseq names,
    the embedding's control rows in fairseq order (BOS, PAD, EOS, UNK), the tied output projection under its
    own name. The inverse of sonar's ``_convert_sonar_text_decoder_checkpoint``."""
    names = [
        (r"^decoder\.layers\.(\d+)\.encoder_decoder_attn\.output_proj\.", r"layers.\1.encoder_attn.out_proj."),
        (r"^decoder\.layers\.(\d+)\.encoder_decoder_attn_layer_norm\.", r"layers.\1.encoder_attn_layer_norm."),
        (r"^decoder\.layers\.(\d+)\.encoder_decoder_attn\.", r"layers.\1.encoder_attn."),
        (r"^decoder\.layers\.(\d+)\.self_attn\.output_proj\.", r"layers.\1.self_attn.out_proj."),
        (r"^decoder\.layers\.(\d+)\.ffn\.inner_proj\.", r"layers.\1.fc1."),
        (r"^decoder\.layers\.(\d+)\.ffn\.output_proj\.", r"layers.\1.fc2."),
        (r"^decoder\.layers\.(\d+)\.ffn_layer_norm\.", r"layers.\1.final_layer_norm."),
        (r"^decoder\.layers\.", "layers."),
        (r"^decoder\.layer_norm\.", "layer_norm."),
        (r"^decoder_frontend\.embed\.", "embed_tokens."),
        (r"^final_proj\.", "output_projection."),
    ]
    out = {}
    for key, value in state.items():
        for pattern, replacement in names:
            new = re.sub(pattern, replacement, key)
            if new != key:
                break
        out[new] = value.clone()
    fairseq = out["embed_tokens.weight"].clone()
    fairseq[[1, 3, 0, 2]] = out["embed_tokens.weight"][[0, 1, 2, 3]]  # (PAD, UNK, BOS, EOS) -> (BOS, PAD, EOS, UNK)
    out["embed_tokens.weight"] = out["output_projection.weight"] = fairseq
    out["version"] = torch.tensor([3.0])
    return {"state_dict": out, "args": None}


def build_models(tokenizer_path: Path):
    from fairseq2.models.nllb.tokenizer import NllbTokenizerConfig, load_nllb_tokenizer
    from sonar.models.sonar_text import SonarTextEncoderConfig, _create_sonar_text_encoder_model

    tokenizer = load_nllb_tokenizer(tokenizer_path, NllbTokenizerConfig(langs=LANGS, default_lang="eng_Latn"))
    vocab = tokenizer.vocab_info
    assert vocab.size == 1024 and (vocab.pad_idx, vocab.unk_idx, vocab.bos_idx, vocab.eos_idx) == (0, 1, 2, 3), vocab
    e = ENCODER
    config = SonarTextEncoderConfig(
        model_dim=e["model_dim"], max_seq_len=e["max_seq_len"], vocab_info=vocab_info(1024),
        num_encoder_layers=e["num_layers"], num_decoder_layers=e["num_layers"], num_encoder_attn_heads=e["num_heads"],
        num_decoder_attn_heads=e["num_heads"], ffn_inner_dim=e["ffn_inner_dim"], pooling="mean", _from_fairseq=True)
    torch.manual_seed(0)
    encoder = _create_sonar_text_encoder_model(config)
    with torch.no_grad():  # trained norms are not the identity: random ones exercise every parameter
        for name, p in encoder.named_parameters():
            if "layer_norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return tokenizer, encoder.eval()


def decoder_weights() -> dict:
    """Random toy-arch decoder weights, sharpened so that sentences end at varied lengths (EOS is likely but
    not certain) and beam search has real choices."""
    from sonar.models.sonar_text import SonarTextDecoderConfig, _create_sonar_text_decoder_model

    d = DECODER
    config = SonarTextDecoderConfig(
        model_dim=d["model_dim"], max_seq_len=d["max_seq_len"], vocab_info=vocab_info(1024),
        activation_fn="ReLU", no_scale_embedding=False, no_token_positional_embeddings=False, learned_pos=False,
        emb_dropout_p=0.1, attention_dropout_p=0.1, activation_dropout_p=0.1, normalize_before=True,
        num_encoder_layers=d["num_layers"], num_decoder_layers=d["num_layers"], num_encoder_attn_heads=d["num_heads"],
        num_decoder_attn_heads=d["num_heads"], ffn_inner_dim=d["ffn_inner_dim"])
    torch.manual_seed(1)
    decoder = _create_sonar_text_decoder_model(config)
    with torch.no_grad():  # a random tied decoder repeats one token forever: larger weights make it chaotic,
        for name, p in decoder.named_parameters():  # a longer EOS row makes it end sometimes
            if name.endswith("proj.weight") and not name.startswith(("final_proj", "decoder_frontend")):
                p.mul_(6.0)
            elif "layer_norm" in name:
                p.add_(0.1 * torch.randn_like(p))
        decoder.decoder.layer_norm.weight.mul_(2.0)
        embed = decoder.decoder_frontend.embed.weight
        embed[3] = 2.0 * embed[3] / embed[3].norm() * embed[4:].norm(dim=1).mean()
    return {k: v.clone() for k, v in decoder.state_dict().items()}


def write_card(cards: Path, name: str, checkpoint: Path, tokenizer: Path) -> None:
    (cards / f"{name}.yaml").write_text(
        f"name: {name}\nmodel_family: transformer_decoder\nmodel_arch: toy\n"
        f"checkpoint: \"{checkpoint.resolve().as_uri()}\"\ntokenizer: \"{tokenizer.resolve().as_uri()}\"\n"
        "tokenizer_family: nllb\ntokenizer_config:\n  _set_:\n    default_lang: eng_Latn\n"
        f"    langs: [{', '.join(LANGS)}]\n")


def encoder_inputs(sentences: list[str]) -> list[str]:
    rng = random.Random(0)
    picked = rng.sample([s for s in sentences if 20 < len(s) < 200], 20)
    long = " ".join(rng.sample(sentences, 12))  # far over the toy encoder's 64 positions: truncated
    return picked + ["", "   ", "Hi.", long, "Ünïcödé and 中文 characters, mostly unknown to the tokenizer."]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--timings", action="store_true", help="also time sonar-space (toy and SONAR's real shape)")
    args = parser.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)  # deterministic reductions, and comparable to lcm_fast's single-thread bench

    sentences = corpus_sentences()
    tokenizer_path = OUT / "sentencepiece.source.256000.model"
    train_tokenizer(sentences, tokenizer_path)
    tokenizer, encoder = build_models(tokenizer_path)
    torch.save({"model": encoder.state_dict()}, OUT / "sonar_text_encoder.pt")
    torch.save(fairseq_decoder_layout(decoder_weights()), OUT / "sonar_text_decoder.pt")  # seeded: as built below
    (OUT / "config.json").write_text(json.dumps({"encoder": ENCODER, "decoder": DECODER, "langs": LANGS,
                                                 "default_lang": "eng_Latn"}, indent=2) + "\n")

    cards = Path(tempfile.mkdtemp())
    write_card(cards, "toy_sonar_decoder", OUT / "sonar_text_decoder.pt", tokenizer_path)
    os.environ["FAIRSEQ2_USER_ASSET_DIR"] = str(cards)
    from fairseq2.generation.beam_search.generator import BeamSearchSeq2SeqGenerator
    from fairseq2.models import load_model
    from fairseq2.nn import BatchLayout
    from sonar.inference_pipelines.text import EmbeddingToTextModelPipeline, TextToEmbeddingModelPipeline
    from sonar.inference_pipelines.utils import SequenceToTextConverter
    from sonar.models.sonar_translation import SonarEncoderDecoderModel
    from sonar.models.sonar_translation.model import DummyEncoderModel

    built = decoder_weights()
    decoder = load_model("toy_sonar_decoder")  # sonar-space's own loader: the layout conversion is theirs
    loaded = decoder.state_dict()
    assert loaded.keys() == built.keys() and all(torch.equal(loaded[k], built[k]) for k in built)
    outputs: dict = {"encoder_inputs": encoder_inputs(sentences)}

    # tokenizer: token ids of every input in each mode, and the decoder's text of ids
    for mode in ("source", "target"):
        enc = tokenizer.create_encoder(lang="fra_Latn", mode=mode)
        outputs[f"tokens_{mode}"] = [enc(s).tolist() for s in outputs["encoder_inputs"]]

    # encoder: the pipeline sorts by length and pads batches of 5 (the default batch size)
    embedder = TextToEmbeddingModelPipeline(encoder=encoder, tokenizer=tokenizer)
    for lang in ("eng_Latn", "fra_Latn", "zho_Hans"):
        outputs[f"embeddings_{lang}"] = embedder.predict(outputs["encoder_inputs"], source_lang=lang).float()

    # decoder inputs: the encoder's embeddings of 6 sentences (the round trip), random vectors at two scales, zero
    g = torch.Generator().manual_seed(2)
    emb = torch.cat([outputs["embeddings_eng_Latn"][:6], torch.randn(6, 32, generator=g),
                     0.1 * torch.randn(4, 32, generator=g), torch.zeros(1, 32)])
    outputs["decoder_inputs"] = emb
    pipeline = EmbeddingToTextModelPipeline(decoder=decoder, tokenizer=tokenizer)
    model = SonarEncoderDecoderModel(DummyEncoderModel(), decoder).eval()
    for lang in ("eng_Latn", "deu_Latn"):
        for beam in (1, 5):
            key = f"{lang}_beam{beam}"
            outputs[f"texts_{key}"] = pipeline.predict(emb, target_lang=lang, beam_size=beam)
            generator = BeamSearchSeq2SeqGenerator(model, tokenizer.vocab_info, beam_size=beam)
            converter = SequenceToTextConverter(generator, tokenizer, task="translation", target_lang=lang)
            hyps = []
            for batch in emb.split(5):  # as the pipeline batches
                _, out = converter.batch_convert(batch, BatchLayout.of(batch))
                hyps += [[(h.seq.tolist(), float(h.score)) for h in hs] for hs in out.hypotheses]
            outputs[f"ids_{key}"] = [[seq for seq, _ in hs] for hs in hyps]
            outputs[f"scores_{key}"] = [[score for _, score in hs] for hs in hyps]
    torch.save(outputs, OUT / "outputs.pt")
    lengths = [len(h[0]) for h in outputs["ids_eng_Latn_beam5"]]
    print(f"fixtures in {OUT}; beam-5 lengths {lengths}; texts {outputs['texts_eng_Latn_beam5'][:3]}")
    if args.timings:
        time_sonar_space(tokenizer, encoder, decoder, outputs["encoder_inputs"][:20])


def _best_rate(fn, count: int, repeats: int = 3) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return count / min(times)


def time_sonar_space(tokenizer, toy_encoder, toy_decoder, sentences: list[str]) -> None:
    """sonar-space's encode and decode sentences/s (best of 3, fp32, one thread) at the toy shape and at SONAR's
    real one (24 layers, 1024-d, 16 heads, FFN 8192, 256,206-row vocabulary, random weights): the pipeline
    encoding ``sentences`` in one batch, and greedy decoding of 8 of their embeddings through the pipeline's
    generator with exactly 32 tokens each (min = max generation length), so both sides do the same work."""
    from fairseq2.generation.beam_search.generator import BeamSearchSeq2SeqGenerator
    from fairseq2.nn import BatchLayout
    from sonar.inference_pipelines.text import TextToEmbeddingModelPipeline
    from sonar.inference_pipelines.utils import SequenceToTextConverter
    from sonar.models.sonar_text import (SonarTextDecoderConfig, SonarTextEncoderConfig, _create_sonar_text_decoder_model,
                                         _create_sonar_text_encoder_model)
    from sonar.models.sonar_translation import SonarEncoderDecoderModel
    from sonar.models.sonar_translation.model import DummyEncoderModel

    common = dict(vocab_info=vocab_info(256206), num_encoder_layers=24, num_decoder_layers=24, num_encoder_attn_heads=16,
                  num_decoder_attn_heads=16, ffn_inner_dim=8192)

    def real_encoder():
        torch.manual_seed(0)
        return _create_sonar_text_encoder_model(SonarTextEncoderConfig(
            model_dim=1024, max_seq_len=512, pooling="mean", _from_fairseq=True, **common)).eval()

    def real_decoder():
        return _create_sonar_text_decoder_model(SonarTextDecoderConfig(
            model_dim=1024, max_seq_len=512, activation_fn="ReLU", no_scale_embedding=False,
            no_token_positional_embeddings=False, learned_pos=False, emb_dropout_p=0.1, attention_dropout_p=0.1,
            activation_dropout_p=0.1, normalize_before=True, **common)).eval()

    timings = {"torch": torch.__version__, "threads": torch.get_num_threads(), "encode_sentences": len(sentences),
               "decode_sentences": 8, "decode_tokens_per_sentence": 32}
    for shape, make_encoder, make_decoder in (("toy", lambda: toy_encoder, lambda: toy_decoder),
                                              ("real", real_encoder, real_decoder)):
        embedder = TextToEmbeddingModelPipeline(encoder=make_encoder(), tokenizer=tokenizer)
        encode = lambda: embedder.predict(sentences, source_lang="eng_Latn", batch_size=len(sentences))
        encode_rate = _best_rate(encode, len(sentences))
        inputs = encode()[:8]
        del embedder
        model = SonarEncoderDecoderModel(DummyEncoderModel(), make_decoder()).eval()
        generator = BeamSearchSeq2SeqGenerator(model, tokenizer.vocab_info, beam_size=1, min_gen_len=33, max_gen_len=(0, 33))
        converter = SequenceToTextConverter(generator, tokenizer, task="translation", target_lang="eng_Latn")
        if inputs.shape[1] != model.decoder.decoder_frontend.embed.embed_dim:  # the toy encoder and decoder differ
            inputs = torch.randn(8, model.decoder.decoder_frontend.embed.embed_dim)
        decode = lambda: converter.batch_convert(inputs, BatchLayout.of(inputs))[1]
        assert all(len(h[0].seq) == 33 for h in decode().hypotheses)  # 32 tokens and the forced EOS
        timings[shape] = {"encode_sentences_per_s": encode_rate, "decode_sentences_per_s": _best_rate(decode, 8)}
        del model, generator, converter
        print(shape, timings[shape], flush=True)
    (OUT / "sonar_timings.json").write_text(json.dumps(timings, indent=2) + "\n")


if __name__ == "__main__":
    main()
