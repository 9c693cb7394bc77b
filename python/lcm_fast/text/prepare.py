"""``lcm-fast prepare``: text files -> sentence-embedding parquet shards + a sentence bank (paper appendix A).

Inputs: ``.txt`` (documents separated by blank lines), ``.jsonl`` (one JSON object per line, text in
``text_column``) and ``.parquet`` (string column ``text_column``). Documents are segmented (capped at
``max_chars``), encoded in batches and written ``shard_docs`` documents per shard in the trainer's schema
(``embeddings``: fp16 vectors, ``sentences``: the texts). Shards are written atomically and the run is
deterministic, so an interrupted run resumes by skipping the shards that exist. At the end the unique
sentences and their embeddings become the retrieval decoder's bank (``DIR/bank``).

``paragraphs=True`` (``--paragraphs``) prepares the Large Planning Concept Model's data (paper section 4.3,
:mod:`lcm_fast.text.paragraphs`): documents as paragraphs, a break concept after each (the encoder's embedding of
``BREAK_TEXT``, stored as ``DIR/lpcm.pt``) and a plan concept before each paragraph after a break, from
``plan_source``: ``extractive`` (the paragraph's most central sentence), ``mean`` (the mean of its sentences at
their norm: a plan that copies none of them) or ``text`` (the input's ``plan_column``: one plan text per
blank-line paragraph, which are then taken as they are). Shards gain a ``roles`` column.

``backend="ray"`` (with ``ray[data]`` installed) encodes and writes the shards on a Ray Data actor pool
(one encoder per actor, for a multi-machine cluster: ``ray.init(address=...)`` first, and ``out_dir`` on
a filesystem every node shares); segmentation, shard numbering, resuming and the bank stay in the
driver, so both backends write the same shards.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterator, Optional, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from tqdm.auto import tqdm

from ..training.data import DataError, write_documents
from .encoders import Encoder
from .paragraphs import BREAK_TEXT, PLAN_SOURCES, SENTENCE, split_paragraphs, structure
from .retrieval import RetrievalDecoder
from .segment import segment

MANIFEST = "prepare.json"
LPCM_FILE = "lpcm.pt"  # the break concept of paragraph-structured data
SUFFIXES = (".txt", ".jsonl", ".parquet")
BACKENDS = ("local", "ray")


def read_documents_text(path: str | Path, text_column: str = "text",
                        plan_column: Optional[str] = None) -> Iterator[str | tuple[str, list[str]]]:
    """The documents of one input file, in order (see the module docstring for the formats); with
    ``plan_column``, (text, plan texts) pairs (.jsonl and .parquet only)."""
    path = Path(path)
    if path.suffix not in SUFFIXES:
        raise DataError(f"{path}: unsupported input type {path.suffix!r}; expected one of {SUFFIXES}")
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    if path.suffix == ".parquet":
        try:
            table = pq.read_table(path)
        except (pa.ArrowInvalid, OSError) as e:
            raise DataError(f"{path}: not a readable parquet file ({e})") from e
        for column, flag in ((text_column, "--text-column"), (plan_column, "--plan-column")):
            if column is not None and column not in table.column_names:
                raise DataError(f"{path}: no column {column!r} (columns: {table.column_names}); pass {flag}")
        texts = [str(t) if t is not None else "" for t in table.column(text_column).to_pylist()]
        if plan_column is None:
            yield from texts
        else:
            yield from zip(texts, ([str(p) for p in plans or []] for plans in table.column(plan_column).to_pylist()))
        return
    if plan_column is not None and path.suffix == ".txt":
        raise DataError(f"{path}: plan texts (--plan-source text) need .jsonl or .parquet input with a "
                        f"{plan_column!r} field")
    try:
        content = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (a binary file?): {e}") from e
    if path.suffix == ".txt":
        yield from (doc.strip() for doc in content.replace("\r\n", "\n").split("\n\n") if doc.strip())
        return
    for line_no, line in enumerate(content.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{line_no}: invalid JSON ({e})") from e
        for field, flag in ((text_column, "--text-column"), (plan_column, "--plan-column")):
            if field is not None and (not isinstance(record, dict) or field not in record):
                keys = sorted(record) if isinstance(record, dict) else type(record).__name__
                raise DataError(f"{path}:{line_no}: no field {field!r} (has {keys}); pass {flag}")
        if plan_column is None:
            yield str(record[text_column])
        elif not isinstance(record[plan_column], list):
            raise DataError(f"{path}:{line_no}: {plan_column!r} must be a list of plan texts, one per paragraph")
        else:
            yield str(record[text_column]), [str(p) for p in record[plan_column]]


def _paragraphed(path: Path, index: int, doc, max_chars: int, plan_source: str) -> dict:
    """An LPCM document: {"paragraphs": [[sentences]], "plans": [texts] or None, "plan_source": how plans are
    computed when there are no plan texts}."""
    if isinstance(doc, str):
        return {"paragraphs": split_paragraphs(doc, max_chars), "plans": None, "plan_source": plan_source}
    text, plans = doc  # the user's plans: one per blank-line paragraph, the paragraphs as given
    paragraphs = [p for p in (segment(b, max_chars) for b in text.replace("\r\n", "\n").split("\n\n")) if p]
    if len(plans) != len(paragraphs):
        raise DataError(f"{path}: document {index} has {len(paragraphs)} paragraphs (blank-line separated) but "
                        f"{len(plans)} plan texts")
    return {"paragraphs": paragraphs, "plans": plans}


def _segmented(inputs: Sequence[str | Path], text_column: str, max_chars: int, paragraphs: bool = False,
               plan_column: Optional[str] = None, plan_source: str = "extractive") -> Iterator[list[str] | dict]:
    """Per document its sentences, or with ``paragraphs`` its :func:`_paragraphed` structure."""
    for path in inputs:
        count = 0
        for index, doc in enumerate(read_documents_text(path, text_column, plan_column)):
            item = (_paragraphed(Path(path), index, doc, max_chars, plan_source) if paragraphs
                    else segment(doc, max_chars))
            if not (item["paragraphs"] if paragraphs else item):
                raise DataError(f"{path}: document {index} has no sentences (empty text)")
            count += 1
            yield item
        if count == 0:
            raise DataError(f"{path}: no documents (empty file?)")


def _write_shard(path: Path, docs: Sequence, encoder: Encoder, batch_size: int,
                 break_embedding: Optional[torch.Tensor] = None) -> None:
    """Encodes the sentences of docs and writes them as one shard, atomically; paragraph-structured documents
    (dicts, with ``break_embedding``) become the LPCM's sequences with their roles."""
    tmp = path.with_suffix(".parquet.tmp")
    if break_embedding is None:
        emb = encoder.encode([s for d in docs for s in d], batch_size=batch_size)
        write_documents(tmp, list(torch.split(emb, [len(d) for d in docs])), sentences=[list(d) for d in docs])
    else:
        texts = [s for d in docs for s in [*(s for p in d["paragraphs"] for s in p), *(d["plans"] or [])]]
        emb = iter(torch.split(encoder.encode(texts, batch_size=batch_size),
                               [n for d in docs for n in (sum(map(len, d["paragraphs"])), len(d["plans"] or []))]))
        out = []
        for d in docs:
            sentences, plans = next(emb), next(emb)
            out.append(structure(d["paragraphs"], sentences, break_embedding,
                                 None if d["plans"] is None else (d["plans"], plans), d.get("plan_source", "extractive")))
        write_documents(tmp, [o.embeddings for o in out], sentences=[o.texts for o in out], roles=[o.roles for o in out])
    os.replace(tmp, path)


