// The CPU kernels of csrc/cpu_kernels.inc twice over: `scalar_path` for any machine, `avx2_path` compiled for
// AVX2 + F16C (see cpu_vec.h), and INSTRUMENT_PICK_AVX2, which chooses at run time. Included by each op's .cpp.
#pragma once

#include "cpu_vec.h"

namespace instrument {
namespace cpu {
namespace scalar_path {
#include "cpu_kernels.inc"
}  // namespace scalar_path

#if INSTRUMENT_X86_SIMD
#pragma GCC push_options
#pragma GCC target("avx2,f16c")
namespace avx2_path {
#include "cpu_kernels.inc"
}  // namespace avx2_path
#pragma GCC pop_options
#endif

// Each op's .cpp picks its kernel in a function template, so that the AVX2 instantiation is never formed for a
// type the AVX2 policy does not handle:
//   template <typename T> auto kernel() {
//     if constexpr (kAvx2Type<T>) { if (has_avx2()) return &avx2_path::f<T, Avx2>; }
//     return &scalar_path::f<T, Scalar<float>>;
//   }
#if INSTRUMENT_X86_SIMD
#define INSTRUMENT_PICK_AVX2(T, ...)          \
  if constexpr (kAvx2Type<T>) {               \
    if (has_avx2()) return &avx2_path::__VA_ARGS__; \
  }
#else
#define INSTRUMENT_PICK_AVX2(T, ...)
#endif

}  // namespace cpu
}  // namespace instrument
