// lcm_fast._C: the pybind11 module. It carries build information and non-op utilities; tensors
// cross into C++ only through the TORCH_LIBRARY ops (registration.cpp), never through pybind11.
#include <ATen/Parallel.h>
#include <pybind11/pybind11.h>

#include "rvq/certify.h"
#ifdef _OPENMP
#include <omp.h>
#endif

namespace py = pybind11;

namespace lcm_fast {

// Instruction-set extensions this translation unit was compiled with (the whole target shares flags).
static py::list simd_extensions() {
  py::list out;
#ifdef __SSE4_2__
  out.append("sse4.2");
#endif
#ifdef __AVX__
  out.append("avx");
#endif
#ifdef __AVX2__
  out.append("avx2");
#endif
#ifdef __FMA__
  out.append("fma");
#endif
#ifdef __F16C__
  out.append("f16c");
#endif
#ifdef __AVX512F__
  out.append("avx512f");
#endif
  return out;
}

static py::dict build_info() {
  py::dict info;
  info["compiler"] = LCM_FAST_COMPILER;
  info["cxx_flags"] = LCM_FAST_CXX_FLAGS;
  info["simd"] = simd_extensions();
#if defined(CPU_CAPABILITY_AVX2)
  info["at_vec_capability"] = "AVX2";
#else
  info["at_vec_capability"] = "DEFAULT";
#endif
#ifdef _OPENMP
  info["openmp"] = _OPENMP;
  info["openmp_max_threads"] = omp_get_max_threads();
#else
  info["openmp"] = py::none();
  info["openmp_max_threads"] = 1;
#endif
  info["aten_num_threads"] = at::get_num_threads();
#ifdef LCM_FAST_WITH_CUDA
  info["with_cuda"] = true;
#else
  info["with_cuda"] = false;
#endif
  info["cuda_archs"] = LCM_FAST_CUDA_ARCHS;
  info["torch_version"] = LCM_FAST_TORCH_VERSION;
  return info;
}

}  // namespace lcm_fast

PYBIND11_MODULE(_C, m) {
  m.doc() = "lcm_fast compiled extension: build information; ops live in torch.ops.lcm_fast";
  m.def("build_info", &lcm_fast::build_info,
        "Compiler, flags, SIMD level, OpenMP threads, CUDA archs and the torch version this was built against.");
  m.def(
      "rvq_shortlist_bound",
      [](float max_dot, float r_norm, float r_err_norm, float c_max, int64_t d, bool tensor_cores) {
        return lcm_fast::shortlist_bound(max_dot, r_norm, r_err_norm, c_max, d,
                                         tensor_cores ? lcm_fast::ScoreArithmetic::kTensorCoreFp32Out
                                                      : lcm_fast::ScoreArithmetic::kBf16Out);
      },
      "The RVQ candidate search's bound on a row's score error (csrc/rvq/certify.h): the CPU's bf16 dots, or "
      "(tensor_cores) the fp32 dots of cuBLAS on tensor cores.",
      py::arg("max_dot"), py::arg("r_norm"), py::arg("r_err_norm"), py::arg("c_max"), py::arg("d"),
      py::arg("tensor_cores"));
}
