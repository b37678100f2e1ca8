// Device helpers shared by the CUDA kernels in csrc/*.cu (no torch headers: they compile with a bare nvcc -c).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "kernels_cuda.h"

namespace instrument {
namespace cuda {

// Conversions between an element type and its math type, rounding to nearest even like torch.
template <typename T>
struct Math;
template <>
struct Math<float> {
  using type = float;
  static __device__ __forceinline__ float load(float x) { return x; }
  static __device__ __forceinline__ float store(float x) { return x; }
};
template <>
struct Math<double> {
  using type = double;
  static __device__ __forceinline__ double load(double x) { return x; }
  static __device__ __forceinline__ double store(double x) { return x; }
};
template <>
struct Math<__half> {
  using type = float;
  static __device__ __forceinline__ float load(__half x) { return __half2float(x); }
  static __device__ __forceinline__ __half store(float x) { return __float2half_rn(x); }
};
template <>
struct Math<__nv_bfloat16> {
  using type = float;
  static __device__ __forceinline__ float load(__nv_bfloat16 x) { return __bfloat162float(x); }
  static __device__ __forceinline__ __nv_bfloat16 store(float x) { return __float2bfloat16_rn(x); }
};

// An element as float32 (float64 rounded to nearest), like tensor.float().
__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(double x) { return __double2float_rn(x); }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

// Explicitly rounded operations: nvcc would otherwise fuse a multiply and an add into an FMA and differ from the
// CPU kernels and the PyTorch fallbacks in the last bit.
__device__ __forceinline__ float add(float x, float y) { return __fadd_rn(x, y); }
__device__ __forceinline__ double add(double x, double y) { return __dadd_rn(x, y); }
__device__ __forceinline__ float sub(float x, float y) { return __fsub_rn(x, y); }
__device__ __forceinline__ double sub(double x, double y) { return __dsub_rn(x, y); }
__device__ __forceinline__ float mul(float x, float y) { return __fmul_rn(x, y); }
__device__ __forceinline__ double mul(double x, double y) { return __dmul_rn(x, y); }
__device__ __forceinline__ float div(float x, float y) { return __fdiv_rn(x, y); }
__device__ __forceinline__ double div(double x, double y) { return __ddiv_rn(x, y); }
__device__ __forceinline__ float lerp(float base, float alpha, float diff) { return add(base, mul(alpha, diff)); }
__device__ __forceinline__ double lerp(double base, double alpha, double diff) { return add(base, mul(alpha, diff)); }

// VEC consecutive elements, moved with one (at most 16-byte) load or store, or two for 32-byte float packs.
template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T v[VEC];
};

// Elements of T per 16-byte load.
template <typename T>
constexpr int vec_of() {
  return static_cast<int>(16 / sizeof(T));
}

inline bool aligned(const void* pointer, int64_t bytes) {
  return reinterpret_cast<uintptr_t>(pointer) % static_cast<uintptr_t>(bytes) == 0;
}

inline const char* error_string(cudaError_t error) {
  return error == cudaSuccess ? nullptr : cudaGetErrorString(error);
}

}  // namespace cuda
}  // namespace instrument
