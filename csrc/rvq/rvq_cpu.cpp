// CPU implementation of the RVQ ops.
//
// rvq_encode fuses the distance GEMM with the argmin: per codebook, a register tile of 4 residual
// rows x 3 centroids accumulates 12 dot products over d (common/dot_tile.h; 7 loads per 12 FMAs,
// so the loop is FMA-bound), and each finished tile updates the rows' running minimum at once, so
// the [N, K] distance matrix never exists. Rows are cache-blocked (kRowBlock rows of the residual
// stay in L2 while centroid blocks stream through), and when there are fewer row blocks than
// threads the K axis is split too (small batches: one vector per call in LCM inference), with the
// per-split minima merged in split order so ties still go to the lowest index.
//
// From kGemmRows rows on, a stage's distances go through BLAS instead, one cache-sized block of
// kGemmBlock distances at a time, each reduced to the rows' running minimum before the next: a packed
// GEMM then outruns the register tiles (L2-bound: 115-137 vs 156-165 GFLOP/s at 256 rows, bench/RESULTS.md).
//
// With search codebooks (bf16) and from kRvqSearchMinScores scores per stage, the candidate search runs
// instead (csrc/rvq/rvq.h): the bf16 scores come from BLAS (oneDNN: 2-3x the fp32 GEMM rate on CPUs with
// bf16 dot products) in cache-sized blocks, each folded into the rows' shortlists of kRvqCandidates, which
// are re-ranked in fp32 and certified (argmin_candidates).
#include <ATen/Parallel.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/mm.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <optional>
#include <vector>

#include "common/dot_tile.h"
#include "rvq/certify.h"
#include "rvq/rvq_checks.h"

namespace lcm_fast {
namespace {

constexpr int kTileRows = 4;
constexpr int kTileCents = 3;
constexpr int64_t kRowBlock = 64;       // at most this many residual rows kept hot in L2 (256 KB at d = 1024)
constexpr int64_t kCentBlock = 64;      // centroids streamed per pass over the row block
constexpr int64_t kMinSplitCents = 256; // fewer centroids per task than this is not worth a split
constexpr int64_t kGemmRows = 256;      // rows from which BLAS computes the distances
constexpr int64_t kGemmCents = 1024;    // centroids per BLAS block
constexpr int64_t kGemmBlock = 1 << 18; // distances per BLAS block (1 MB): at least kGemmRows rows, more for small K
constexpr int64_t kSearchCents = 8192;   // centroids per bf16 score block
constexpr int64_t kSearchBlock = 1 << 18; // bf16 scores per block (512 KB): rows for small K, from kSearchMinRows
constexpr int64_t kSearchMinRows = 256;   // rows per block at least (fewer slow the bf16 GEMM down)

// The running argmin of rows [r0, r1) over centroids [k0, k1) of one codebook (C [K, d], sq [K]);
// best / best_idx are indexed by row.
void argmin_block(const float* res, int64_t d, int64_t r0, int64_t r1, const float* cb, const float* sq, int64_t k0,
                  int64_t k1, float* best, int32_t* best_idx) {
  constexpr auto& kTiles = DotTiles<kTileRows, kTileCents, float>::kTable;
  float dot[kTileRows * kTileCents];
  for (int64_t kb = k0; kb < k1; kb += kCentBlock) {
    const int64_t kb_end = std::min(k1, kb + kCentBlock);
    for (int64_t r = r0; r < r1; r += kTileRows) {
      const int rows = int(std::min<int64_t>(kTileRows, r1 - r));
      for (int64_t k = kb; k < kb_end; k += kTileCents) {
        const int cents = int(std::min<int64_t>(kTileCents, kb_end - k));
        kTiles[rows - 1][cents - 1](res + r * d, d, cb + k * d, d, d, dot);
        for (int i = 0; i < rows; ++i)
          for (int c = 0; c < cents; ++c) {
            const float dist = sq[k + c] - 2.f * dot[i * cents + c];
            if (dist < best[r + i]) {  // strict: the lowest index wins ties
              best[r + i] = dist;
              best_idx[r + i] = int32_t(k + c);
            }
          }
      }
    }
  }
}

// The same running argmin of rows [r0, r1) over all K centroids of one codebook, through BLAS blocks of distances
// (|C|^2 - 2 r.C, the reference's addmm) of at most kGemmCents centroids, written to `block`.
void argmin_gemm(const at::Tensor& residual, const at::Tensor& cb, const at::Tensor& sq, int64_t r0, int64_t r1,
                 float* block, float* best, int32_t* best_idx) {
  at::AutoDispatchBelowADInplaceOrView no_autograd;  // codebooks that require grad must not make addmm_out refuse
  const int64_t K = cb.size(0), rows = r1 - r0;
  const at::Tensor res = residual.narrow(0, r0, rows);
  for (int64_t k0 = 0; k0 < K; k0 += kGemmCents) {
    const int64_t cents = std::min(kGemmCents, K - k0);
    at::Tensor dist = at::from_blob(block, {rows, cents}, residual.options());
    at::addmm_out(dist, sq.narrow(0, k0, cents), res, cb.narrow(0, k0, cents).t(), /*beta=*/1, /*alpha=*/-2);
    at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const float* row = block + r * cents;
        float b = best[r0 + r];
        int32_t idx = best_idx[r0 + r];
        for (int64_t k = 0; k < cents; ++k)
          if (row[k] < b) {  // strict, in centroid order: the lowest index wins ties
            b = row[k];
            idx = int32_t(k0 + k);
          }
        best[r0 + r] = b;
        best_idx[r0 + r] = idx;
      }
    });
  }
}