class _RayShardWriter:
    """Ray Data actor: keeps one encoder and writes the shards of the rows it is given."""

    def __init__(self, encoder: Encoder, batch_size: int, break_embedding: Optional[torch.Tensor]) -> None:
        self.encoder, self.batch_size, self.break_embedding = encoder, batch_size, break_embedding

    def __call__(self, batch: dict) -> dict:
        for path, docs in zip(batch["path"], batch["docs"]):
            _write_shard(Path(str(path)), json.loads(str(docs)), self.encoder, self.batch_size, self.break_embedding)
        return {"path": batch["path"]}


def _ray_data():
    try:
        import ray.data
    except ImportError:
        raise ImportError("the ray preparation backend needs Ray Data: pip install 'ray[data]'") from None
    return ray.data


def _write_shards_ray(jobs: list[tuple[Path, list]], encoder: Encoder, batch_size: int, workers: Optional[int],
                      break_embedding: Optional[torch.Tensor]) -> None:
    ray_data = _ray_data()
    rows = [{"path": str(path), "docs": json.dumps(docs)} for path, docs in jobs]  # JSON: one Arrow string per shard
    pool = ray_data.ActorPoolStrategy(size=workers) if workers else ray_data.ActorPoolStrategy(min_size=1)
    written = ray_data.from_items(rows, override_num_blocks=len(rows)).map_batches(  # a block per shard: all actors busy
        _RayShardWriter, fn_constructor_args=(encoder, batch_size, break_embedding), batch_size=1, compute=pool)
    for _ in written.iter_rows():
        pass


