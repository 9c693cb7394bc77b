"""``lcm-fast {generate, eval, info, prepare, train, fit-normalizer, fit-rvq, fit-fragility, repro, flops}``:
defaults come from the config dataclasses.

An error caused by the user's input or files (a ``ValueError``, an ``OSError``, bad YAML) prints one message on
stderr and exits with status 2, without a traceback; ``--debug`` (or ``LCM_FAST_DEBUG=1``) shows the traceback."""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path
from typing import Optional, Sequence

import yaml

# lcm_fast.text.retrieval.INDEXES and lcm_fast.text.mutual_information.MI_MODEL_ENV, spelled out so that
# --help does not import torch (a test keeps them equal)
BANK_INDEXES = ("auto", "flat", "hnsw", "ivf", "torch")
MI_MODEL_ENV = "LCM_FAST_MI_MODEL"
#: errors that the user's input or files cause: one message, no traceback (unless --debug)
USER_ERRORS = (ValueError, OSError, yaml.YAMLError)


def _device(name: Optional[str]) -> Optional[str]:
    """--device, checked: a CUDA device on a machine without CUDA is a clear error, not an assertion in torch."""
    import torch

    if name is not None and torch.device(name).type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: this torch has no usable CUDA device (torch {torch.__version__}); "
                         "use --device cpu")
    return name


def _thread_count(requested: Optional[int]) -> Optional[int]:
    """torch's CPU thread count for this command: ``--threads``, else None (torch's own choice) when
    OMP_NUM_THREADS is set, else the cores of this process's affinity that the 1-minute load average leaves
    idle, at least 1. Why: torch's OpenMP threads spin at their barriers, so a thread on a busy core costs
    far more than it gives (measured on 2 cores, both busy: the demo model generates in 27 ms on 1 thread
    and 2.7 s on 2)."""
    if requested is not None:
        if requested < 1:
            raise ValueError(f"--threads must be >= 1, got {requested}")
        return requested
    if os.environ.get("OMP_NUM_THREADS"):
        return None
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(cores, cores - round(os.getloadavg()[0])))


def _data_dim(files: Sequence[str]) -> tuple[int, Optional[str]]:
    """(embedding dim, encoder name or None) of the training files: their vectors' size, and the encoder that
    ``lcm-fast prepare`` recorded beside them (prepare.json). Files of different dims are an error."""
    import json

    from lcm_fast.training.data import embedding_dim

    dims = {file: embedding_dim(file) for file in files}
    if len(set(dims.values())) > 1:
        raise ValueError("--data files hold embeddings of different dims: "
                         + ", ".join(f"{file}: {dim}" for file, dim in dims.items()))
    manifest = Path(files[0]).parent / "prepare.json"
    encoder = json.loads(manifest.read_text()).get("options", {}).get("encoder") if manifest.is_file() else None
    return next(iter(dims.values())), encoder


