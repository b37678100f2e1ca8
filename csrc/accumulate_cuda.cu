// CUDA kernel of the integrated-gradients accumulation; see kernels_cuda.h for the contract.
#include "cuda_common.cuh"

namespace instrument {
namespace cuda {
namespace {

// A thread owns one pack of VEC elements: it streams the k gradient packs (coalesced across the warp, each read
// once), sums w_j * g_j in registers in the order j = 0, 1, ... and adds the sum to the accumulator once.
template <typename T, int VEC>
__global__ void accumulate_kernel(float* __restrict__ acc, const T* __restrict__ grads,
                                  const float* __restrict__ weights, int64_t k, int64_t n) {
  using G = Pack<T, VEC>;
  using A = Pack<float, VEC>;
  const int64_t packs = n / VEC;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t pack = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; pack < packs; pack += stride) {
    const int64_t offset = pack * VEC;
    float sum[VEC];
    {
      const G g = *reinterpret_cast<const G*>(grads + offset);
      const float w = weights[0];
#pragma unroll
      for (int i = 0; i < VEC; ++i) sum[i] = mul(to_float(g.v[i]), w);
    }
#pragma unroll 4
    for (int64_t j = 1; j < k; ++j) {
      const G g = *reinterpret_cast<const G*>(grads + j * n + offset);
      const float w = weights[j];
#pragma unroll
      for (int i = 0; i < VEC; ++i) sum[i] = add(sum[i], mul(to_float(g.v[i]), w));
    }
    A a = *reinterpret_cast<const A*>(acc + offset);
#pragma unroll
    for (int i = 0; i < VEC; ++i) a.v[i] = add(a.v[i], sum[i]);
    *reinterpret_cast<A*>(acc + offset) = a;
  }
}

template <typename T>
cudaError_t launch(float* acc, const void* grads, const float* weights, int64_t k, int64_t n, cudaStream_t stream) {
  constexpr int kVec = vec_of<T>();
  constexpr int kThreads = 256;
  constexpr int64_t kMaxBlocks = int64_t(1) << 20;
  if (n == 0 || k == 0) return cudaSuccess;
  const bool vectorized = n % kVec == 0 && aligned(grads, 16) && aligned(acc, sizeof(float) * kVec);
  const int64_t packs = vectorized ? n / kVec : n;
  int64_t blocks = (packs + kThreads - 1) / kThreads;
  blocks = blocks < kMaxBlocks ? blocks : kMaxBlocks;
  const T* g = static_cast<const T*>(grads);
  if (vectorized) {
    accumulate_kernel<T, kVec><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(acc, g, weights, k, n);
  } else {
    accumulate_kernel<T, 1><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(acc, g, weights, k, n);
  }
  return cudaGetLastError();
}

}  // namespace
}  // namespace cuda

const char* accumulate_cuda(Dtype dtype, float* acc, const void* grads, const float* weights, int64_t k, int64_t n,
                            void* stream) {
  using namespace cuda;
  const auto s = static_cast<cudaStream_t>(stream);
  switch (dtype) {
    case Dtype::Float32: return error_string(launch<float>(acc, grads, weights, k, n, s));
    case Dtype::Float16: return error_string(launch<__half>(acc, grads, weights, k, n, s));
    case Dtype::BFloat16: return error_string(launch<__nv_bfloat16>(acc, grads, weights, k, n, s));
    case Dtype::Float64: return error_string(launch<double>(acc, grads, weights, k, n, s));
  }
  return "accumulate_cuda: unsupported dtype";
}

}  // namespace instrument
