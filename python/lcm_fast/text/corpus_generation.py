"""``lcm-fast generate --data``: continuations of a corpus of prompt documents, shard by shard, resumable, on Ray.

Input: parquet shards, one row per document: ``embeddings`` (its sentence vectors, the layout of
``lcm-fast prepare`` and the trainer's data) and an id column. Each input shard becomes one output shard,
``part-NNNNN.parquet`` (NNNNN: the shard's place in the input list), with one row per document, in input order:
the input's id, ``prompt_len`` (sentences of prompt used), ``length`` (sentences generated), ``embeddings`` (the
generated concepts, fp16) and, given a decoder, ``sentences`` (their texts). The schema metadata
(``lcm_fast_generate``) and the manifest (``generate.json``) hold the job's options and the model's identity.

Exactness: a shard's documents are generated in batches of similar prompt length (sorted: little padding), each
document with its own noise (:class:`~lcm_fast.inference.noise.DocumentNoise` keyed by its id and position). A
document's output does not depend on its batch beyond fp32 rounding (differently shaped kernels), and a shard's
batches are the same whoever runs it, so a run resumed or spread over Ray workers writes the bytes of one
uninterrupted single-process run with the same BLAS threading (Ray's one-CPU actors run MKL single-threaded, whose
kernels differ from its threaded ones in the last bit on some CPUs, which can change an fp16 output by one unit).
Beam search (``options.num_candidates``, ``beam_size``) keys each candidate's noise as well, so it keeps all of this.

Resuming: output shards are written atomically (a temporary file, then a rename) and the manifest, rewritten
atomically after each shard, lists the finished ones; a run in the same directory skips them. A directory whose
manifest belongs to another job (model, options or inputs) is refused.
"""

from __future__ import annotations

import copy
import glob
import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch import Tensor
from tqdm.auto import tqdm

from ..inference import DocumentNoise, GenerationOptions, Generator
from ..inference.beam import SCORERS
from ..inference.generator import model_device
from ..training.data import DataError, embeddings_column, read_documents
from .encoders import Decoder

MANIFEST = "generate.json"
METADATA_KEY = b"lcm_fast_generate"
BACKENDS = ("local", "ray")


@dataclass(frozen=True)
class CorpusJob:
    """What every shard of a job is generated with (the manifest's ``job``)."""

    options: dict  # GenerationOptions as a dict (seed set: each document's noise is keyed by it)
    max_gen_len: int  # sentences generated per document (fewer when it stops at the end-of-text threshold)
    prompt_sentences: Optional[int]  # the prompt is the document's first sentences (None: all of them)
    id_column: Optional[str]  # None: documents are keyed "<shard file name>#<row>"
    batch_size: int  # documents per generation batch
    decoder: Optional[str]  # the decoder's name when texts are written
    eos_vec: Optional[str]  # SHA-256 of the end-of-text vector that stops documents (None: none given)
    weights: Optional[str] = None  # the decode step's weight format (Generator's ``weights``)
    break_vec: Optional[str] = None  # SHA-256 of an LPCM's break concept: outputs label roles (None: none given)


def expand_inputs(patterns: Sequence[str | Path]) -> list[Path]:
    """Parquet shards of ``patterns`` (paths or globs), each glob sorted, in the order given."""
    paths: list[Path] = []
    for pattern in map(str, patterns):
        matches = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
        if not matches:
            raise DataError(f"--data {pattern!r} matches no file")
        paths.extend(Path(m) for m in matches)
    if len(set(paths)) != len(paths):
        raise DataError("--data names a shard twice")
    return paths


def model_identity(model: torch.nn.Module) -> dict[str, Any]:
    """The model's family, size and a SHA-256 of its weights (names, dtypes, shapes and bytes)."""
    digest = hashlib.sha256()
    count = 0
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{t.dtype}:{list(t.shape)};".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        count += t.numel()
    return {"family": type(model).__name__, "sonar_dim": int(model.sonar_dim), "numel": count,
            "sha256": digest.hexdigest()}


def _digest(vector: Optional[Tensor]) -> Optional[str]:
    return hashlib.sha256(vector.float().cpu().numpy().tobytes()).hexdigest() if vector is not None else None


