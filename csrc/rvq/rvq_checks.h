// Argument checks of the RVQ ops, shared by the CPU and CUDA host code (torch headers: never include
// from a .cu file).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include "rvq/rvq.h"

namespace lcm_fast {

inline void check_codebooks(const char* op, const at::Tensor& codebooks, const at::Tensor& ref) {
  TORCH_CHECK(codebooks.dim() == 3 && codebooks.scalar_type() == at::kFloat && codebooks.is_contiguous(),
              op, ": codebooks must be a contiguous float32 [M, K, d] tensor, got ", codebooks.scalar_type(), " ",
              codebooks.sizes());
  TORCH_CHECK(codebooks.size(0) > 0 && codebooks.size(1) > 0 && codebooks.size(2) > 0, op,
              ": codebooks must be non-empty, got ", codebooks.sizes());
  TORCH_CHECK(codebooks.device() == ref.device(), op, ": codebooks on ", codebooks.device(), " but inputs on ",
              ref.device());
}

inline void check_rvq_encode_args(const at::Tensor& x, const at::Tensor& codebooks, const at::Tensor& sq_norms) {
  check_codebooks("rvq_encode", codebooks, x);
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat, "rvq_encode: x must be float32 [N, d], got ",
              x.scalar_type(), " ", x.sizes());
  TORCH_CHECK(x.size(1) == codebooks.size(2), "rvq_encode: x has d=", x.size(1), " but the codebooks have d=",
              codebooks.size(2));
  TORCH_CHECK(codebooks.size(1) <= (int64_t(1) << 31) - 1, "rvq_encode: K must fit int32");
  TORCH_CHECK(sq_norms.dim() == 2 && sq_norms.size(0) == codebooks.size(0) && sq_norms.size(1) == codebooks.size(1) &&
                  sq_norms.scalar_type() == at::kFloat && sq_norms.is_contiguous() && sq_norms.device() == x.device(),
              "rvq_encode: codebook_sq_norms must be a contiguous float32 [M, K] = [", codebooks.size(0), ", ",
              codebooks.size(1), "] tensor on ", x.device(), ", got ", sq_norms.scalar_type(), " ", sq_norms.sizes());
}

inline void check_search_codebooks(const at::Tensor& search, const at::Tensor& codebooks) {
  TORCH_CHECK(search.sizes() == codebooks.sizes() && search.scalar_type() == at::kBFloat16 && search.is_contiguous() &&
                  search.device() == codebooks.device(),
              "rvq_encode: search_codebooks must be the codebooks in contiguous bfloat16 [M, K, d] = ",
              codebooks.sizes(), " on ", codebooks.device(), ", got ", search.scalar_type(), " ", search.sizes(),
              " (lcm_fast.ops.rvq.search_codebooks makes them)");
}

inline CodeType check_rvq_decode_args(const at::Tensor& codes, const at::Tensor& codebooks, int64_t prefix) {
  check_codebooks("rvq_decode", codebooks, codes);
  TORCH_CHECK(codes.dim() == 2 && codes.is_contiguous(), "rvq_decode: codes must be a contiguous [N, M] tensor, got ",
              codes.sizes());
  TORCH_CHECK(prefix >= 1 && prefix <= codebooks.size(0) && codes.size(1) >= prefix, "rvq_decode: k=", prefix,
              " must be in [1, M=", codebooks.size(0), "] and <= codes.size(1)=", codes.size(1));
  switch (codes.scalar_type()) {
    case at::kShort: return CodeType::kInt16;
    case at::kInt: return CodeType::kInt32;
    case at::kLong: return CodeType::kInt64;
    default: TORCH_CHECK(false, "rvq_decode: codes must be int16, int32 or int64, got ", codes.scalar_type());
  }
}

}  // namespace lcm_fast
