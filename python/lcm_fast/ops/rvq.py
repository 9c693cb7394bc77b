"""``rvq_encode`` / ``rvq_decode``: residual vector quantization (paper section 2.3.5).

Encoding is greedy (beam 1, the paper's setting): step m picks the centroid of codebook m nearest to
the running residual and subtracts it. The kernels fuse the distance GEMM with the argmin, so the
``[N, K]`` distance matrix is never written; a beam > 1 runs the reference beam search (faiss's
``beam_search_encode_step``). Decoding sums the chosen centroids of the first ``k`` codebooks in
codebook order (the coarse-to-fine prefix), which reproduces faiss's decode bit for bit.
Layouts: ``csrc/rvq/rvq.h``.

Candidate search: given ``search_codebooks`` (the codebooks in bf16, :func:`search_codebooks`), each
step ranks all K centroids by a bf16 GEMM (fp32 accumulation) and re-ranks the ``RVQ_CANDIDATES`` best
in fp32; a rigorous bound on the bf16 error certifies the result, and the rare rows it does not
certify are searched again in fp32 (``csrc/rvq/certify.h``). The codes are those of the fp32 search,
so the reference twin is the fp32 search. ``search="auto"`` takes it where bf16 GEMMs outrun fp32 ones:
CPUs with bf16 dot-product instructions (2-3x the fp32 rate) and GPUs with bf16 tensor cores (compute
capability 8.0 on; there cuBLAS computes the scores).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import _ext
from ._dispatch import OpSpec, register

# rows per chunk of the reference's [chunk, K] distance matrix (64 MB at K = 8192 in fp32)
_REF_CHUNK = 2048
RVQ_CANDIDATES = 8  # csrc/rvq/rvq.h kRvqCandidates
RVQ_SEARCH_MIN_SCORES = 1 << 14  # csrc/rvq/rvq.h kRvqSearchMinScores: below this N K the fp32 search runs
SEARCHES = ("auto", "exact", "bf16")


def native_bf16(device: torch.device | str) -> bool:
    """Whether ``device`` computes bf16 GEMMs faster than fp32 ones, where the candidate search pays off:
    a CPU with bf16 dot-product instructions (AVX512-BF16 or AMX) or a GPU with bf16 tensor cores
    (compute capability >= 8.0)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.get_device_capability(device) >= (8, 0)
    return device.type == "cpu" and (torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def bf16_search(search: str, device: torch.device | str) -> bool:
    """Whether ``search`` (``"auto"``, ``"exact"`` or ``"bf16"``) is the candidate search on ``device``:
    ``"bf16"`` always, ``"auto"`` where :func:`native_bf16`."""
    if search not in SEARCHES:
        raise ValueError(f"unknown RVQ search {search!r}; expected one of {SEARCHES}")
    return search == "bf16" or (search == "auto" and native_bf16(device))


def search_codebooks(codebooks: Tensor, search: str = "auto") -> Optional[Tensor]:
    """The ``search_codebooks`` argument of :func:`rvq_encode` for codebooks [M, K, d]: their bf16 copy
    when ``search`` is the candidate search (:func:`bf16_search`), else None (the fp32 search). Make it
    once per codebooks: the copy costs a pass over them."""
    return codebooks.detach().to(torch.bfloat16).contiguous() if bf16_search(search, codebooks.device) else None


def _distances(r: Tensor, cb: Tensor, sq: Tensor) -> Tensor:
    """|C|^2 - 2 r.C for r [n, d], cb [K, d], sq [K] -> [n, K]; |r|^2 is constant per row and left out."""
    return torch.addmm(sq, r, cb.T, beta=1.0, alpha=-2.0)


def rvq_encode_ref(x: Tensor, codebooks: Tensor, codebook_sq_norms: Tensor, beam: int = 1,
                   search_codebooks: Optional[Tensor] = None) -> Tensor:
    """Plain-PyTorch twin (the specification). x: [N, d]; codebooks: [M, K, d]; codebook_sq_norms: [M, K];
    search_codebooks: None or the codebooks in bf16 [M, K, d], which only speed up the kernel (its codes
    are the fp32 search's), so the twin runs the full search either way (greedy only).
    Returns codes [N, M] int32 (the beam's best path for beam > 1). Computed in the codebooks' dtype
    (fp64 codebooks make it the high-precision oracle of the tests)."""
    if beam != 1 and search_codebooks is not None:
        raise ValueError("rvq_encode: the candidate search is greedy (beam 1); pass search_codebooks=None")
    N, d = x.shape
    M, K, _ = codebooks.shape
    codes = torch.empty(N, M, dtype=torch.int32, device=x.device)
    for start in range(0, N, _REF_CHUNK):
        chunk = x[start:start + _REF_CHUNK].to(codebooks.dtype)
        codes[start:start + _REF_CHUNK] = (_greedy if beam == 1 else _beam_search)(chunk, codebooks,
                                                                                   codebook_sq_norms, beam)
    return codes


def _greedy(x: Tensor, codebooks: Tensor, sq: Tensor, beam: int) -> Tensor:
    r = x.clone()
    out = []
    for m in range(codebooks.shape[0]):
        idx = _distances(r, codebooks[m], sq[m]).argmin(1)
        r -= codebooks[m][idx]
        out.append(idx)
    return torch.stack(out, 1).to(torch.int32)


def _beam_search(x: Tensor, codebooks: Tensor, sq: Tensor, beam: int) -> Tensor:
    """Keeps the ``beam`` best partial codes per vector by total squared error (faiss's beam search)."""
    n, d = x.shape
    M, K, _ = codebooks.shape
    r = x[:, None, :]                                    # [n, b, d] residual of each beam entry
    err = (x * x).sum(-1, keepdim=True)                  # [n, b] its squared norm
    codes = torch.zeros(n, 1, 0, dtype=torch.long, device=x.device)
    for m in range(M):
        b = r.shape[1]
        dist = err[..., None] + _distances(r.reshape(-1, d), codebooks[m], sq[m]).view(n, b, K)
        err, flat = dist.view(n, b * K).topk(min(beam, b * K), dim=1, largest=False, sorted=True)
        parent, idx = flat // K, flat % K
        r = r.gather(1, parent[..., None].expand(-1, -1, d)) - codebooks[m][idx]
        codes = torch.cat([codes.gather(1, parent[..., None].expand(-1, -1, m)), idx[..., None]], 2)
    return codes[:, 0].to(torch.int32)


def rvq_decode_ref(codes: Tensor, codebooks: Tensor, k: Optional[int] = None) -> Tensor:
    """Plain-PyTorch twin. codes: [N, >=k] integer; codebooks: [M, K, d] -> [N, d], the sum of
    ``codebooks[j, codes[:, j]]`` for j < k (default M), accumulated in codebook order."""
    k = codebooks.shape[0] if k is None else k
    codes = codes.long()
    K = codebooks.shape[1]
    if codes.numel() and (int(codes[:, :k].min()) < 0 or int(codes[:, :k].max()) >= K):
        raise ValueError(f"rvq_decode: a code is outside [0, K={K})")
    out = codebooks[0][codes[:, 0]].clone()
    for j in range(1, k):
        out += codebooks[j][codes[:, j]]
    return out


def sq_norms(codebooks: Tensor) -> Tensor:
    """[M, K] squared norms of the centroids of codebooks [M, K, d]."""
    return (codebooks * codebooks).sum(-1)


def _encode_reasons(device_type: str, dtype, *, beam: int = 1, **_) -> list[str]:
    return [f"beam={beam} (the kernel is greedy, beam 1)"] if beam != 1 else []


ENCODE_SPEC = register(OpSpec("rvq_encode", dtypes=(torch.float32,), extra=_encode_reasons))
DECODE_SPEC = register(OpSpec("rvq_decode", dtypes=(torch.float32,)))

if _ext.EXT_AVAILABLE:

    @torch.library.register_fake("lcm_fast::rvq_encode")
    def _rvq_encode_fake(x, codebooks, codebook_sq_norms, search_codebooks=None):
        torch._check(x.shape[1] == codebooks.shape[2])
        return x.new_empty((x.shape[0], codebooks.shape[0]), dtype=torch.int32)

    @torch.library.register_fake("lcm_fast::rvq_decode")
    def _rvq_decode_fake(codes, codebooks, k):
        return codebooks.new_empty((codes.shape[0], codebooks.shape[2]))


def rvq_encode(x: Tensor, codebooks: Tensor, codebook_sq_norms: Optional[Tensor] = None, beam: int = 1, *,
               search_codebooks: Optional[Tensor] = None, backend: Optional[str] = None) -> Tensor:
    """Codes [N, M] int32 of x [N, d] (any float dtype; encoded in fp32) against codebooks [M, K, d]
    fp32; codebook_sq_norms [M, K] (computed when None: pass them when encoding repeatedly);
    search_codebooks: None (fp32 search) or :func:`search_codebooks`'s bf16 [M, K, d] (candidate search)."""
    if codebook_sq_norms is None:
        codebook_sq_norms = sq_norms(codebooks)
    x = x.float()
    if ENCODE_SPEC.choose(x.device.type, codebooks.dtype, backend, beam=beam) == "ref":
        return rvq_encode_ref(x, codebooks, codebook_sq_norms, beam, search_codebooks)
    return torch.ops.lcm_fast.rvq_encode(x.contiguous(), codebooks.contiguous(), codebook_sq_norms.contiguous(),
                                         search_codebooks)


def rvq_decode(codes: Tensor, codebooks: Tensor, k: Optional[int] = None, *, backend: Optional[str] = None) -> Tensor:
    """Reconstruction [N, d] fp32 from codes [N, >=k] (int16/int32/int64) and codebooks [M, K, d]
    fp32, using the first k codebooks (default all M): the paper's coarse-to-fine prefix."""
    k = codebooks.shape[0] if k is None else int(k)
    if DECODE_SPEC.choose(codes.device.type, codebooks.dtype, backend) == "ref":
        return rvq_decode_ref(codes, codebooks, k)
    return torch.ops.lcm_fast.rvq_decode(codes.contiguous(), codebooks.contiguous(), k)