def default_batch_size(device: torch.device) -> int:
    """Documents per batch: 64 on a GPU (where the fast engine needs batches to fill it), 16 on a CPU (which
    gains little past a few rows and keeps memory small)."""
    return 64 if device.type == "cuda" else 16


def _read_prompts(path: Path, dim: int, job: CorpusJob, max_seq_len: int) -> tuple[pa.Array, list[Tensor]]:
    """(ids, prompts [P_i, dim] fp32) of one input shard. Raises DataError naming the shard (and row)."""
    prompts = [doc.embeddings for _, doc in read_documents(path, dim)]
    if job.prompt_sentences is not None:
        prompts = [p[: job.prompt_sentences] for p in prompts]
    for row, p in enumerate(prompts):
        if p.shape[0] + job.max_gen_len > max_seq_len:
            raise DataError(f"{path} row {row}: a {p.shape[0]}-sentence prompt + {job.max_gen_len} new sentences "
                            f"exceed the model's max_seq_len={max_seq_len}: pass --prompt-sentences")
    if job.id_column is None:
        return pa.array([f"{path.name}#{row}" for row in range(len(prompts))]), prompts
    names = pq.ParquetFile(path).schema_arrow.names
    if job.id_column not in names:
        raise DataError(f"{path}: no id column {job.id_column!r} (columns: {names}); pass --id-column, or "
                        "--id-column none to key documents by shard name and row")
    ids = pq.read_table(path, columns=[job.id_column]).column(job.id_column).combine_chunks()
    if ids.null_count:
        raise DataError(f"{path}: the id column {job.id_column!r} has {ids.null_count} empty ids")
    return ids, prompts


