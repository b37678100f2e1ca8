// CUDA kernel of the integrated-gradients interpolation; see kernels_cuda.h for the contract.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "kernels_cuda.h"

namespace instrument {
namespace {

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

// Explicitly rounded operations: nvcc would otherwise fuse base + alpha * diff into an FMA and differ from
// the CPU and the PyTorch fallback in the last bit.
__device__ __forceinline__ float sub(float x, float y) { return __fsub_rn(x, y); }
__device__ __forceinline__ double sub(double x, double y) { return __dsub_rn(x, y); }
__device__ __forceinline__ float lerp(float base, float alpha, float diff) {
  return __fadd_rn(base, __fmul_rn(alpha, diff));
}
__device__ __forceinline__ double lerp(double base, double alpha, double diff) {
  return __dadd_rn(base, __dmul_rn(alpha, diff));
}

// VEC consecutive elements, moved with one 16-byte (or narrower) load or store.
template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T v[VEC];
};

// A thread owns one pack of one batch row: it reads inputs and baselines once and writes the pack for the
// alphas [blockIdx.z * k_chunk, +k_chunk). Neighbouring threads touch neighbouring packs (coalesced).
template <typename T, int VEC>
__global__ void interpolate_kernel(const T* __restrict__ inputs, const T* __restrict__ baselines,
                                   const typename Math<T>::type* __restrict__ alphas, T* __restrict__ out,
                                   int64_t batch, int64_t row, int64_t k, int64_t k_chunk) {
  using M = Math<T>;
  using P = Pack<T, VEC>;
  const int64_t pack = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (pack >= row / VEC) return;
  const int64_t k_begin = blockIdx.z * k_chunk;
  const int64_t k_end = k_begin + k_chunk < k ? k_begin + k_chunk : k;

  for (int64_t b = blockIdx.y; b < batch; b += gridDim.y) {
    const int64_t offset = b * row + pack * VEC;
    const P x = *reinterpret_cast<const P*>(inputs + offset);
    const P base = *reinterpret_cast<const P*>(baselines + offset);
    typename M::type lo[VEC], diff[VEC];
#pragma unroll
    for (int i = 0; i < VEC; ++i) {
      lo[i] = M::load(base.v[i]);
      diff[i] = sub(M::load(x.v[i]), lo[i]);
    }
    for (int64_t j = k_begin; j < k_end; ++j) {
      const typename M::type alpha = alphas[j];
      P result;
#pragma unroll
      for (int i = 0; i < VEC; ++i) result.v[i] = M::store(lerp(lo[i], alpha, diff[i]));
      *reinterpret_cast<P*>(out + j * batch * row + offset) = result;
    }
  }
}

bool aligned16(const void* pointer) { return reinterpret_cast<uintptr_t>(pointer) % 16 == 0; }

template <typename T>
cudaError_t launch(const void* inputs, const void* baselines, const void* alphas, void* out, int64_t batch,
                   int64_t row, int64_t k, cudaStream_t stream) {
  constexpr int kVec = 16 / sizeof(T);
  constexpr int kThreads = 256;
  constexpr int64_t kMinBlocks = 1024;  // enough to fill any current GPU several times over
  if (batch == 0 || row == 0 || k == 0) return cudaSuccess;

  const bool vectorized = row % kVec == 0 && aligned16(inputs) && aligned16(baselines) && aligned16(out);
  const int64_t packs = vectorized ? row / kVec : row;
  const int64_t blocks_x = (packs + kThreads - 1) / kThreads;
  const int64_t blocks_y = batch < 65535 ? batch : 65535;
  // Split the alphas over grid.z only as far as needed to have enough blocks: each split rereads the inputs.
  int64_t splits = (kMinBlocks + blocks_x * blocks_y - 1) / (blocks_x * blocks_y);
  splits = splits < k ? splits : k;
  const int64_t k_chunk = (k + splits - 1) / splits;
  const dim3 grid(static_cast<unsigned>(blocks_x), static_cast<unsigned>(blocks_y),
                  static_cast<unsigned>((k + k_chunk - 1) / k_chunk));

  using A = typename Math<T>::type;
  const T* x = static_cast<const T*>(inputs);
  const T* base = static_cast<const T*>(baselines);
  const A* a = static_cast<const A*>(alphas);
  T* o = static_cast<T*>(out);
  if (vectorized) {
    interpolate_kernel<T, kVec><<<grid, kThreads, 0, stream>>>(x, base, a, o, batch, row, k, k_chunk);
  } else {
    interpolate_kernel<T, 1><<<grid, kThreads, 0, stream>>>(x, base, a, o, batch, row, k, k_chunk);
  }
  return cudaGetLastError();
}

}  // namespace

const char* interpolate_cuda(Dtype dtype, const void* inputs, const void* baselines, const void* alphas, void* out,
                             int64_t batch, int64_t row, int64_t k, void* stream) {
  const auto s = static_cast<cudaStream_t>(stream);
  cudaError_t error;
  switch (dtype) {
    case Dtype::Float32: error = launch<float>(inputs, baselines, alphas, out, batch, row, k, s); break;
    case Dtype::Float16: error = launch<__half>(inputs, baselines, alphas, out, batch, row, k, s); break;
    case Dtype::BFloat16: error = launch<__nv_bfloat16>(inputs, baselines, alphas, out, batch, row, k, s); break;
    case Dtype::Float64: error = launch<double>(inputs, baselines, alphas, out, batch, row, k, s); break;
    default: return "interpolate_cuda: unsupported dtype";
  }
  return error == cudaSuccess ? nullptr : cudaGetErrorString(error);
}

}  // namespace instrument
