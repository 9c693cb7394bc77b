"""Training data: parquet files of documents as sentence-embedding sequences.

One row per document: column ``embeddings`` (a list of fixed-size vectors, fp16 or fp32), optionally
``sentences`` (list of strings), ``prompt_len`` (int: the first ``prompt_len`` sentences are the
prompt, for instruction fine-tuning) and ``roles`` (list of int8, one per concept: 0 sentence, 1 break, 2 plan;
the LPCM's data, :mod:`lcm_fast.text.paragraphs`). Files are read with pyarrow one row group at a time
(memory-mapped), shuffled with a seeded buffer, long documents wrapped at ``max_sentences``, and
batched by a concept budget (padded batch size ``batch * longest <= max_concepts``).

The stream is a pure function of (files, options, seed, epoch), so a run resumes exactly by replaying
it and skipping the batches already consumed.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch import Tensor

EMBEDDINGS = "embeddings"
PROMPT_LEN = "prompt_len"
ROLES = "roles"


class DataError(ValueError):
    """Bad training data; the message names the file and the row."""


@dataclass
class Document:
    embeddings: Tensor  # [L, D] fp32
    prompt_len: int = 0  # leading prompt sentences (instruction fine-tuning): no loss on them
    roles: Optional[Tensor] = None  # [L] int8: 0 sentence, 1 break, 2 plan (LPCM data); None: all sentences


@dataclass
class Batch:
    """Right-padded documents."""

    embeddings: Tensor  # [B, L, D] fp32, zero padding
    seq_lens: Tensor  # [B] int64
    prompt_lens: Tensor  # [B] int64 (0 when not fine-tuning)
    roles: Optional[Tensor] = None  # [B, L] int8 (0: sentence or padding), None when no document has roles

    @property
    def num_concepts(self) -> int:
        return int(self.seq_lens.sum())


def _embeddings_of(column: pa.ChunkedArray, dim: int, where: str) -> tuple[np.ndarray, np.ndarray]:
    """(offsets [rows + 1], values [total, dim] fp32) of a list-of-vectors column."""
    col = column.combine_chunks()
    if not pa.types.is_list(col.type) and not pa.types.is_large_list(col.type):
        raise DataError(f"{where}: column '{EMBEDDINGS}' must be a list of vectors, got {col.type}")
    offsets = col.offsets.to_numpy()
    inner = col.values
    if pa.types.is_fixed_size_list(inner.type):
        if inner.type.list_size != dim:
            raise DataError(f"{where}: embeddings have dim {inner.type.list_size}, expected {dim}")
        flat = inner.flatten()
    elif pa.types.is_list(inner.type) or pa.types.is_large_list(inner.type):
        sizes = np.diff(inner.offsets.to_numpy())
        if (sizes != dim).any():
            k = int(np.nonzero(sizes != dim)[0][0])
            row = int(np.searchsorted(offsets, k, side="right") - 1)
            raise DataError(f"{where} row {row}: an embedding has dim {int(sizes[k])}, expected {dim}")
        flat = inner.flatten()
    else:
        raise DataError(f"{where}: column '{EMBEDDINGS}' must hold vectors (lists of floats), got {inner.type}")
    if not pa.types.is_floating(flat.type):
        raise DataError(f"{where}: embeddings must be floating point, got {flat.type}")
    values = flat.to_numpy(zero_copy_only=False).astype(np.float32).reshape(-1, dim)
    return offsets, values


def embedding_dim(path: str | Path) -> int:
    """The dimension of the sentence embeddings in a parquet file (from its schema, else its first vector).

    Raises:
        DataError: unreadable file, no ``embeddings`` column, no embedding at all.
    """
    try:
        pf = pq.ParquetFile(path, memory_map=True)
    except (OSError, pa.ArrowException) as e:
        raise DataError(f"{path}: not a readable parquet file ({e})") from e
    if EMBEDDINGS not in pf.schema_arrow.names:
        raise DataError(f"{path}: missing column '{EMBEDDINGS}' (columns: {pf.schema_arrow.names})")
    kind = pf.schema_arrow.field(EMBEDDINGS).type
    if (pa.types.is_list(kind) or pa.types.is_large_list(kind)) and pa.types.is_fixed_size_list(kind.value_type):
        return kind.value_type.list_size
    for group in range(pf.metadata.num_row_groups):
        vectors = pf.read_row_group(group, columns=[EMBEDDINGS]).column(EMBEDDINGS).combine_chunks().values
        if len(vectors):
            return len(vectors[0])
    raise DataError(f"{path}: no sentence embeddings to take the dimension from")


def read_documents(path: str | Path, dim: int) -> Iterator[tuple[int, Document]]:
    """Yields (row, document) of one parquet file, one row group at a time.

    Raises:
        DataError: unreadable file, missing column, wrong dim, NaN/inf, empty document, bad prompt_len.
    """
    path = Path(path)
    try:
        pf = pq.ParquetFile(path, memory_map=True)
    except (OSError, pa.ArrowException) as e:
        raise DataError(f"{path}: not a readable parquet file ({e})") from e
    names = pf.schema_arrow.names
    if EMBEDDINGS not in names:
        raise DataError(f"{path}: missing column '{EMBEDDINGS}' (columns: {names})")
    columns = [EMBEDDINGS] + [c for c in (PROMPT_LEN, ROLES) if c in names]
    first_row = 0
    for group in range(pf.metadata.num_row_groups):
        try:
            table = pf.read_row_group(group, columns=columns)
        except (OSError, pa.ArrowException) as e:
            raise DataError(f"{path}: row group {group} is corrupt ({e})") from e
        offsets, values = _embeddings_of(table.column(EMBEDDINGS), dim, str(path))
        prompt = table.column(PROMPT_LEN).to_numpy(zero_copy_only=False) if PROMPT_LEN in columns else None
        roles = table.column(ROLES).to_pylist() if ROLES in columns else None
        for i in range(table.num_rows):
            row = first_row + i
            emb = values[offsets[i] : offsets[i + 1]]
            if emb.shape[0] == 0:
                raise DataError(f"{path} row {row}: empty document (no sentence embeddings)")
            if not np.isfinite(emb).all():
                bad = int(np.nonzero(~np.isfinite(emb).all(axis=1))[0][0])
                raise DataError(f"{path} row {row}: NaN or inf in sentence {bad}")
            p = int(prompt[i]) if prompt is not None else 0
            if not 0 <= p < emb.shape[0]:
                raise DataError(f"{path} row {row}: prompt_len {p} must be in [0, {emb.shape[0]}) (the answer needs a sentence)")
            r = None
            if roles is not None:
                r = torch.tensor(roles[i] or [], dtype=torch.int8)
                if r.numel() != emb.shape[0] or not ((r >= 0) & (r <= 2)).all():
                    raise DataError(f"{path} row {row}: roles must give one of 0 (sentence), 1 (break), 2 (plan) per "
                                    f"embedding: {r.numel()} roles for {emb.shape[0]} embeddings")
            yield row, Document(torch.from_numpy(emb.copy()), p, r)
        first_row += table.num_rows


def sample_embeddings(mix: Sequence[tuple[str, float]], dim: int, size: int, seed: int = 0) -> Tensor:
    """[<= size, dim] sentence embeddings sampled from a weighted mix of parquet files: each file
    contributes in proportion to its weight, uniformly over its sentences (reservoir sampling)."""
    total = sum(weight for _, weight in mix)
    if total <= 0 or any(weight < 0 for _, weight in mix):
        raise ValueError("the dataset mix needs non-negative weights with a positive sum")
    rng = torch.Generator().manual_seed(seed)
    parts = []
    for file, weight in mix:
        want = round(size * weight / total)
        reservoir, filled, seen = torch.empty(want, dim), 0, 0
        for _, doc in read_documents(file, dim):
            emb = doc.embeddings
            take = min(want - filled, emb.shape[0])
            reservoir[filled : filled + take] = emb[:take]
            filled += take
            # algorithm R for the rest: sentence number k (1-based) replaces slot j < want, j ~ U[0, k)
            k = seen + take + 1 + torch.arange(emb.shape[0] - take)
            slots = (torch.rand(len(k), generator=rng) * k).long()
            for i in (slots < want).nonzero().flatten().tolist():
                reservoir[slots[i]] = emb[take + i]
            seen += emb.shape[0]
        parts.append(reservoir[:filled])
    return torch.cat(parts)


def embeddings_column(docs: Sequence[Tensor], dim: Optional[int] = None) -> pa.ListArray:
    """The ``embeddings`` column of documents ([L_i, D] tensors, L_i may be 0): lists of fp16 vectors. ``dim``: D,
    needed only when there are no documents."""
    dim = docs[0].shape[1] if docs else dim
    flat = [d.to(torch.float16).reshape(-1).numpy() for d in docs]
    values = pa.array(np.concatenate(flat) if flat else np.zeros(0, np.float16))
    offsets = pa.array(np.concatenate([[0], np.cumsum([d.shape[0] for d in docs])]).astype(np.int32))
    return pa.ListArray.from_arrays(offsets, pa.FixedSizeListArray.from_arrays(values, dim))


def write_documents(path: str | Path, docs: Sequence[Tensor], *, prompt_lens: Optional[Sequence[int]] = None,
                    sentences: Optional[Sequence[Sequence[str]]] = None, roles: Optional[Sequence[Tensor]] = None,
                    row_group_size: int = 1024) -> None:
    """Writes documents ([L_i, D] tensors) as fp16 vectors in the layout :func:`read_documents` reads,
    with their ``sentences`` (texts, L_i per document) and ``roles`` ([L_i] int8) when given."""
    columns = {EMBEDDINGS: embeddings_column(docs)}
    if prompt_lens is not None:
        columns[PROMPT_LEN] = pa.array(list(prompt_lens), type=pa.int32())
    if roles is not None:
        if [r.numel() for r in roles] != [d.shape[0] for d in docs]:
            raise ValueError("write_documents: roles must have one role per embedding of each document")
        columns[ROLES] = pa.array([r.tolist() for r in roles], type=pa.list_(pa.int8()))
    if sentences is not None:
        if [len(s) for s in sentences] != [d.shape[0] for d in docs]:
            raise ValueError("write_documents: sentences must have one text per embedding of each document")
        columns["sentences"] = pa.array([list(s) for s in sentences], type=pa.list_(pa.string()))
    pq.write_table(pa.table(columns), path, row_group_size=row_group_size)


@dataclass
class DataConfig:
    files: Sequence[str]
    dim: int = 1024
    max_sentences: int = 128
    """Longer documents are wrapped into chunks of at most this many sentences."""
    max_concepts: int = 7168
    """Padded budget per batch: batch_size * longest document <= max_concepts."""
    shuffle_buffer: int = 1024
    eot: Optional[Tensor] = None
    """[D] end-of-text embedding appended to every document (paper: "End of text.")."""
    seed: int = 0


def _documents(config: DataConfig) -> Iterator[Document]:
    for file in config.files:
        for _, doc in read_documents(file, config.dim):
            emb, roles = doc.embeddings, doc.roles
            if config.eot is not None:
                emb = torch.cat((emb, config.eot.float()[None]))
                roles = None if roles is None else torch.cat((roles, roles.new_zeros(1)))
            for start in range(0, emb.shape[0], config.max_sentences):
                end = start + config.max_sentences
                # the prompt stays on the first chunk only (it is the prompt of that chunk's answer)
                yield Document(emb[start:end], max(0, doc.prompt_len - start), None if roles is None else roles[start:end])


def _shuffled(docs: Iterator[Document], size: int, rng: random.Random) -> Iterator[Document]:
    buffer: list[Document] = []
    for doc in docs:
        buffer.append(doc)
        if len(buffer) >= size:
            yield buffer.pop(rng.randrange(len(buffer)))
    rng.shuffle(buffer)
    yield from buffer


def collate(docs: Sequence[Document]) -> Batch:
    lens = torch.tensor([d.embeddings.shape[0] for d in docs])
    out = torch.zeros(len(docs), int(lens.max()), docs[0].embeddings.shape[1])
    roles = None
    if any(d.roles is not None for d in docs):
        roles = torch.zeros(out.shape[:2], dtype=torch.int8)
    for i, d in enumerate(docs):
        out[i, : d.embeddings.shape[0]] = d.embeddings
        if roles is not None and d.roles is not None:
            roles[i, : d.roles.numel()] = d.roles
    return Batch(out, lens, torch.tensor([d.prompt_len for d in docs]), roles)


def batches(config: DataConfig, epoch: int = 0) -> Iterator[Batch]:
    """The deterministic batch stream of one epoch (seeded by ``config.seed`` and ``epoch``)."""
    if config.max_sentences > config.max_concepts:
        raise ValueError(f"max_sentences ({config.max_sentences}) exceeds the batch budget max_concepts ({config.max_concepts})")
    rng = random.Random(config.seed * 1_000_003 + epoch)
    pending: list[Document] = []
    for doc in _shuffled(_documents(config), config.shuffle_buffer, rng):
        longest = max([doc.embeddings.shape[0]] + [d.embeddings.shape[0] for d in pending])
        if pending and (len(pending) + 1) * longest > config.max_concepts:
            yield collate(pending)
            pending = []
        pending.append(doc)
    if pending:
        yield collate(pending)