// out = bf16(x) (round to nearest) for rows [begin, end) of x [., d], with each row's |x|^2 and |x - out|^2:
// the residual's norm and rounding error, inputs of the shortlist's bound.
void round_rows_bf16(const float* x, int64_t d, int64_t begin, int64_t end, at::BFloat16* out, float* norm2,
                     float* err2) {
  using VecB = at::vec::Vectorized<at::BFloat16>;
  for (int64_t r = begin; r < end; ++r) {
    const float* row = x + r * d;
    at::BFloat16* dst = out + r * d;
    Vec n2(0.f), e2(0.f);
    int64_t i = 0;
    for (; i + VecB::size() <= d; i += VecB::size()) {
      const Vec a = Vec::loadu(row + i), b = Vec::loadu(row + i + Vec::size());
      const VecB rounded = at::vec::convert_from_float<at::BFloat16>(a, b);
      rounded.store(dst + i);
      const auto [ra, rb] = at::vec::convert_to_float<at::BFloat16>(rounded);
      n2 = at::vec::fmadd(b, b, at::vec::fmadd(a, a, n2));
      e2 = at::vec::fmadd(b - rb, b - rb, at::vec::fmadd(a - ra, a - ra, e2));
    }
    float n2_tail = 0.f, e2_tail = 0.f;
    for (; i < d; ++i) {
      dst[i] = at::BFloat16(row[i]);
      const float e = row[i] - float(dst[i]);
      n2_tail += row[i] * row[i];
      e2_tail += e * e;
    }
    norm2[r] = hsum(n2) + n2_tail;
    err2[r] = hsum(e2) + e2_tail;
  }
}

// The kRvqCandidates smallest (score, index) offered so far, ascending. Offers come in increasing index and
// an equal score queues behind, so ties keep the lowest index; a NaN score never enters. max_dot is the
// largest |bf16 dot| scanned (it bounds the rounding of every score, see shortlist_bound).
struct Shortlist {
  float score[kRvqCandidates];
  int32_t idx[kRvqCandidates];
  float max_dot;

  void clear() {
    std::fill(score, score + kRvqCandidates, std::numeric_limits<float>::infinity());
    std::fill(idx, idx + kRvqCandidates, -1);
    max_dot = 0.f;
  }
  void offer(float s, int32_t k) {
    if (!(s < score[kRvqCandidates - 1])) return;
    int i = kRvqCandidates - 1;
    for (; i > 0 && s < score[i - 1]; --i) {
      score[i] = score[i - 1];
      idx[i] = idx[i - 1];
    }
    score[i] = s;
    idx[i] = k;
  }
};

