"""``RetrievalDecoder``: embeddings back to text by nearest-neighbour search over a sentence bank.

No packaged sentence decoder exists offline (no SONAR weights, no inverters), so the default decoder
returns the bank sentence whose embedding has the highest cosine similarity with the query, and that
similarity, so that users see when a generated concept wanders away from anything in the bank. The
index is faiss inner product over L2-normalised vectors: exact (``flat``) for small banks, HNSW for
large ones, or IVF (``ivf``: inverted lists over k-means cells, the lighter index for banks of
millions: no graph to build or store, recall set by ``nprobe``); without faiss an exact torch matmul
does the same search.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Optional, Sequence

import torch
from safetensors.torch import load_file
from torch import Tensor

from ..io.native import save_safetensors

INDEXES = ("auto", "flat", "hnsw", "ivf", "torch")
#: ``auto`` switches from the exact index to HNSW above this many sentences
HNSW_FROM = 200_000
#: IVF cells probed per query by default (of ~4 sqrt(N) cells)
IVF_NPROBE = 16
FORMAT_VERSION = 1


def _normalized(x: Tensor) -> Tensor:
    return torch.nn.functional.normalize(x.float(), dim=-1)


class RetrievalDecoder:
    """sentences: the bank (N strings); embeddings: [N, d] their embeddings (any scale: compared by cosine).

    index: ``auto`` (faiss flat, HNSW from ``HNSW_FROM`` sentences; torch without faiss), ``flat``,
    ``hnsw``, ``ivf`` (``nprobe`` cells searched per query) or ``torch`` (exact, no faiss).
    """

    def __init__(self, sentences: Sequence[str], embeddings: Tensor, index: str = "auto",
                 nprobe: int = IVF_NPROBE) -> None:
        if index not in INDEXES:
            raise ValueError(f"unknown retrieval index {index!r}; expected one of {INDEXES}")
        embeddings = torch.as_tensor(embeddings)
        if embeddings.dim() != 2 or embeddings.shape[0] != len(sentences):
            raise ValueError(f"the sentence bank has {len(sentences)} sentences but embeddings of shape "
                             f"{tuple(embeddings.shape)}; expected [{len(sentences)}, d]")
        if len(sentences) == 0:
            raise ValueError("the sentence bank is empty")
        if not torch.isfinite(embeddings).all():
            raise ValueError("the sentence bank's embeddings contain NaN or Inf")
        self.sentences = list(sentences)
        self.embeddings = embeddings.float().cpu()
        self.dim = int(embeddings.shape[1])
        self.index_kind, self.nprobe = index, nprobe
        self._bank = _normalized(self.embeddings)
        self._faiss = self._build(index)

    def _build(self, index: str):
        if index == "torch":
            return None
        try:
            import faiss
        except ImportError:
            if index != "auto":
                raise ImportError(f"the {index!r} retrieval index needs faiss: pip install faiss-cpu") from None
            return None
        if index == "hnsw" or (index == "auto" and len(self.sentences) >= HNSW_FROM):
            built = faiss.IndexHNSWFlat(self.dim, 32, faiss.METRIC_INNER_PRODUCT)
        elif index == "ivf":
            # ~4 sqrt(N) cells, with the >= 39 training points per centroid faiss's k-means asks for
            cells = max(1, min(int(4 * len(self.sentences) ** 0.5), len(self.sentences) // 39))
            self._quantizer = faiss.IndexFlatIP(self.dim)  # owned here: the IVF index only points to it
            built = faiss.IndexIVFFlat(self._quantizer, self.dim, cells, faiss.METRIC_INNER_PRODUCT)
            built.train(self._bank.numpy())
            built.nprobe = min(self.nprobe, cells)
        else:
            built = faiss.IndexFlatIP(self.dim)
        built.add(self._bank.numpy())
        return built

    def search(self, x: Tensor, k: int = 1) -> tuple[Tensor, Tensor]:
        """(cosine similarities [N, k], bank indices [N, k] int64) of the k nearest bank sentences to x [N, d]."""
        x = torch.as_tensor(x)
        if x.dim() != 2 or x.shape[1] != self.dim:
            raise ValueError(f"the sentence bank has {self.dim}-d embeddings but the queries have shape "
                             f"{tuple(x.shape)}: decode with the encoder that built the bank")
        if not torch.isfinite(x).all():
            raise ValueError("cannot decode NaN/Inf embeddings")
        q = _normalized(x.detach().cpu())
        k = min(k, len(self.sentences))
        if self._faiss is None:
            return (q @ self._bank.T).topk(k, dim=1)
        scores, idx = self._faiss.search(q.numpy(), k)
        return torch.from_numpy(scores), torch.from_numpy(idx).long()

    def decode_with_scores(self, x: Tensor) -> list[tuple[str, float]]:
        """(nearest bank sentence, its cosine similarity) for every row of x [N, d]."""
        scores, idx = self.search(x, 1)
        return [(self.sentences[int(i)], float(s)) for s, i in zip(scores[:, 0], idx[:, 0])]

    def decode(self, x: Tensor) -> list[str]:
        """The nearest bank sentence for every row of x [N, d]."""
        return [text for text, _ in self.decode_with_scores(x)]

    def save(self, directory: str | Path) -> Path:
        """Writes ``bank.json`` (sentences, format) and ``bank.safetensors`` (embeddings, fp16)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        save_safetensors({"embeddings": self.embeddings.half().contiguous()}, directory / "bank.safetensors")
        meta = {"format_version": FORMAT_VERSION, "dim": self.dim, "sentences": self.sentences}
        (directory / "bank.json").write_text(json.dumps(meta, ensure_ascii=False) + "\n")
        return directory

    @classmethod
    def load(cls, directory: str | Path, index: str = "auto", nprobe: int = IVF_NPROBE) -> "RetrievalDecoder":
        directory = Path(directory)
        if not (directory / "bank.json").is_file() or not (directory / "bank.safetensors").is_file():
            raise FileNotFoundError(f"{directory} is not a sentence bank (needs bank.json and bank.safetensors)")
        meta = json.loads((directory / "bank.json").read_text())
        if meta.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{directory}: bank format_version {meta.get('format_version')!r} is not supported")
        return cls(meta["sentences"], load_file(str(directory / "bank.safetensors"))["embeddings"].float(), index,
                   nprobe)

    def __len__(self) -> int:
        return len(self.sentences)

    def overlap(self, sentences: Sequence[str]) -> float:
        """The fraction of ``sentences`` that the bank holds verbatim: what retrieval can return as its own
        reference when the bank is scored on them (a leak in l2-r, MI and the generation metrics)."""
        sentences = list(sentences)
        if not sentences:
            return 0.0
        if not hasattr(self, "_set"):
            self._set = set(self.sentences)
        return sum(s in self._set for s in sentences) / len(sentences)


def warn_on_leak(decoder: object, sentences: Sequence[str], what: str) -> float:
    """Warns when ``decoder`` is a sentence bank that holds some of the evaluated ``sentences`` (0.0 for a generating
    decoder) -> the fraction held."""
    share = decoder.overlap(sentences) if isinstance(decoder, RetrievalDecoder) else 0.0
    if share > 0:
        warnings.warn(f"{what}: the sentence bank holds {share:.0%} of the evaluated sentences, so retrieval can "
                      "return a reference itself and l2-r, MI and the generation metrics leak; build the bank from "
                      "other text (lcm-fast prepare on the training split only) or decode with SONAR", stacklevel=2)
    return share


def check_dims(model_dim: int, bank: Optional[RetrievalDecoder]) -> None:
    """A clear error when a model's embedding dim and a bank's differ (different encoders)."""
    if bank is not None and bank.dim != model_dim:
        raise ValueError(f"the model works on {model_dim}-d embeddings but the sentence bank holds {bank.dim}-d ones: "
                         "they come from different encoders")