def _train(args: argparse.Namespace) -> None:
    import torch
    import torch.distributed as dist

    import lcm_fast
    from lcm_fast.config import merge_into
    from lcm_fast.training import DataConfig, TrainConfig, Trainer

    blocking = next((p for p in (Path(args.out), *Path(args.out).parents) if p.is_file()), None)
    if blocking is not None:
        raise ValueError(f"--out {args.out}: {blocking} is a file, not a directory: choose another --out")
    overrides = yaml.safe_load(Path(args.config).read_text()) if args.config else {}
    arch = args.arch or {"base": "small_base_lcm", "two_tower": "small_two_tower_diffusion_lcm",
                         "one_tower": "small_one_tower_diffusion_lcm", "quant_d": "small_quant_lcm",
                         "quant_c": "small_quant_lcm", "lpcm": "small_one_tower_diffusion_lcm"}[args.variant]
    model_cfg = lcm_fast.get_arch(arch)
    data_dim, data_encoder = _data_dim(args.data)
    model_cfg.sonar_embed_dim = data_dim  # the data's embeddings (prepare's MiniLM: 384; SONAR: 1024)
    rq = None
    if args.variant in ("quant_d", "quant_c"):
        if not args.rvq and not args.init:
            raise ValueError(f"--variant {args.variant} needs --rvq CODEBOOKS (from lcm-fast fit-rvq)")
        if args.rvq:  # the codebooks fix the quantizer shape and the embedding dim
            from lcm_fast.quant import ResidualQuantizer

            rq = ResidualQuantizer.load(args.rvq)
            model_cfg = merge_into(model_cfg, dict(
                target="discrete" if args.variant == "quant_d" else "continuous", n_codebooks=rq.n_codebooks,
                codebook_size=rq.codebook_size, sonar_embed_dim=rq.d))
    elif args.rvq:
        raise ValueError("--rvq is only for --variant quant_d or quant_c")
    model_cfg = merge_into(model_cfg, overrides.get("model", {}))
    if model_cfg.sonar_embed_dim != data_dim:
        source = "the --rvq codebooks" if args.rvq and "sonar_embed_dim" not in overrides.get("model", {}) else (
            f"model.sonar_embed_dim in {args.config}")
        raise ValueError(f"--data holds {data_dim}-d embeddings ({args.data[0]}) but {source} say(s) "
                         f"{model_cfg.sonar_embed_dim}: make them agree (the model is built for the data's dim unless "
                         "told otherwise)")
    train_cfg = merge_into(TrainConfig(variant=args.variant, out_dir=args.out), overrides.get("train", {}))
    for name in ("steps", "keep", "precision", "parallel"):  # flags override the config file
        if getattr(args, name) is not None:
            setattr(train_cfg, name, getattr(args, name))
    data_cfg = merge_into(DataConfig(files=args.data, dim=model_cfg.sonar_embed_dim), overrides.get("data", {}))
    if args.eot:  # the paper's end-of-text concept, appended to every document
        from lcm_fast.text import load_encoder

        encoder = args.encoder or data_encoder or "minilm"
        eot = load_encoder(encoder).encode([args.eot])[0]
        if eot.shape[0] != model_cfg.sonar_embed_dim:
            raise ValueError(f"--eot: the {encoder} encoder gives {eot.shape[0]}-d embeddings but the model "
                             f"works on {model_cfg.sonar_embed_dim}-d ones")
        data_cfg.eot = eot
    resuming = args.resume is not None and Trainer.latest_checkpoint(train_cfg.out_dir) is not None
    notes: list[str] = []  # said once the run is known to start, after every check of the input
    if args.init:
        model = lcm_fast.from_pretrained(args.init)
        if model.sonar_dim != data_dim:
            raise ValueError(f"--init {args.init} takes {model.sonar_dim}-d embeddings, --data holds {data_dim}-d "
                             "ones: train on data of the model's encoder")
    else:
        torch.manual_seed(train_cfg.seed)  # the initial weights: the same command twice, the same checkpoints
        model = lcm_fast.build_model(model_cfg)
    if args.normalizer:
        if model.normalizer is None:
            raise ValueError(f"--normalizer given but the {arch} model has none (set sonar_normalizer_name)")
        normalizer = lcm_fast.load_normalizer(args.normalizer)
        if normalizer.dim != model.sonar_dim:
            raise ValueError(f"--normalizer {args.normalizer} is fitted on {normalizer.dim}-d embeddings, the model "
                             f"takes {model.sonar_dim}-d ones: fit it on this data (lcm-fast fit-normalizer)")
        model.normalizer.load_state_dict(normalizer.state_dict())
    elif model.normalizer is not None and not args.init and not resuming:
        # centre 0 and scale 1 would train on raw embeddings in silence (a resumed run has its checkpoint's)
        from lcm_fast.nn.normalizer import SonarNormalizer
        from lcm_fast.training.data import sample_embeddings

        sample = sample_embeddings([_weighted(item) for item in args.data], data_dim, 100_000, seed=train_cfg.seed)
        model.normalizer.load_state_dict(SonarNormalizer.fit(sample).state_dict())
        notes.append(f"no --normalizer: fitted one on {sample.shape[0]} sentence embeddings of --data "
                     "(gaussian_robust; lcm-fast fit-normalizer for another method or mix)")
    if rq is not None:
        model.set_codebooks(rq.codebooks)
    if args.fragility:
        train_cfg.loss_weighting, train_cfg.fragility_model = "fragility", args.fragility
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():  # launched by torchrun
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    device = args.device or (f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if torch.cuda.is_available() else "cpu")
    trainer = Trainer(model.to(device), train_cfg, data_cfg)
    if args.resume != "must":  # "must" fails in train() without a checkpoint (and fits nothing with one)
        for note in notes:
            print(note, file=sys.stderr)
    trainer.train(resume={None: False, "latest": True, "must": "must"}[args.resume])
    if dist.is_initialized():
        dist.destroy_process_group()
    latest = Trainer.latest_checkpoint(train_cfg.out_dir)
    print(f"trained to step {trainer.step}; " + (f"latest checkpoint {latest}" if latest is not None else
                                                 "no checkpoint written (save_every 0)"))


def _weighted(item: str) -> tuple[str, float]:
    """``FILE`` or ``FILE:WEIGHT`` -> (file, weight)."""
    file, sep, weight = item.rpartition(":")
    try:
        return (file, float(weight)) if sep else (item, 1.0)
    except ValueError:  # a ':' that is part of the path
        return item, 1.0


def _fit_normalizer(args: argparse.Namespace) -> None:
    from lcm_fast.nn.normalizer import SonarNormalizer
    from lcm_fast.training.data import sample_embeddings

    mix = [_weighted(item) for item in args.data]
    sample = sample_embeddings(mix, args.dim or _data_dim([f for f, _ in mix])[0], args.sample, seed=args.seed)
    SonarNormalizer.fit(sample, args.method).save(args.out)
    print(f"fitted on {sample.shape[0]} sentence embeddings ({args.method}) -> {args.out}")