// Offers the scores |C|^2 - 2 dot of `n` centroids (bf16 dots, their squared norms sq) to a row's
// shortlist. A vector of scores is compared with the shortlist's worst at once, so the loop costs a load,
// a convert, an FMA and a compare per vector, plus the offers that get in. Those dominate (90 % of the
// scan at K = 256), so an empty shortlist first takes a cheap bound on its worst score: the largest of
// the lanes' minima, as kLanes >= kRvqCandidates scores are at most that. It keeps out most early offers.
void shortlist_scan(const at::BFloat16* dots, const float* sq, int64_t n, int32_t k0, Shortlist& list) {
  constexpr int64_t kLanes = Vec::size();
  if (kLanes >= kRvqCandidates && n >= kLanes && list.idx[0] < 0) {
    Vec lane_min(std::numeric_limits<float>::infinity());
    for (int64_t k = 0; k + kLanes <= n; k += kLanes) {
      Vec dot;
      at::vec::load_to_float(dots + k, dot);
      lane_min = at::vec::minimum(lane_min, at::vec::fmadd(dot, Vec(-2.f), Vec::loadu(sq + k)));
    }
    const float worst = at::vec::vec_reduce_all<float>([](Vec a, Vec b) { return at::vec::maximum(a, b); }, lane_min);
    if (worst == worst)  // not NaN; every slot, so that insertions shift the bound down the list
      std::fill(list.score, list.score + kRvqCandidates, std::nextafter(worst, std::numeric_limits<float>::infinity()));
  }
  Vec max_dot(list.max_dot);
  int64_t k = 0;
  for (; k + kLanes <= n; k += kLanes) {
    Vec dot;
    at::vec::load_to_float(dots + k, dot);
    max_dot = at::vec::maximum(max_dot, dot.abs());
    const Vec s = at::vec::fmadd(dot, Vec(-2.f), Vec::loadu(sq + k));
    const int below = ~(s < Vec(list.score[kRvqCandidates - 1])).zero_mask() & ((1 << kLanes) - 1);
    if (below == 0) continue;
    float lane[kLanes];
    s.store(lane);
    for (int i = 0; i < kLanes; ++i)
      if (below >> i & 1) list.offer(lane[i], k0 + int32_t(k + i));
  }
  list.max_dot = at::vec::vec_reduce_all<float>([](Vec a, Vec b) { return at::vec::maximum(a, b); }, max_dot);
  for (; k < n; ++k) {
    list.max_dot = std::max(list.max_dot, std::abs(float(dots[k])));  // NaN stays NaN, as in the vector part
    list.offer(sq[k] - 2.f * float(dots[k]), k0 + int32_t(k));
  }
}

// Buffers of the candidate search for a block of `rows` rows: their bf16 residuals [rows, d], |r|^2 and
// |r - bf16(r)|^2, shortlists, and bf16 scores [rows, min(K, kSearchCents)].
struct SearchScratch {
  std::vector<at::BFloat16> residual, scores;
  std::vector<float> norm2, err2;
  std::vector<Shortlist> lists;

  SearchScratch(int64_t rows, int64_t d, int64_t cents)
      : residual(rows * d), scores(rows * cents), norm2(rows), err2(rows), lists(rows) {}
};

// One stage of the candidate search for `rows` residual rows at res_ptr [rows, d]: bf16 scores |C|^2 - 2 r.C
// of blocks of at most kSearchCents centroids (in scratch.scores) fold into the rows' shortlists, then each
// row's code is the fp32 argmin over its shortlist (ties: lowest index). That is the fp32 argmin (up to its
// own rounding) when the shortlist's worst score exceeds the winner's exact score by the score error
// bound: every centroid left out is then farther. A row without that certificate (centroids closer
// together than bf16 resolves, a NaN row) is searched again in fp32. Each row's code goes to code[row * M]
// and is subtracted from its residual at once (the row is in cache).
void argmin_candidates(float* res_ptr, const at::Tensor& cb, const at::Tensor& search_cb, const float* sq, float c_max,
                       int64_t rows, SearchScratch& scratch, int32_t* code, int64_t M) {
  at::AutoDispatchBelowADInplaceOrView no_autograd;
  const int64_t K = cb.size(0), d = cb.size(1);
  at::BFloat16* res_bf16_ptr = scratch.residual.data();
  Shortlist* lists = scratch.lists.data();
  at::BFloat16* block = scratch.scores.data();
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    round_rows_bf16(res_ptr, d, begin, end, res_bf16_ptr, scratch.norm2.data(), scratch.err2.data());
    for (int64_t r = begin; r < end; ++r) lists[r].clear();
  });
  const at::Tensor res_bf16 = at::from_blob(res_bf16_ptr, {rows, d}, search_cb.options());
  for (int64_t k0 = 0; k0 < K; k0 += kSearchCents) {
    const int64_t cents = std::min(kSearchCents, K - k0);
    at::Tensor dots = at::from_blob(block, {rows, cents}, res_bf16.options());
    at::mm_out(dots, res_bf16, search_cb.narrow(0, k0, cents).t());
    at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) shortlist_scan(block + r * cents, sq + k0, cents, int32_t(k0), lists[r]);
    });
  }
  const float* cb_ptr = cb.const_data_ptr<float>();
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      float* row = res_ptr + r * d;
      const Shortlist& list = lists[r];
      const float bound = shortlist_bound(list.max_dot, std::sqrt(scratch.norm2[r]), std::sqrt(scratch.err2[r]), c_max,
                                          d, ScoreArithmetic::kBf16Out);
      const int count = rerank_count(list.score, list.idx, bound);
      float dots[kRvqCandidates];
      const float* cents[kRvqCandidates];
      for (int i = 0; i < kRvqCandidates; ++i)  // slots past `count` recompute a valid row
        cents[i] = cb_ptr + int64_t(std::max(list.idx[i < count ? i : 0], 0)) * d;
      if (count == 1) dot_tile_rows<1, 1, float>(row, d, cents, d, dots);
      else if (count > 1) dot_tile_rows<1, kRvqCandidates, float>(row, d, cents, d, dots);
      float best = std::numeric_limits<float>::infinity();
      int32_t idx = 0;
      for (int i = 0; i < count; ++i) {
        const float dist = sq[list.idx[i]] - 2.f * dots[i];
        if (nearer(dist, list.idx[i], best, idx)) {
          best = dist;
          idx = list.idx[i];
        }
      }
      if (!certified(list.score, best, bound)) {
        if (K <= kSearchCents) {
          // the row's scores are all still in `block`: only centroids that recheck can be nearer
          const at::BFloat16* scores = block + r * K;
          for (int64_t k = 0; k < K; ++k) {
            if (!recheck(sq[k] - 2.f * float(scores[k]), best, bound)) continue;
            float dot;
            dot_tile<1, 1, float>(row, d, cb_ptr + k * d, d, d, &dot);
            const float dist = sq[k] - 2.f * dot;
            if (nearer(dist, int32_t(k), best, idx)) {
              best = dist;
              idx = int32_t(k);
            }
          }
        } else {
          best = std::numeric_limits<float>::infinity();
          idx = 0;
          argmin_block(row, d, 0, 1, cb_ptr, sq, 0, K, &best, &idx);
        }
      }
      code[r * M] = idx;
      at::vec::map2([](Vec a, Vec c) { return a - c; }, row, row, cb_ptr + int64_t(idx) * d, d);
    }
  });
}

