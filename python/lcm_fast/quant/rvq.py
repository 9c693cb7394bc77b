"""``ResidualQuantizer``: M codebooks of K centroids over d-dim vectors (paper section 2.3.5).

Codebooks are a plain ``[M, K, d]`` fp32 tensor, so codebooks from anywhere work with either
encoder: trained here by progressive residual k-means (``backend="torch"``, CPU or GPU), trained by
faiss (``backend="faiss"``: IRVQ, i.e. progressive-dimension clustering, beam 1), imported with
:meth:`ResidualQuantizer.from_faiss` / :meth:`from_codebooks`, or exported with :meth:`to_faiss`.
Encoding and decoding run the fused ``rvq_encode`` / ``rvq_decode`` ops.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
from safetensors.torch import load_file
from torch import Tensor

from ..io.native import save_safetensors
from ..ops.rvq import bf16_search, rvq_decode, rvq_encode, search_codebooks, sq_norms
from .kmeans import prefix_errors, train_residual_kmeans

FORMAT_VERSION = 1
BACKENDS = ("torch", "faiss")
# faiss encodes in chunks: its batch size ignores the [n, K] distance buffer (21 GB at K = 8192)
_FAISS_CHUNK = 16384


def _import_faiss():
    try:
        import faiss
    except ImportError as e:
        raise ImportError("the faiss RVQ backend needs faiss: pip install faiss-cpu (or faiss-gpu)") from e
    return faiss


class ResidualQuantizer:
    """Greedy residual vector quantizer. ``codebooks``: [M, K, d] fp32 (None until trained)."""

    def __init__(self, d: int, n_codebooks: int, codebook_size: int):
        if min(d, n_codebooks, codebook_size) < 1:
            raise ValueError(f"d, n_codebooks and codebook_size must be >= 1, got {d}, {n_codebooks}, {codebook_size}")
        self.d, self.n_codebooks, self.codebook_size = d, n_codebooks, codebook_size
        self.codebooks: Optional[Tensor] = None
        self._sq_norms: Optional[Tensor] = None
        self._bf16: Optional[Tensor] = None  # the codebooks in bf16 for the candidate search, made on first use

    # -- construction -----------------------------------------------------------------------------
    @classmethod
    def from_codebooks(cls, codebooks: Tensor | np.ndarray) -> "ResidualQuantizer":
        """Wraps existing codebooks [M, K, d] (converted to fp32)."""
        cb = torch.as_tensor(codebooks).float().contiguous()
        if cb.dim() != 3:
            raise ValueError(f"codebooks must be [M, K, d], got shape {tuple(cb.shape)}")
        if not torch.isfinite(cb).all():
            raise ValueError("codebooks contain NaN or Inf")
        rq = cls(cb.shape[2], cb.shape[0], cb.shape[1])
        rq._set(cb)
        return rq

    @classmethod
    def from_faiss(cls, faiss_rq: Any) -> "ResidualQuantizer":
        """Imports the codebooks of a trained ``faiss.ResidualQuantizer`` (equal code widths only)."""
        faiss = _import_faiss()
        if not faiss_rq.is_trained:
            raise ValueError("the faiss ResidualQuantizer is not trained")
        nbits = [faiss_rq.nbits.at(i) for i in range(faiss_rq.M)]
        if len(set(nbits)) != 1:
            raise ValueError(f"codebooks of different sizes (nbits {nbits}) are not supported")
        K = 1 << nbits[0]
        return cls.from_codebooks(faiss.vector_to_array(faiss_rq.codebooks).reshape(faiss_rq.M, K, faiss_rq.d))

    def to_faiss(self) -> Any:
        """A trained ``faiss.ResidualQuantizer`` (beam 1) holding these codebooks (K a power of two)."""
        faiss = _import_faiss()
        cb = self._require()
        nbits = int(math.log2(self.codebook_size))
        if 1 << nbits != self.codebook_size:
            raise ValueError(f"faiss needs K = 2^nbits, got K={self.codebook_size}")
        rq = faiss.ResidualQuantizer(self.d, self.n_codebooks, nbits)
        rq.max_beam_size = 1
        faiss.copy_array_to_vector(cb.cpu().numpy().ravel(), rq.codebooks)
        rq.is_trained = True
        return rq

    def _set(self, codebooks: Tensor) -> None:
        self.codebooks = codebooks
        self._sq_norms = sq_norms(codebooks)
        self._bf16 = None

    def _require(self) -> Tensor:
        if self.codebooks is None:
            raise RuntimeError("ResidualQuantizer is not trained: call train(x) or load codebooks first")
        return self.codebooks

    def to(self, device: torch.device | str) -> "ResidualQuantizer":
        """Moves the codebooks (in place) and returns self."""
        self._set(self._require().to(device))
        return self

    @property
    def device(self) -> torch.device:
        return self._require().device

    # -- training ---------------------------------------------------------------------------------
    def train(
        self, data, *, backend: str = "torch", device: Optional[torch.device | str] = None, n_iter: int = 10,
        init: str = "random", max_points_per_centroid: int = 256, seed: int = 1234, search: str = "auto",
        progress: bool = True, verbose: bool = False,
    ) -> "ResidualQuantizer":
        """Trains the codebooks on data [N, d] (tensor, ndarray or memmap) and returns self.

        ``torch``: progressive residual k-means on ``device`` (``n_iter`` Lloyd iterations, ``init``
        ``random`` or ``kmeans++``; assignments by ``search``, as in :meth:`encode`), streamed over data
        that is not a tensor on ``device``. ``faiss``: ``faiss.ResidualQuantizer`` with
        the paper's IRVQ setting (progressive-dimension clustering, beam 1, no codebook tables), on the
        GPU through ``GpuProgressiveDimIndexFactory`` when ``device`` is CUDA and faiss has GPUs.
        """
        if backend not in BACKENDS:
            raise ValueError(f"unknown RVQ training backend {backend!r}; expected one of {BACKENDS}")
        self._check_data(data)
        if backend == "torch":
            codebooks, _ = train_residual_kmeans(
                data, self.n_codebooks, self.codebook_size, n_iter=n_iter, init=init,
                max_points_per_centroid=max_points_per_centroid, device=device, seed=seed, search=search,
                progress=progress)
            self._set(codebooks)
        else:
            self._set(self._train_faiss(data, device, n_iter, max_points_per_centroid, seed, verbose))
        return self

    def _train_faiss(self, data, device, n_iter: int, max_points_per_centroid: int, seed: int, verbose: bool) -> Tensor:
        nbits = int(math.log2(self.codebook_size))
        if 1 << nbits != self.codebook_size:
            raise ValueError(f"the faiss backend needs K = 2^nbits, got K={self.codebook_size}; use backend='torch'")
        if len(data) < self.d:  # faiss fails deep in its PCA otherwise
            raise ValueError(f"the faiss backend's progressive-dim training (a PCA) needs at least d = {self.d} vectors, "
                             f"got {len(data)}: give more data or use backend='torch'")
        faiss = _import_faiss()
        rq = faiss.ResidualQuantizer(self.d, self.n_codebooks, nbits)
        # IRVQ = progressive-dim clustering; the codebook cross-product tables (K^2 M^2 / 2 floats,
        # 541 GB at 64 x 8192) are only needed for beam LUTs, which greedy encoding never uses
        rq.train_type = faiss.ResidualQuantizer.Train_progressive_dim | faiss.ResidualQuantizer.Skip_codebook_tables
        rq.max_beam_size = 1  # used for training *and* encoding (faiss issue #4258)
        rq.cp.niter = n_iter
        rq.cp.max_points_per_centroid = max_points_per_centroid
        rq.cp.seed = seed
        rq.verbose = verbose
        if device is not None and torch.device(device).type == "cuda":
            if not hasattr(faiss, "GpuProgressiveDimIndexFactory") or faiss.get_num_gpus() == 0:
                raise RuntimeError("faiss has no GPU support here: install faiss-gpu, or use backend='torch'")
            rq.assign_index_factory = faiss.GpuProgressiveDimIndexFactory(1)
        x = data.detach().cpu().float().numpy() if isinstance(data, Tensor) else np.asarray(data, dtype=np.float32)
        rq.train(np.ascontiguousarray(x))
        cb = faiss.vector_to_array(rq.codebooks).reshape(self.n_codebooks, self.codebook_size, self.d)
        return torch.from_numpy(cb.copy()).to(device or "cpu")

    # -- encode / decode --------------------------------------------------------------------------
    def _check_data(self, x) -> None:
        shape = tuple(x.shape)
        if len(shape) != 2 or shape[1] != self.d:
            raise ValueError(f"expected vectors of shape [N, {self.d}], got {shape}")
        if shape[0] == 0:
            raise ValueError("no vectors given (N = 0)")

    def encode(self, x: Tensor, beam: int = 1, *, search: str = "auto", backend: Optional[str] = None) -> Tensor:
        """Codes [N, M] int32 of x [N, d] (moved to the codebooks' device). ``beam`` > 1 runs beam search.

        ``search`` (greedy encoding): ``"exact"`` scores every centroid in fp32; ``"bf16"`` ranks them in
        bf16 and re-ranks the best few in fp32, certified (the fp32 search's codes; 1.3-2.5x faster on
        CPUs with bf16 dot products; on GPUs with bf16 tensor cores, cuBLAS scores; :mod:`lcm_fast.ops.rvq`);
        ``"auto"`` takes ``"bf16"`` on such CPUs and GPUs.
        The bf16 copy of the codebooks is made on first use and kept (half their size)."""
        cb = self._require()
        search_cb = None
        if bf16_search(search, cb.device) and beam == 1:
            if self._bf16 is None:
                self._bf16 = search_codebooks(cb, "bf16")
            search_cb = self._bf16
        x = torch.as_tensor(x)
        if x.dim() != 2 or x.shape[1] != self.d:
            raise ValueError(f"encode: expected [N, {self.d}] vectors, got shape {tuple(x.shape)}")
        x = x.to(cb.device, torch.float32)
        if not torch.isfinite(x).all():
            bad = torch.nonzero(~torch.isfinite(x).all(1)).flatten()[:5].tolist()
            raise ValueError(f"encode: NaN/Inf in the input vectors (rows {bad}...)")
        return rvq_encode(x, cb, self._sq_norms, beam, search_codebooks=search_cb, backend=backend)

    def decode(self, codes: Tensor, k: Optional[int] = None, *, backend: Optional[str] = None) -> Tensor:
        """Reconstruction [N, d] fp32 from codes [N, M'] using the first k codebooks (default all)."""
        cb = self._require()
        codes = torch.as_tensor(codes).to(cb.device)
        k = self.n_codebooks if k is None else int(k)
        if codes.dim() != 2 or not 1 <= k <= min(self.n_codebooks, codes.shape[1]):
            raise ValueError(f"decode: codes must be [N, >=k] with 1 <= k <= {self.n_codebooks}, "
                             f"got shape {tuple(codes.shape)} and k={k}")
        # the CPU kernel and the reference check the range themselves; the CUDA gather trusts its codes
        if codes.device.type != "cpu" and codes.numel() and (
                int(codes[:, :k].min()) < 0 or int(codes[:, :k].max()) >= self.codebook_size):
            raise ValueError(f"decode: a code is outside [0, K={self.codebook_size})")
        return rvq_decode(codes, cb, k, backend=backend)

    def prefix_errors(self, data, codes: Optional[Tensor] = None,
                      prefixes: Optional[Sequence[int]] = None) -> dict[int, float]:
        """Relative squared reconstruction error per prefix k of codebooks (default 1, 2, 4, ..., M)."""
        cb = self._require()
        if codes is None:
            codes = self.encode(torch.as_tensor(np.asarray(data) if not isinstance(data, Tensor) else data))
        return prefix_errors(data, codes, cb, prefixes)

    # -- files ------------------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """Writes the codebooks [M, K, d] fp32 and the config to one safetensors file."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = {"format_version": FORMAT_VERSION, "d": self.d, "n_codebooks": self.n_codebooks,
                "codebook_size": self.codebook_size}
        save_safetensors({"codebooks": self._require().detach().cpu().contiguous()}, path,
                         metadata={"lcm_fast_rvq": json.dumps(meta)})
        return path

    @classmethod
    def load(cls, path: str | Path, device: torch.device | str = "cpu") -> "ResidualQuantizer":
        """Reads a file written by :meth:`save`."""
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no RVQ codebooks file at {path}")
        with safe_open(str(path), "pt") as f:
            raw = (f.metadata() or {}).get("lcm_fast_rvq")
        if raw is None:
            raise ValueError(f"{path} is not an lcm_fast RVQ file (no 'lcm_fast_rvq' metadata)")
        meta = json.loads(raw)
        if meta.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{path}: RVQ format_version {meta.get('format_version')!r} is not supported")
        rq = cls.from_codebooks(load_file(str(path))["codebooks"])
        if (rq.d, rq.n_codebooks, rq.codebook_size) != (meta["d"], meta["n_codebooks"], meta["codebook_size"]):
            raise ValueError(f"{path}: codebooks shape does not match its config {meta}")
        return rq.to(device)

    def __repr__(self) -> str:
        state = "untrained" if self.codebooks is None else f"on {self.codebooks.device}"
        return f"ResidualQuantizer(d={self.d}, n_codebooks={self.n_codebooks}, codebook_size={self.codebook_size}, {state})"