def prepare(inputs: Sequence[str | Path], out_dir: str | Path, encoder: Encoder, *, text_column: str = "text",
            max_chars: int = 200, shard_docs: int = 1000, batch_size: int = 64, progress: bool = True,
            backend: str = "local", ray_workers: Optional[int] = None, paragraphs: bool = False,
            plan_source: str = "extractive", plan_column: str = "plans") -> dict:
    """Runs the preparation (resuming if ``out_dir`` holds a run with the same options); returns the manifest.

    backend: ``local`` (this process) or ``ray`` (Ray Data actors, ``ray_workers`` of them: default an
    autoscaling pool; shards are handed over ``8 * workers`` at a time so the driver never holds the corpus).
    paragraphs, plan_source, plan_column: the LPCM's data (module docstring).
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown preparation backend {backend!r}; expected one of {BACKENDS}")
    if plan_source not in PLAN_SOURCES:
        raise ValueError(f"unknown plan source {plan_source!r}; expected one of {PLAN_SOURCES}")
    if backend == "ray":
        _ray_data()  # before any work: a missing Ray is an error up front, not after segmenting
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    options = {"inputs": [str(Path(p)) for p in inputs], "encoder": encoder.name, "dim": encoder.dim,
               "text_column": text_column, "max_chars": max_chars, "shard_docs": shard_docs}
    break_embedding = None
    if paragraphs:
        options.update(paragraphs=True, plan_source=plan_source)
        if plan_source == "text":
            options["plan_column"] = plan_column
        break_embedding = encoder.encode([BREAK_TEXT])[0].float()
    manifest_path = out / MANIFEST
    if manifest_path.is_file():
        previous = json.loads(manifest_path.read_text())
        if previous.get("options") != options:
            raise DataError(f"{out} holds a preparation with other options ({previous.get('options')}); "
                            "use a new output directory")
    manifest_path.write_text(json.dumps({"options": options, "complete": False}, indent=1) + "\n")
    if paragraphs:
        torch.save({"break": break_embedding, "break_text": BREAK_TEXT}, out / LPCM_FILE)

    shards, docs, pending = [], [], []
    bar = tqdm(disable=not progress, desc="prepare", unit="doc")
    window = 8 * (ray_workers or 4)

    def run_pending() -> None:
        _write_shards_ray(pending, encoder, batch_size, ray_workers, break_embedding)
        bar.update(sum(len(d) for _, d in pending))
        pending.clear()

    def flush() -> None:
        path = out / f"shard-{len(shards):05d}.parquet"
        shards.append(path.name)
        if path.is_file():  # resuming: completed shards are kept (writes are atomic)
            bar.update(len(docs))
        elif backend == "ray":
            pending.append((path, list(docs)))
            if len(pending) == window:
                run_pending()
        else:
            _write_shard(path, docs, encoder, batch_size, break_embedding)
            bar.update(len(docs))
        docs.clear()

    for doc in _segmented(inputs, text_column, max_chars, paragraphs, plan_column if plan_source == "text" else None,
                          plan_source):
        docs.append(doc)
        if len(docs) == shard_docs:
            flush()
    if docs:
        flush()
    if pending:
        run_pending()
    bar.close()
    bank = _bank(out, shards, encoder.dim)
    bank.save(out / "bank")
    manifest = {"options": options, "complete": True, "shards": shards,
                "documents": sum(pq.read_metadata(out / s).num_rows for s in shards), "bank_sentences": len(bank)}
    manifest_path.write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def _bank(out: Path, shards: Sequence[str], dim: int) -> RetrievalDecoder:
    """The unique sentences of all shards, in first-seen order, with their embeddings (break and plan concepts of
    paragraph-structured shards are not sentences of the text: left out)."""
    seen: dict[str, np.ndarray] = {}
    for name in shards:
        table = pq.read_table(out / name)
        roles = table.column("roles").to_pylist() if "roles" in table.column_names else [None] * table.num_rows
        rows = zip(table.column("sentences").to_pylist(), table.column("embeddings").to_pylist(), roles)
        for sentences, vectors, kinds in rows:
            for s, v, kind in zip(sentences, vectors, kinds or [SENTENCE] * len(sentences)):
                if kind == SENTENCE:
                    seen.setdefault(s, np.asarray(v, dtype=np.float32))
    return RetrievalDecoder(list(seen), torch.from_numpy(np.stack(list(seen.values())).reshape(-1, dim)))