// rvq_encode through the candidate search. Blocks of rows go through all M stages before the next block, so
// their residuals stay in cache from one stage's update to the next stage's rounding and re-rank.
void encode_candidates(at::Tensor& residual, const at::Tensor& codebooks, const at::Tensor& search_codebooks,
                       const at::Tensor& sq_norms, int32_t* out) {
  const int64_t N = residual.size(0), M = codebooks.size(0), K = codebooks.size(1), d = codebooks.size(2);
  const int64_t cents = std::min(K, kSearchCents);
  const int64_t rows = std::min(N, std::max(kSearchMinRows, kSearchBlock / cents));
  const float* sqs = sq_norms.const_data_ptr<float>();
  std::vector<float> c_max(M);
  for (int64_t m = 0; m < M; ++m)
    c_max[m] = std::sqrt(*std::max_element(sqs + m * K, sqs + (m + 1) * K)) * (1 + 0x1p-20f);
  SearchScratch scratch(rows, d, cents);
  float* res = residual.data_ptr<float>();
  for (int64_t r0 = 0; r0 < N; r0 += rows)
    for (int64_t m = 0; m < M; ++m)
      argmin_candidates(res + r0 * d, codebooks[m], search_codebooks[m], sqs + m * K, c_max[m], std::min(rows, N - r0),
                        scratch, out + r0 * M + m, M);
}