def _fit_fragility(args: argparse.Namespace) -> None:
    import torch

    import lcm_fast
    from lcm_fast.nn.normalizer import SonarNormalizer
    from lcm_fast.text import load_encoder
    from lcm_fast.text.evaluate import prepared_documents
    from lcm_fast.text.retrieval import RetrievalDecoder
    from lcm_fast.training.fragility import fit_fragility_mlp, fragility_scores

    pairs = [(s, v) for doc, vectors in prepared_documents(args.data) for s, v in zip(doc, vectors)]
    if len(pairs) < 2:
        raise ValueError(f"{len(pairs)} sentences with their text in --data: fit-fragility needs prepared shards "
                         "(lcm-fast prepare keeps the sentences)")
    pick = torch.randperm(len(pairs), generator=torch.Generator().manual_seed(args.seed))[: args.sample].tolist()
    texts, x = [pairs[i][0] for i in pick], torch.tensor([pairs[i][1] for i in pick], dtype=torch.float32)
    bank, encoder = RetrievalDecoder.load(args.bank), load_encoder(args.encoder)
    shared = set(texts) & set(bank.sentences)
    if shared:
        raise ValueError(f"--bank holds {len(shared)} of the {len(texts)} scored sentences: a retrieval decoder returns "
                         "them unchanged, so every one would look robust; give a bank of other text (lcm-fast prepare "
                         "on another corpus writes one)")
    normalizer = lcm_fast.load_normalizer(args.normalizer) if args.normalizer else SonarNormalizer.fit(x)
    scores = fragility_scores(texts, x, bank.decode, encoder.encode, normalizer,
                              generator=torch.Generator().manual_seed(args.seed))
    mlp = fit_fragility_mlp(normalizer.normalize(x), scores, seed=args.seed)
    torch.save(mlp.state_dict(), args.out)
    weights = mlp.weights(normalizer.normalize(x))
    q = [f"{float(v):.2f}" for v in torch.quantile(weights, torch.tensor([0.0, 0.1, 0.5, 0.9, 1.0]))]
    print(f"scored {len(texts)} sentences: fragility {float(scores.min()):.2f}..{float(scores.max()):.2f} "
          f"(mean {float(scores.mean()):.2f}); weights sigmoid(-4 F + 3.5) min/10%/50%/90%/max {'/'.join(q)} "
          f"-> {args.out}")


def _repro(args: argparse.Namespace) -> None:
    from lcm_fast.text.repro import run

    if args.steps < 1 or args.seeds < 1:
        raise ValueError(f"--steps and --seeds must be >= 1, got {args.steps} and {args.seeds}")
    if args.lpcm:
        from lcm_fast.text import lpcm_ablation

        lpcm_ablation.run(args.out, steps=args.steps, quick=args.quick, device=args.device)
        print((Path(args.out) / "lpcm.md").read_text())
        return
    run(args.out, steps=args.steps, seeds=args.seeds, quick=args.quick, mi_model=args.mi_model, device=args.device,
        progress=True)
    print((Path(args.out) / "table.md").read_text())
    print(f"-> {Path(args.out) / 'table.md'}, {Path(args.out) / 'table.png'}")


