// Vector policies of the CPU kernels: `Scalar<M>` (one element, any machine) and `Avx2` (8 floats).
//
// The extension is compiled for the baseline x86-64 ISA, so that it loads on any machine. The AVX2 policy and
// the kernels instantiated with it (csrc/cpu_kernels.inc, included by cpu_paths.h inside a
// `#pragma GCC target("avx2,f16c")` region) carry that target themselves, and `has_avx2()` picks them at run
// time. All headers are included here, before any target region, so that no inline function of torch or the
// standard library is ever compiled for AVX2.
//
// Both policies do the same IEEE operations (no FMA: setup.py passes -ffp-contract=off and no policy uses an
// FMA instruction), so the scalar and the AVX2 kernels give the same results bit for bit.
#pragma once

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#if (defined(__x86_64__) || defined(_M_X64)) && (defined(__GNUC__) || defined(__clang__))
#define INSTRUMENT_X86_SIMD 1
#include <immintrin.h>
#else
#define INSTRUMENT_X86_SIMD 0
#endif

namespace instrument {
namespace cpu {

// Elements of a row handled by one task, buffered in the math type: a few such buffers stay in L1.
constexpr int64_t kChunk = 1024;
// Elements per task of the kernels that stream many rows through one partial result (accumulate, reduce_heads),
// and how many rows they read per pass: 8 concurrent streams, 8 KiB of partial sums in L1.
constexpr int64_t kStreamChunk = 2048;
constexpr int kGroup = 8;
// Element operations below which a task is not worth a thread (ATen's GRAIN_SIZE).
constexpr int64_t kGrain = 32768;

// Whether this machine runs the AVX2 kernels (AVX2 and F16C), checked once.
inline bool avx2_supported() {
#if INSTRUMENT_X86_SIMD
  static const bool yes = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c");
  return yes;
#else
  return false;
#endif
}

// Switch to force the scalar kernels (tests run both paths): instrument._C._set_cpu_simd(False).
inline std::atomic<bool>& avx2_allowed() {
  static std::atomic<bool> allowed{true};
  return allowed;
}

inline bool has_avx2() { return avx2_supported() && avx2_allowed().load(std::memory_order_relaxed); }

// Element types the AVX2 policy loads and stores; float64 always takes the scalar policy.
template <typename T>
constexpr bool kAvx2Type =
    std::is_same<T, float>::value || std::is_same<T, c10::Half>::value || std::is_same<T, c10::BFloat16>::value;

// One element at a time in the math type M (float, or double for float64 tensors). A "mask" is a bool.
template <typename M>
struct Scalar {
  using Math = M;
  using V = M;
  using Mask = bool;
  static constexpr int W = 1;

  template <typename T>
  static inline V load(const T* p) { return static_cast<M>(*p); }
  template <typename T>
  static inline void store(T* p, V v) { *p = static_cast<T>(v); }
  // Non-temporal stores (past the caches) for big outputs: none here.
  template <typename T>
  static inline bool can_stream(const T*) { return false; }
  template <typename T>
  static inline void stream(T* p, V v) { store(p, v); }
  static inline void fence() {}
  static inline V set1(M x) { return x; }
  static inline V add(V a, V b) { return a + b; }
  static inline V sub(V a, V b) { return a - b; }
  static inline V mul(V a, V b) { return a * b; }
  static inline V div(V a, V b) { return a / b; }
  // a where the sign bit of `sign` is set, else b.
  static inline V select_sign(V sign, V a, V b) { return std::signbit(sign) ? a : b; }
  // max(m, v) that propagates NaN, like torch.maximum: v when v > m or v is NaN, else m.
  static inline V max_nan(V m, V v) { return (v > m || v != v) ? v : m; }
  static inline Mask is_nan(V a) { return a != a; }
};

// Elementwise difference a - b of two tensor elements in the math type, rounded to float: for float64 the
// difference is taken in double and rounded once.
template <typename T>
inline float diff_to_float(const T& a, const T& b) {
  return static_cast<float>(a) - static_cast<float>(b);
}
inline float diff_to_float(const double& a, const double& b) { return static_cast<float>(a - b); }

#if INSTRUMENT_X86_SIMD
#pragma GCC push_options
#pragma GCC target("avx2,f16c")

// Eight floats at a time. Half and bfloat16 are converted exactly on load and rounded to nearest even on store
// (bfloat16 NaN becomes 0x7FC0 like c10::BFloat16).
struct Avx2 {
  using Math = float;
  using V = __m256;
  using Mask = __m256;
  static constexpr int W = 8;

  static inline V load(const float* p) { return _mm256_loadu_ps(p); }
  static inline V load(const c10::Half* p) {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  }
  static inline V load(const c10::BFloat16* p) {
    const __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
  }
  static inline __m128i to_half(V v) { return _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
  static inline __m128i to_bfloat16(V v) {
    const __m256i u = _mm256_castps_si256(v);
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    __m256i rounded = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF))), 16);
    rounded = _mm256_blendv_epi8(rounded, _mm256_set1_epi32(0x7FC0), _mm256_castps_si256(is_nan(v)));
    // Pack the 8 low halves (values < 2^16, so unsigned saturation is exact); packus works per 128-bit lane.
    const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(rounded, rounded), 0x08);
    return _mm256_castsi256_si128(packed);
  }
  static inline void store(float* p, V v) { _mm256_storeu_ps(p, v); }
  static inline void store(c10::Half* p, V v) { _mm_storeu_si128(reinterpret_cast<__m128i*>(p), to_half(v)); }
  static inline void store(c10::BFloat16* p, V v) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), to_bfloat16(v));
  }
  // Non-temporal stores of W elements at p, aligned to W * sizeof(T) (can_stream), ordered by fence().
  template <typename T>
  static inline bool can_stream(const T* p) {
    return reinterpret_cast<uintptr_t>(p) % (W * sizeof(T)) == 0;
  }
  static inline void stream(float* p, V v) { _mm256_stream_ps(p, v); }
  static inline void stream(c10::Half* p, V v) { _mm_stream_si128(reinterpret_cast<__m128i*>(p), to_half(v)); }
  static inline void stream(c10::BFloat16* p, V v) {
    _mm_stream_si128(reinterpret_cast<__m128i*>(p), to_bfloat16(v));
  }
  static inline void fence() { _mm_sfence(); }
  static inline V set1(float x) { return _mm256_set1_ps(x); }
  static inline V add(V a, V b) { return _mm256_add_ps(a, b); }
  static inline V sub(V a, V b) { return _mm256_sub_ps(a, b); }
  static inline V mul(V a, V b) { return _mm256_mul_ps(a, b); }
  static inline V div(V a, V b) { return _mm256_div_ps(a, b); }
  static inline V select_sign(V sign, V a, V b) { return _mm256_blendv_ps(b, a, sign); }
  static inline V max_nan(V m, V v) {
    const V take = _mm256_or_ps(_mm256_cmp_ps(v, m, _CMP_GT_OQ), is_nan(v));
    return _mm256_blendv_ps(m, v, take);
  }
  static inline Mask is_nan(V a) { return _mm256_cmp_ps(a, a, _CMP_UNORD_Q); }
};

#pragma GCC pop_options
#endif  // INSTRUMENT_X86_SIMD

}  // namespace cpu
}  // namespace instrument
