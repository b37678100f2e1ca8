// CUDA kernels of the attribution finalization; see kernels_cuda.h for the contract.
#include "cuda_common.cuh"

namespace instrument {
namespace cuda {
namespace {

// inputs - baselines in the inputs' math type, rounded to float32.
template <typename T>
__device__ __forceinline__ float difference(T x, T base) {
  return sub(to_float(x), to_float(base));
}
__device__ __forceinline__ float difference(double x, double base) { return __double2float_rn(sub(x, base)); }

// out = acc * (inputs - baselines), a thread per pack, coalesced.
template <typename T, int VEC>
__global__ void finalize_kernel(const float* __restrict__ acc, const T* __restrict__ inputs,
                                const T* __restrict__ baselines, float* __restrict__ out, int64_t n) {
  using P = Pack<T, VEC>;
  using F = Pack<float, VEC>;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t pack = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; pack < n / VEC; pack += stride) {
    const int64_t offset = pack * VEC;
    const P x = *reinterpret_cast<const P*>(inputs + offset);
    const P base = *reinterpret_cast<const P*>(baselines + offset);
    F a = *reinterpret_cast<const F*>(acc + offset);
#pragma unroll
    for (int i = 0; i < VEC; ++i) a.v[i] = mul(a.v[i], difference(x.v[i], base.v[i]));
    *reinterpret_cast<F*>(out + offset) = a;
  }
}

template <typename T>
cudaError_t launch(const float* acc, const void* inputs, const void* baselines, float* out, int64_t n,
                   cudaStream_t stream) {
  constexpr int kVec = vec_of<T>();
  constexpr int kThreads = 256;
  constexpr int64_t kMaxBlocks = int64_t(1) << 20;
  if (n == 0) return cudaSuccess;
  const T* x = static_cast<const T*>(inputs);
  const T* base = static_cast<const T*>(baselines);
  const bool vectorized = n % kVec == 0 && aligned(inputs, 16) && aligned(baselines, 16) &&
                          aligned(acc, sizeof(float) * kVec) && aligned(out, sizeof(float) * kVec);
  int64_t blocks = ((vectorized ? n / kVec : n) + kThreads - 1) / kThreads;
  blocks = blocks < kMaxBlocks ? blocks : kMaxBlocks;
  if (vectorized) {
    finalize_kernel<T, kVec><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(acc, x, base, out, n);
  } else {
    finalize_kernel<T, 1><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(acc, x, base, out, n);
  }
  return cudaGetLastError();
}

}  // namespace
}  // namespace cuda

const char* finalize_cuda(Dtype dtype, const float* acc, const void* inputs, const void* baselines, float* out,
                          int64_t n, void* stream) {
  using namespace cuda;
  const auto s = static_cast<cudaStream_t>(stream);
  switch (dtype) {
    case Dtype::Float32: return error_string(launch<float>(acc, inputs, baselines, out, n, s));
    case Dtype::Float16: return error_string(launch<__half>(acc, inputs, baselines, out, n, s));
    case Dtype::BFloat16: return error_string(launch<__nv_bfloat16>(acc, inputs, baselines, out, n, s));
    case Dtype::Float64: return error_string(launch<double>(acc, inputs, baselines, out, n, s));
  }
  return "finalize_cuda: unsupported dtype";
}

}  // namespace instrument