def _fit_rvq(args: argparse.Namespace) -> None:
    from lcm_fast.quant import ResidualQuantizer
    from lcm_fast.training.data import sample_embeddings

    mix = [_weighted(item) for item in args.data]
    dim = args.dim or _data_dim([f for f, _ in mix])[0]
    x = sample_embeddings(mix, dim, args.sample, seed=args.seed)
    held_out = max(1, min(len(x) // 10, 10_000))  # the summary is measured on vectors not trained on
    train, test = x[held_out:], x[:held_out]
    if len(train) < args.size:
        raise ValueError(f"{len(train)} training vectors for codebooks of {args.size} units: give more data "
                         f"(--sample) or a smaller --size")
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() and args.backend == "torch" else None)
    rq = ResidualQuantizer(dim, args.codebooks, args.size)
    rq.train(train, backend=args.backend, device=device, n_iter=args.iters, init=args.init, seed=args.seed)
    rq.save(args.out)
    print(f"{args.codebooks} x {args.size} codebooks ({args.backend}) trained on {len(train)} vectors -> {args.out}")
    print(f"relative squared error on {held_out} held-out vectors, per prefix of k codebooks:")
    for k, err in rq.prefix_errors(test.to(rq.device)).items():
        print(f"  k={k:<4d} {err:.4f}")


def _flops(args: argparse.Namespace) -> None:
    from lcm_fast.flops.plot import figure13_data, plot_figure13

    data = figure13_data(args.lcm, args.llm, steps=args.steps, cfg=not args.no_cfg)
    print(f"crossover sentence length (tokens) from which SONAR + Two-Tower {args.lcm} ({args.steps} steps) "
          f"needs fewer FLOPs than {args.llm}:")
    print(f"  {'context':>8} {'official':>9} {'fast':>6}")
    for context, official, fast in zip(data["contexts"], data["crossover"]["official"], data["crossover"]["fast"]):
        print(f"  {context:>8} {official if official is not None else '>200':>9} {fast if fast is not None else '>200':>6}")
    if args.plot:
        print(f"figure -> {plot_figure13(data, args.plot, args.json)}")
    elif args.json:
        Path(args.json).write_text(__import__("json").dumps(data, indent=1) + "\n")


SONAR_WEIGHTS_HELP = ("directory with SONAR's sonar_text_encoder.pt, sonar_text_decoder.pt and "
                      "sentencepiece.source.256000.model (default: $LCM_FAST_SONAR_DIR)")


def _encoder_options(args: argparse.Namespace) -> dict:
    """load_encoder's options from --device, and for SONAR --sonar-weights and --lang."""
    options = {"device": args.device} if args.device else {}
    if args.encoder == "sonar":
        options.update(weights_dir=args.sonar_weights, source_lang=args.lang)
    return options


def _sonar_decoder_options(args: argparse.Namespace) -> dict:
    options = {"device": args.device} if args.device else {}
    return {**options, "weights_dir": args.sonar_weights, "target_lang": args.lang}


def _prepare(args: argparse.Namespace) -> None:
    from lcm_fast.text import load_encoder
    from lcm_fast.text.prepare import prepare

    manifest = prepare(args.input, args.output, load_encoder(args.encoder, **_encoder_options(args)), text_column=args.text_column,
                       max_chars=args.max_chars, shard_docs=args.shard_docs, batch_size=args.batch_size,
                       backend=args.backend, ray_workers=args.ray_workers, paragraphs=args.paragraphs,
                       plan_source=args.plan_source, plan_column=args.plan_column)
    print(f"{manifest['documents']} documents in {len(manifest['shards'])} shards, "
          f"{manifest['bank_sentences']} bank sentences -> {args.output}")


def _generate(args: argparse.Namespace) -> None:
    import json

    import torch

    import lcm_fast
    from lcm_fast.text import RetrievalDecoder, SonarDecoder, load_encoder
    from lcm_fast.text.pipeline import DEMO_DIR, continue_text

    # the options first: a bad one fails before any model or encoder is loaded
    if args.sentences < 1:
        raise ValueError(f"--sentences must be >= 1, got {args.sentences}")
    if bool(args.text) == bool(args.data):
        raise ValueError("give either a prompt text or --data SHARDS (a corpus), not both or neither")
    if args.data and not args.out:
        raise ValueError("--data needs --out DIR (the output shards and the manifest)")
    if args.out and not args.data:
        raise ValueError("--out is for --data (a corpus); a prompt text prints its continuation")
    generation = lcm_fast.GenerationOptions.recommended(
        inference_timesteps=args.steps, guidance_scale=args.guidance, seed=args.seed,
        num_candidates=args.num_candidates, beam_size=args.beam_size, beam_scorer=args.beam_scorer)
    break_vec = None
    if args.lpcm:
        from lcm_fast.text.paragraphs import load_break

        break_vec = load_break(args.lpcm)
    model_dir = Path(args.model) if args.model else DEMO_DIR
    if not (model_dir / "config.json").is_file():
        raise ValueError(f"{model_dir} is not a model directory (save_pretrained / lcm-fast train)")
    model = lcm_fast.from_pretrained(model_dir, dtype=getattr(torch, args.dtype), device=args.device)
    if args.data:
        _generate_corpus(args, model, generation, break_vec)
        return
    encoder = load_encoder(args.encoder, **_encoder_options(args))
    if args.decoder == "sonar":
        decoder = SonarDecoder(**_sonar_decoder_options(args))
    else:
        bank = Path(args.decoder) if args.decoder else model_dir / "bank"
        if not (bank / "bank.json").is_file():
            raise ValueError(f"no sentence bank at {bank}: pass --decoder BANK_DIR "
                             "(lcm-fast prepare writes one) or --decoder sonar")
        decoder = RetrievalDecoder.load(bank, args.bank_index)
    result = continue_text(" ".join(args.text), model, encoder, decoder, n_sentences=args.sentences,
                           options=generation, weights=args.weights, break_vec=break_vec)
    if args.json:
        print(json.dumps(result, ensure_ascii=False))
        return
    for sentence in result["sentences"]:
        score = "" if sentence["similarity"] is None else f"[{sentence['similarity']:.2f}] "
        print(f"{score}{sentence['text']}")


def _generate_corpus(args: argparse.Namespace, model, generation, break_vec) -> None:
    from lcm_fast.text import RetrievalDecoder, SonarDecoder
    from lcm_fast.text.corpus_generation import generate_corpus

    decoder = None
    if args.decoder == "sonar":
        decoder = SonarDecoder(**_sonar_decoder_options(args))
    elif args.decoder not in (None, "none"):
        decoder = RetrievalDecoder.load(args.decoder, args.bank_index)
    manifest = generate_corpus(
        model, args.data, args.out, max_gen_len=args.sentences, options=generation,
        prompt_sentences=args.prompt_sentences, id_column=None if args.id_column == "none" else args.id_column,
        batch_size=args.batch_size, decoder=decoder, decoder_name=args.decoder, weights=args.weights,
        skip_bad_shards=args.skip_bad_shards,
        backend=args.backend, ray_workers=args.ray_workers, ray_address=args.ray_address, break_vec=break_vec)
    documents = sum(s["documents"] for s in manifest["shards"].values())
    print(f"{documents} documents in {len(manifest['shards'])} shards -> {args.out}")
    if manifest["failed"]:
        for path, error in manifest["failed"].items():
            print(f"failed: {path}: {error}", file=sys.stderr)
        raise SystemExit(f"{len(manifest['failed'])} shard(s) failed (listed in {Path(args.out) / 'generate.json'}); "
                         "fix them and run the same command again to generate them")


def _eval(args: argparse.Namespace) -> None:
    import json

    import torch

    import lcm_fast
    from lcm_fast.text import MutualInformation, RetrievalDecoder, SonarDecoder, load_encoder
    from lcm_fast.text.evaluate import evaluate

    for name in ("max_docs", "prompt_sentences", "generate_sentences", "steps"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    model = lcm_fast.from_pretrained(args.model, dtype=torch.float32, device=args.device)
    bank = Path(args.decoder) if args.decoder else Path(args.model) / "bank"
    has_bank = args.decoder not in ("none", "sonar") and (bank / "bank.json").is_file()
    if args.decoder == "sonar":
        decoder = SonarDecoder(**_sonar_decoder_options(args))
    else:
        decoder = RetrievalDecoder.load(bank, args.bank_index) if has_bank else None
    encoder = load_encoder(args.encoder, **_encoder_options(args)) if decoder is not None else None
    if encoder is not None and encoder.dim != model.sonar_dim:
        raise ValueError(f"--encoder {args.encoder} gives {encoder.dim}-d embeddings, the model takes "
                         f"{model.sonar_dim}-d ones: pass the encoder its data was prepared with")
    if args.mi_model and decoder is None:
        raise ValueError(f"MI scores decoded sentences, but there is no sentence bank at {bank}: "
                         "pass --decoder BANK_DIR")
    mi = MutualInformation(args.mi_model, device=args.device or "cpu") if args.mi_model else None
    options = lcm_fast.GenerationOptions.paper(model, inference_timesteps=args.steps, seed=0)
    result = evaluate(model, args.data, encoder=encoder, decoder=decoder, max_docs=args.max_docs,
                      prompt_sentences=args.prompt_sentences, generate_sentences=args.generate_sentences,
                      options=options, mutual_information=mi)
    for section, metrics in result.items():
        if metrics:
            print(f"{section}: " + "  ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
    if decoder is None:
        print("(no sentence bank: round-trip l2 and generation metrics skipped; pass --decoder BANK_DIR)")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")


def main(argv: Optional[Sequence[str]] = None) -> None:
    from lcm_fast.archs import ARCHS
    from lcm_fast.training import LOSSES, TrainConfig

    parser = argparse.ArgumentParser(prog="lcm-fast", description="Large Concept Models: prepare text into concept "
                                     "embeddings, train every LCM variant, generate and evaluate; fast kernels.")
    parser.add_argument("--debug", action="store_true", default=os.environ.get("LCM_FAST_DEBUG") == "1",
                        help="show the traceback of an input error (also LCM_FAST_DEBUG=1)")
    parser.add_argument("--threads", type=int, help="CPU threads (default: OMP_NUM_THREADS when set, else the "
                        "cores the load average leaves idle)")
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
    train.add_argument("--arch", choices=sorted(ARCHS), metavar="ARCH",
                       help="model preset (the embedding dim always follows the data): small_* (model dim 256, 2 "
                       "layers per stack; the default, for a first run), toy_* (the official toy archs, model dim "
                       "1024), *_1_6B and two_tower_diffusion_lcm_7B (the paper's). One of: " + ", ".join(sorted(ARCHS)))
    train.add_argument("--config", help="YAML with optional sections model:, train:, data: overriding the defaults")
    train.add_argument("--init", help="start from a model saved with save_pretrained instead of random weights")
    train.add_argument("--out", default="lcm_run", help="output directory (checkpoints/, metrics.jsonl)")
    train.add_argument("--steps", type=int, help="optimizer steps (overrides the config)")
    train.add_argument("--keep", type=int, help="keep only the newest N checkpoints (default: all)")
    train.add_argument("--resume", nargs="?", const="latest", choices=["latest", "must"],
                       help="continue from the latest checkpoint in --out (or start, saying so, when there is none); "
                       "--resume must: fail without one")
    train.add_argument("--normalizer", help="normalizer statistics (.pt from fit-normalizer or an official one)")
    train.add_argument("--device", help="default: cuda (cuda:LOCAL_RANK under torchrun) when available, else cpu")
    train.add_argument("--precision", choices=["auto", "fp32", "bf16"],
                       help="bf16: bf16 autocast with fp32 weights and optimizer state (default auto: bf16 on CUDA)")
    train.add_argument("--parallel", choices=["ddp", "fsdp"],
                       help="under torchrun: ddp (default) or fsdp (FSDP2: weights, gradients, optimizer state sharded)")
    train.add_argument("--eot", help='append this sentence\'s embedding to every document: "End of text." '
                       '(pre-training), "End of response." (instruction fine-tuning); encoded with --encoder')
    train.add_argument("--encoder", choices=["minilm", "sonar"],
                       help="encoder for --eot (default: the one prepare.json beside the data names, else minilm)")
    train.add_argument("--rvq", help="Quant-LCM: RVQ codebooks (.safetensors from fit-rvq); sets the quantizer shape")
    train.add_argument("--fragility", help="weight each target by its fragility (paper eq. 25): the .pt of fit-fragility")
    rep = sub.add_parser("repro", help="the paper's Table 3 at small scale, offline: every variant trained on the "
                         "shipped corpus and scored on held-out documents (about 30 min on 2 CPU cores)")
    rep.add_argument("--out", required=True, help="output directory: table.md, table.png, data/, runs/")
    rep.add_argument("--steps", type=int, default=600, help="training steps per variant")
    rep.add_argument("--seeds", type=int, default=1, help="seeds per variant: the table gives mean +- spread")
    rep.add_argument("--quick", action="store_true", help="a few documents and tiny models, end to end (tests)")
    rep.add_argument("--lpcm", action="store_true", help="the LPCM ablation (paper Table 13) instead: One-Tower vs LPCMs "
                     "(extractive and mean plans) on the Python reference's paragraphs, pre-training metrics and a "
                     "coherence proxy, with and without beam search (about 30 minutes on 2 CPU cores)")
    rep.add_argument("--mi-model", default=os.environ.get(MI_MODEL_ENV),
                     help=f"local causal LM directory for the MI column (the paper: GPT-2); default ${MI_MODEL_ENV}")
    rep.add_argument("--device", help="default: cuda when available, else cpu")
    frag = sub.add_parser("fit-fragility", help="score sentences' fragility (paper eq. 26-27) and fit the MLP F that "
                          "train --fragility weights by")
    frag.add_argument("--data", nargs="+", required=True, help="prepared parquet files (with their sentences)")
    frag.add_argument("--bank", required=True, help="sentence bank directory (lcm-fast prepare) of *other* text: the "
                      "decoder (a bank holding the scored sentences returns them unchanged)")
    frag.add_argument("--encoder", default="minilm", choices=["minilm", "sonar"],
                      help="the external encoder of the score (the paper: MGTE)")
    frag.add_argument("--normalizer", help="normalizer .pt (default: fitted on the scored sentences)")
    frag.add_argument("--sample", type=int, default=2000, help="sentences to score (9 decodings each)")
    frag.add_argument("--seed", type=int, default=0)
    frag.add_argument("--out", required=True, help="output .pt (the FragilityMLP state dict)")
    fit = sub.add_parser("fit-normalizer", help="fit the SONAR normalizer on a weighted mix of parquet files")
    fit.add_argument("--data", nargs="+", required=True, help="parquet files, each optionally FILE:WEIGHT (default 1)")
    fit.add_argument("--dim", type=int, help="embedding dim (default: the data's)")
    fit.add_argument("--sample", type=int, default=1_000_000, help="sentence embeddings to sample in total")
    fit.add_argument("--method", choices=["gaussian_robust", "robust", "standard"], default="gaussian_robust")
    fit.add_argument("--seed", type=int, default=0)
    fit.add_argument("--out", required=True, help="output .pt (official normalizer format)")
    rvq = sub.add_parser("fit-rvq", help="train residual vector quantization codebooks on parquet embeddings")
    rvq.add_argument("--data", nargs="+", required=True, help="parquet files, each optionally FILE:WEIGHT (default 1)")
    rvq.add_argument("--dim", type=int, help="embedding dim (default: the data's)")
    rvq.add_argument("--codebooks", type=int, default=64, help="number of codebooks M (paper: 64)")
    rvq.add_argument("--size", type=int, default=8192, help="units per codebook K (paper: 8192)")
    rvq.add_argument("--backend", choices=["torch", "faiss"], default="torch",
                     help="torch: residual k-means on --device; faiss: IRVQ (progressive dims), beam 1")
    rvq.add_argument("--device", help="torch backend: cpu or cuda (default: cuda when available)")
    rvq.add_argument("--sample", type=int, default=1_000_000, help="embeddings to sample in total (10%% held out)")
    rvq.add_argument("--iters", type=int, default=10, help="k-means iterations per codebook")
    rvq.add_argument("--init", choices=["random", "kmeans++"], default="random", help="torch backend: k-means init")
    rvq.add_argument("--seed", type=int, default=1234)
    rvq.add_argument("--out", required=True, help="output .safetensors")
    flops = sub.add_parser("flops", help="inference FLOPs of SONAR + Two-Tower LCM vs a token LLM (paper Figure 13)")
    flops.add_argument("--lcm", choices=["1.6B", "7B"], default="1.6B")
    flops.add_argument("--llm", default="llama2-7b", choices=["llama2-7b", "llama2-13b", "llama3-8b"])
    flops.add_argument("--steps", type=int, default=40, help="executed diffusion steps per sentence (paper: 40)")
    flops.add_argument("--no-cfg", action="store_true", help="without classifier-free guidance")
    flops.add_argument("--plot", help="write the figure (PNG; needs matplotlib)")
    flops.add_argument("--json", help="write the numbers behind it")
    prep = sub.add_parser("prepare", help="text files -> sentence-embedding parquet shards + a sentence bank")
    prep.add_argument("--input", nargs="+", required=True, help=".txt (blank-line separated documents), .jsonl, .parquet")
    prep.add_argument("--output", required=True, help="output directory (resumable: completed shards are kept)")
    prep.add_argument("--encoder", default="minilm", choices=["minilm", "sonar"])
    prep.add_argument("--sonar-weights", help=SONAR_WEIGHTS_HELP)
    prep.add_argument("--lang", default="eng_Latn", help="SONAR's language of the text (an NLLB code)")
    prep.add_argument("--device", help="encoder device (default cpu)")
    prep.add_argument("--text-column", default="text", help="text field of .jsonl / column of .parquet inputs")
    prep.add_argument("--max-chars", type=int, default=200, help="sentence length cap (paper: 200)")
    prep.add_argument("--shard-docs", type=int, default=1000, help="documents per shard")
    prep.add_argument("--batch-size", type=int, default=64, help="sentences per encoder batch")
    prep.add_argument("--backend", default="local", choices=["local", "ray"],
                      help="ray: encode and write shards on Ray Data actors (a cluster via RAY_ADDRESS; the output "
                      "directory must be shared by all nodes)")
    prep.add_argument("--ray-workers", type=int, help="actors for --backend ray (default: autoscaling)")
    prep.add_argument("--paragraphs", action="store_true",
                      help="the LPCM's data (train --variant lpcm): paragraphs (blank lines, else SaT when configured, "
                      "else line breaks, else groups of 5 sentences; at most 10 sentences each, one-sentence runs "
                      "merged), a break concept after each and a plan concept before each following one")
    prep.add_argument("--plan-source", default="extractive", choices=["extractive", "mean", "text"],
                      help="--paragraphs: the plan concept is the paragraph's most central sentence (extractive), the "
                      "mean of its sentences at their norm (mean), or a plan text of the input (text: --plan-column, "
                      "one per blank-line paragraph)")
    prep.add_argument("--plan-column", default="plans", help="--plan-source text: the input's list of plan texts")
    gen = sub.add_parser("generate", help="continue a text with an LCM (default: the shipped demo model, offline)",
                         description="Segments the text, encodes it, generates sentences with the fast engine and "
                         "decodes them; each line shows the decoder's similarity to its bank sentence.")
    gen.add_argument("text", nargs="*", help="the prompt text (or --data for a corpus)")
    gen.add_argument("--data", nargs="+", help="a corpus: parquet shards (paths or quoted globs) with 'embeddings' and "
                     "an id column; writes one output shard per input shard to --out, resumably")
    gen.add_argument("--out", help="--data: output directory (part-NNNNN.parquet + generate.json; rerun to resume)")
    gen.add_argument("--prompt-sentences", type=int, help="--data: the prompt is each document's first N sentences "
                     "(default: all)")
    gen.add_argument("--id-column", default="id", help="--data: the documents' id column ('none': shard name and row)")
    gen.add_argument("--batch-size", type=int, help="--data: documents per batch (default 64 on a GPU, 16 on a CPU)")
    gen.add_argument("--skip-bad-shards", action="store_true",
                     help="--data: report a shard that cannot be read and go on (default: stop)")
    gen.add_argument("--backend", default="local", choices=["local", "ray"],
                     help="--data: ray runs shards on a Ray Data actor pool, one model per actor (a GPU each where "
                     "there are GPUs; --out must be shared by all nodes)")
    gen.add_argument("--ray-workers", type=int, help="--data --backend ray: actors (default: autoscaling)")
    gen.add_argument("--ray-address", help="--data --backend ray: an existing cluster (default: RAY_ADDRESS, else a "
                     "local one)")
    gen.add_argument("--model", help="model directory (default: the shipped demo, trained on lcm_fast.text.corpus)")
    gen.add_argument("--encoder", default="minilm", choices=["minilm", "sonar"])
    gen.add_argument("--decoder", help="sentence bank directory (default: MODEL/bank; with --data: none), 'sonar', or "
                     "'none' (--data: concepts only)")
    gen.add_argument("--bank-index", default="auto", choices=BANK_INDEXES,
                     help="sentence-bank search: auto (exact, HNSW for large banks), flat, hnsw, ivf, torch")
    gen.add_argument("--sonar-weights", help=SONAR_WEIGHTS_HELP)
    gen.add_argument("--lang", default="eng_Latn", help="SONAR's language of the prompt and of the output (NLLB code)")
    gen.add_argument("--sentences", type=int, default=3, help="sentences to generate")
    gen.add_argument("--steps", type=int, default=40, help="diffusion steps requested (paper: 40)")
    gen.add_argument("--guidance", type=float, default=3.0, help="classifier-free guidance scale (paper: 3)")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--num-candidates", type=int, default=1, help="beam search: concepts sampled per beam at each "
                     "sentence (K; K x B rows per document)")
    gen.add_argument("--beam-size", type=int, default=1, help="beam search: partial documents kept (B; 1 with K = 1: "
                     "plain sampling)")
    gen.add_argument("--beam-scorer", default="consistency", choices=["consistency", "plan"],
                     help="beam search: score candidates by the model's denoising loss (diffusion LCMs) or by cosine "
                     "to the LPCM's latest plan (with --lpcm)")
    gen.add_argument("--device", help="default cpu")
    gen.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                     help="the model's weights and activations (bfloat16: half the weight bytes, ~1.2-1.7x faster "
                     "on CPU at batch 1; the sampler stays fp32)")
    gen.add_argument("--weights", choices=["int8", "fp8"], help="the decode step's weight format: int8 or fp8 "
                     "(weight-only, per-channel scales: half of bf16's bytes per step; int8 rounds less at the same "
                     "bytes; default: the model's own weights; README 'Weight formats')")
    gen.add_argument("--json", action="store_true", help='print {"prompt": [...], "sentences": [{"text", "similarity"}]}')
    gen.add_argument("--lpcm", help="an LPCM's break concept (lpcm.pt of its prepare --paragraphs data): its breaks "
                     "and plans are left out of the printed sentences (--json lists every concept's role and the plans; with --data the "
                     "output shards get a roles column)")
    ev = sub.add_parser("eval", help="pre-training metrics (l2, l2-r, CA, PAR) and generation metrics (ROUGE-L, "
                        "OVL-3, REP-4, word ratio) on held-out parquet documents")
    ev.add_argument("--model", required=True, help="model directory")
    ev.add_argument("--data", nargs="+", required=True, help="parquet shards (lcm-fast prepare output for text metrics)")
    ev.add_argument("--encoder", default="minilm", choices=["minilm", "sonar"], help="for the round-trip l2")
    ev.add_argument("--decoder", help="sentence bank directory (default: MODEL/bank when present), 'sonar' (the "
                    "SONAR decoder, --sonar-weights), or 'none'; a bank holding the evaluated sentences is reported (leak)")
    ev.add_argument("--sonar-weights", help=SONAR_WEIGHTS_HELP)
    ev.add_argument("--lang", default="eng_Latn", help="SONAR's language (NLLB code)")
    ev.add_argument("--bank-index", default="auto", choices=BANK_INDEXES,
                     help="sentence-bank search: auto (exact, HNSW for large banks), flat, hnsw, ivf, torch")
    ev.add_argument("--mi-model", default=os.environ.get(MI_MODEL_ENV),
                    help=f"local causal LM directory for the MI metric (the paper: GPT-2); default ${MI_MODEL_ENV}")
    ev.add_argument("--max-docs", type=int, default=64)
    ev.add_argument("--prompt-sentences", type=int, default=3)
    ev.add_argument("--generate-sentences", type=int, default=3)
    ev.add_argument("--steps", type=int, default=40, help="diffusion steps requested for generation")
    ev.add_argument("--device", help="default cpu")
    ev.add_argument("--json", help="write the metrics as JSON")
    args = parser.parse_args(argv)
    command = {"info": _info, "train": _train, "fit-normalizer": _fit_normalizer, "fit-rvq": _fit_rvq,
               "fit-fragility": _fit_fragility, "repro": _repro,
               "flops": _flops, "prepare": _prepare, "generate": _generate, "eval": _eval}[args.command]
    import torch

    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(_thread_count(args.threads) or threads)
        _device(getattr(args, "device", None))
        command(args)
    except USER_ERRORS as error:
        if args.debug:
            raise
        print(f"lcm-fast {args.command}: error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    finally:
        torch.set_num_threads(threads)  # main() called in-process (tests, notebooks) leaves the caller's setting


def _info(args: argparse.Namespace) -> None:
    from lcm_fast.info import main as info

    info()


if __name__ == "__main__":
    main(sys.argv[1:])