at::Tensor rvq_encode_cpu(const at::Tensor& x, const at::Tensor& codebooks, const at::Tensor& sq_norms,
                          const std::optional<at::Tensor>& search_codebooks) {
  check_rvq_encode_args(x, codebooks, sq_norms);
  if (search_codebooks) check_search_codebooks(*search_codebooks, codebooks);
  const int64_t N = x.size(0), M = codebooks.size(0), K = codebooks.size(1), d = codebooks.size(2);
  at::Tensor codes = at::empty({N, M}, x.options().dtype(at::kInt));
  if (N == 0) return codes;
  at::Tensor residual = x.contiguous().clone();
  int32_t* out = codes.data_ptr<int32_t>();
  if (search_codebooks && N * K >= kRvqSearchMinScores) {
    encode_candidates(residual, codebooks, *search_codebooks, sq_norms, out);
    return codes;
  }
  float* res = residual.data_ptr<float>();
  const float* cbs = codebooks.const_data_ptr<float>();
  const float* sqs = sq_norms.const_data_ptr<float>();

  // small batches: smaller row blocks first (one per thread), then split K for what is left
  const int64_t threads = at::get_num_threads();
  const int64_t per_thread = (N + threads - 1) / threads;
  const int64_t row_block = std::clamp<int64_t>((per_thread + kTileRows - 1) / kTileRows * kTileRows, kTileRows, kRowBlock);
  const int64_t row_blocks = (N + row_block - 1) / row_block;
  const bool gemm = N >= kGemmRows;
  const int64_t splits =
      gemm ? 1 : std::max<int64_t>(1, std::min((threads + row_blocks - 1) / row_blocks, K / kMinSplitCents));
  const int64_t split_len = (K + splits - 1) / splits;
  std::vector<float> best(splits * N);
  std::vector<int32_t> best_idx(splits * N);
  const int64_t gemm_rows = kGemmBlock / std::min(K, kGemmCents);
  std::vector<float> block(gemm ? kGemmBlock : 0);

  for (int64_t m = 0; m < M; ++m) {
    const float* cb = cbs + m * K * d;
    const float* sq = sqs + m * K;
    std::fill(best.begin(), best.end(), std::numeric_limits<float>::infinity());
    std::fill(best_idx.begin(), best_idx.end(), 0);  // a NaN row keeps index 0 (inputs are checked in Python)
    if (gemm) {
      for (int64_t r0 = 0; r0 < N; r0 += gemm_rows)
        argmin_gemm(residual, codebooks[m], sq_norms[m], r0, std::min(N, r0 + gemm_rows), block.data(), best.data(),
                    best_idx.data());
    } else {
      at::parallel_for(0, row_blocks * splits, 1, [&](int64_t begin, int64_t end) {
        for (int64_t task = begin; task < end; ++task) {
          const int64_t rb = task / splits, s = task % splits;
          const int64_t k0 = s * split_len, k1 = std::min(K, k0 + split_len);
          if (k0 >= k1) continue;
          argmin_block(res, d, rb * row_block, std::min(N, (rb + 1) * row_block), cb, sq, k0, k1,
                       best.data() + s * N, best_idx.data() + s * N);
        }
      });
    }
    // merge the splits in order (ties to the lower index), emit the code, r -= C[m, code]
    at::parallel_for(0, N, 64, [&](int64_t begin, int64_t end) {
      for (int64_t n = begin; n < end; ++n) {
        float b = best[n];
        int32_t idx = best_idx[n];
        for (int64_t s = 1; s < splits; ++s)
          if (best[s * N + n] < b) {
            b = best[s * N + n];
            idx = best_idx[s * N + n];
          }
        out[n * M + m] = idx;
        float* r = res + n * d;
        at::vec::map2([](Vec a, Vec c) { return a - c; }, r, r, cb + int64_t(idx) * d, d);
      }
    });
  }
  return codes;
}

template <typename Code>
void rvq_decode_impl(const Code* codes, const float* cbs, float* out, int64_t N, int64_t M, int64_t K, int64_t d,
                     int64_t prefix) {
  std::atomic<bool> out_of_range{false};
  at::parallel_for(0, N, std::max<int64_t>(1, 16384 / d), [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      float* o = out + n * d;
      for (int64_t j = 0; j < prefix; ++j) {
        const int64_t c = int64_t(codes[n * M + j]);
        if (c < 0 || c >= K) {
          out_of_range = true;
          return;
        }
        const float* row = cbs + (j * K + c) * d;
        if (j == 0) std::copy(row, row + d, o);
        else at::vec::map2([](Vec a, Vec b) { return a + b; }, o, o, row, d);
      }
    }
  });
  TORCH_CHECK(!out_of_range, "rvq_decode: a code is outside [0, K=", K, ")");
}

at::Tensor rvq_decode_cpu(const at::Tensor& codes, const at::Tensor& codebooks, int64_t prefix) {
  const CodeType type = check_rvq_decode_args(codes, codebooks, prefix);
  const int64_t N = codes.size(0), M = codes.size(1), K = codebooks.size(1), d = codebooks.size(2);
  at::Tensor out = at::empty({N, d}, codebooks.options());
  const float* cbs = codebooks.const_data_ptr<float>();
  float* o = out.data_ptr<float>();
  switch (type) {
    case CodeType::kInt16: rvq_decode_impl(codes.const_data_ptr<int16_t>(), cbs, o, N, M, K, d, prefix); break;
    case CodeType::kInt32: rvq_decode_impl(codes.const_data_ptr<int32_t>(), cbs, o, N, M, K, d, prefix); break;
    case CodeType::kInt64: rvq_decode_impl(codes.const_data_ptr<int64_t>(), cbs, o, N, M, K, d, prefix); break;
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(lcm_fast, CPU, m) {
  m.impl("rvq_encode", &rvq_encode_cpu);
  m.impl("rvq_decode", &rvq_decode_cpu);
}

}  // namespace lcm_fast