def generate_shard(model: torch.nn.Module, job: CorpusJob, path: Path, out: Path, decoder: Optional[Decoder] = None,
                   eos_vec: Optional[Tensor] = None, on_batch: Callable[[int], None] = lambda n: None,
                   break_vec: Optional[Tensor] = None) -> int:
    """Generates for every document of input shard ``path`` and writes output shard ``out`` atomically; returns the
    number of documents. ``on_batch(n)`` is called after each batch of n documents."""
    ids, prompts = _read_prompts(path, model.sonar_dim, job, model.config.max_seq_len)
    keys = ids.to_pylist()
    options = GenerationOptions.from_dict(job.options)
    generator = Generator(model, options, eos_vec, weights=job.weights, break_vec=break_vec)
    device, D = model_device(model), model.sonar_dim
    order = sorted(range(len(prompts)), key=lambda i: prompts[i].shape[0])  # stable: batches of similar length
    generated: list[Optional[Tensor]] = [None] * len(prompts)
    roles: list[Optional[Tensor]] = [None] * len(prompts)
    for start in range(0, len(order), job.batch_size):
        rows = order[start:start + job.batch_size]
        lens = torch.tensor([prompts[i].shape[0] for i in rows])
        batch = torch.zeros(len(rows), int(lens.max()), D)
        for j, i in enumerate(rows):
            batch[j, : lens[j]] = prompts[i]
        noise = DocumentNoise(options.seed, [keys[i] for i in rows])
        result = generator(batch.to(device), lens, max_gen_len=job.max_gen_len, noise=noise, progress=False)
        for j, i in enumerate(rows):
            generated[i] = result.sequences[j][int(lens[j]):].float().cpu()
            if result.roles is not None:
                roles[i] = result.roles[j][int(lens[j]):]
        on_batch(len(rows))
    docs: list[Tensor] = generated  # type: ignore[assignment]  (every row was generated)
    columns = {"id": ids, "prompt_len": pa.array([p.shape[0] for p in prompts], pa.int32()),
               "length": pa.array([d.shape[0] for d in docs], pa.int32()),
               "embeddings": embeddings_column(docs, D)}
    if break_vec is not None:  # the LPCM's breaks and plans stay in the concepts, labelled (0 sentence, 1 break, 2 plan)
        columns["roles"] = pa.array([r.tolist() for r in roles], pa.list_(pa.int8()))  # type: ignore[union-attr]
    if decoder is not None:
        texts = decoder.decode(torch.cat(docs)) if any(d.shape[0] for d in docs) else []
        offsets = [0] + torch.tensor([d.shape[0] for d in docs]).cumsum(0).tolist()
        columns["sentences"] = pa.array([texts[a:b] for a, b in zip(offsets, offsets[1:])], pa.list_(pa.string()))
    table = pa.table(columns).replace_schema_metadata({METADATA_KEY: json.dumps(asdict(job)).encode()})
    tmp = out.with_name(out.name + ".tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, out)
    return len(docs)


class _RayShardGenerator:
    """Ray Data actor: one model (on the actor's GPU when it has one) for the shards it is given."""

    def __init__(self, model: torch.nn.Module, job: CorpusJob, decoder: Optional[Decoder],
                 eos_vec: Optional[Tensor], break_vec: Optional[Tensor]) -> None:
        self.model = model.to("cuda") if torch.cuda.is_available() else model
        self.job, self.decoder, self.eos_vec, self.break_vec = job, decoder, eos_vec, break_vec

    def __call__(self, batch: dict) -> dict:
        documents, errors = [], []
        for path, out in zip(batch["path"], batch["out"]):
            try:
                documents.append(generate_shard(self.model, self.job, Path(str(path)), Path(str(out)), self.decoder,
                                                self.eos_vec, break_vec=self.break_vec))
                errors.append("")
            except DataError as e:  # the driver reports it, and stops or goes on (skip_bad_shards)
                documents.append(0)
                errors.append(str(e))
        return {"path": batch["path"], "documents": documents, "error": errors}


def _ray():
    try:
        import ray
        import ray.data
    except ImportError:
        raise ImportError("the ray generation backend needs Ray Data: pip install 'ray[data]'") from None
    return ray


def _write_json(path: Path, value: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(value, indent=1) + "\n")
    os.replace(tmp, path)


def generate_corpus(
    model: torch.nn.Module, inputs: Sequence[str | Path], out_dir: str | Path, *, max_gen_len: int = 3,
    options: Optional[GenerationOptions] = None, prompt_sentences: Optional[int] = None, id_column: Optional[str] = "id",
    batch_size: Optional[int] = None, decoder: Optional[Decoder] = None, decoder_name: Optional[str] = None,
    eos_vec: Optional[Tensor] = None, weights: Optional[str] = None, skip_bad_shards: bool = False,
    backend: str = "local", break_vec: Optional[Tensor] = None,
    ray_workers: Optional[int] = None, ray_address: Optional[str] = None, progress: bool = True,
) -> dict[str, Any]:
    """Generates ``max_gen_len`` sentences for every document of the parquet shards ``inputs`` (paths or globs) with
    the fast engine, one output shard per input shard in ``out_dir``; resumes a run in ``out_dir``. Returns the
    manifest: ``shards`` (input -> output name and documents), ``failed`` (input -> error), ``complete``.

    options: generation options (default: the recommended ones, seed 0; the seed keys each document's noise).
    prompt_sentences: the prompt is a document's first sentences (None: all). id_column: the documents' ids
    (None: "<shard file name>#<row>"). batch_size: documents per batch (default :func:`default_batch_size`).
    decoder: also write the generated sentences' texts (``decoder_name`` names it in the manifest). weights: the
    decode step's weight format (:class:`~lcm_fast.Generator`'s; ``"int8"``, ``"fp8"``: weight-only). break_vec: an
    LPCM's break concept: the outputs get a ``roles`` column (each generated concept's role: 0 sentence, 1 break,
    2 plan; the concepts and texts keep them all).
    skip_bad_shards: a shard that cannot be read (DataError) is reported in ``failed`` and the run goes on;
    otherwise it stops the run with that error (finished shards are kept). backend: ``local`` (this process) or
    ``ray`` (a Ray Data actor pool of ``ray_workers`` actors, one model each, one GPU each where the cluster has
    GPUs; ``ray_address``: an existing cluster, else a local one).
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown generation backend {backend!r}; expected one of {BACKENDS}")
    if backend == "ray":
        _ray()  # before any work: a missing Ray is an error up front
    options = options or GenerationOptions.recommended(seed=0)
    if options.seed is None:
        raise ValueError("corpus generation keys each document's noise by the seed: options.seed must be set")
    if not isinstance(options.beam_scorer, str):
        raise ValueError("corpus generation records its options in the manifest: give beam_scorer by name "
                         f"({sorted(SCORERS)}), not a callable ({options.beam_scorer!r})")
    for name, value in (("max_gen_len", max_gen_len), ("prompt_sentences", prompt_sentences or 1),
                        ("batch_size", batch_size or 1)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    if decoder is not None and decoder.dim != model.sonar_dim:
        raise ValueError(f"the decoder works on {decoder.dim}-d embeddings, the model on {model.sonar_dim}-d ones")
    paths = expand_inputs(inputs)
    job = CorpusJob(options=asdict(options), max_gen_len=max_gen_len, prompt_sentences=prompt_sentences,
                    id_column=id_column, batch_size=batch_size or default_batch_size(model_device(model)),
                    decoder=(decoder_name or type(decoder).__name__) if decoder is not None else None,
                    eos_vec=_digest(eos_vec), weights=weights, break_vec=_digest(break_vec))
    identity = model_identity(model)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    manifest_path = out / MANIFEST
    header = {"job": asdict(job), "model": identity, "inputs": [str(p) for p in paths]}
    manifest: dict[str, Any] = {**header, "shards": {}, "failed": {}, "complete": False}
    if manifest_path.is_file():
        previous = json.loads(manifest_path.read_text())
        differ = [k for k in header if previous.get(k) != header[k]]
        if differ:
            raise DataError(f"{out} holds another run's manifest (its {' and '.join(differ)} differ): pass a new --out "
                            "directory, or the same model, options and --data to resume that run")
        manifest["shards"] = {p: s for p, s in previous.get("shards", {}).items() if (out / s["output"]).is_file()}
    outputs = {str(p): f"part-{i:05d}.parquet" for i, p in enumerate(paths)}
    todo = [p for p in paths if str(p) not in manifest["shards"]]
    _write_json(manifest_path, manifest)

    def sizes(p: Path) -> int:
        try:
            return pq.ParquetFile(p).metadata.num_rows
        except (OSError, pa.ArrowException):
            return 0  # a corrupt shard: its error comes when it is read

    bar = tqdm(total=sum(map(sizes, todo)), disable=not progress, desc="generate", unit="doc", dynamic_ncols=True)

    def finished(path: str, documents: int, error: str) -> None:
        if error:
            manifest["failed"][path] = error
            _write_json(manifest_path, manifest)
            if not skip_bad_shards:
                bar.close()
                raise DataError(f"{error} (pass --skip-bad-shards to go on without this shard)")
            bar.write(f"skipped {path}: {error}")
            return
        manifest["failed"].pop(path, None)
        manifest["shards"][path] = {"output": outputs[path], "documents": documents}
        _write_json(manifest_path, manifest)

    if backend == "local":
        for path in todo:
            try:
                n = generate_shard(model, job, path, out / outputs[str(path)], decoder, eos_vec, bar.update, break_vec)
                finished(str(path), n, "")
            except DataError as e:
                finished(str(path), 0, str(e))
    elif todo:
        ray = _ray()
        if not ray.is_initialized():
            ray.init(address=ray_address)  # None: a local cluster
        gpus = ray.cluster_resources().get("GPU", 0)
        shipped = model if model_device(model).type == "cpu" else copy.deepcopy(model).cpu()  # actors place it
        pool = ray.data.ActorPoolStrategy(size=ray_workers) if ray_workers else ray.data.ActorPoolStrategy(min_size=1)
        rows = [{"path": str(p), "out": str(out / outputs[str(p)])} for p in todo]
        results = ray.data.from_items(rows, override_num_blocks=len(rows)).map_batches(  # a block per shard
            _RayShardGenerator, fn_constructor_args=(shipped, job, decoder, eos_vec, break_vec),
            batch_size=1, compute=pool, num_gpus=1 if gpus else None)
        for row in results.iter_rows():
            finished(str(row["path"]), int(row["documents"]), str(row["error"]))
            bar.update(sizes(Path(str(row["path"]))) if not row["error"] else 0)
    bar.close()
    manifest["complete"] = not manifest["failed"] and len(manifest["shards"]) == len(paths)
    _write_json(manifest_path, manifest)
    return manifest
