// CUDA kernel of the ALTI family's gains and norms of decomposed vectors; see kernels_cuda.h for the contract.
// One warp per (b, i, j): its lanes walk the hidden units, building the decomposed vector t on the fly, so no
// [queries, keys, hidden] tensor is formed.
#include "cuda_common.cuh"

namespace instrument {
namespace cuda {
namespace {

constexpr int kWarp = 32;
constexpr int kWarpsPerBlock = 8;

template <typename A>
__device__ __forceinline__ A warp_sum(A value) {
#pragma unroll
  for (int offset = kWarp / 2; offset > 0; offset /= 2) value += __shfl_xor_sync(0xffffffffu, value, offset);
  return value;
}

template <typename T>
__device__ __forceinline__ typename Math<T>::type decomposed(const T* __restrict__ attn,
                                                             const T* __restrict__ values,
                                                             const T* __restrict__ residual, int64_t b, int64_t i,
                                                             int64_t j, int64_t d, int64_t row, bool self,
                                                             int64_t heads, int64_t queries, int64_t keys,
                                                             int64_t hidden) {
  using M = Math<T>;
  using A = typename M::type;
  A value = 0;
  for (int64_t h = 0; h < heads; ++h) {
    const A weight = M::load(attn[((b * heads + h) * queries + i) * keys + j]);
    value += weight * M::load(values[((b * heads + h) * keys + j) * hidden + d]);
  }
  if (self) value += M::load(residual[row * hidden + d]);
  return value;
}

template <typename T>
__global__ void alti_norms_kernel(const T* __restrict__ attn, const T* __restrict__ values,
                                  const T* __restrict__ residual, const int64_t* __restrict__ positions,
                                  const typename Math<T>::type* __restrict__ ln_scale,
                                  const typename Math<T>::type* __restrict__ ln_weight, bool center,
                                  const typename Math<T>::type* __restrict__ resultant,
                                  typename Math<T>::type* __restrict__ gain, typename Math<T>::type* __restrict__ norm,
                                  int64_t batch, int64_t heads, int64_t queries, int64_t keys, int64_t hidden) {
  using A = typename Math<T>::type;
  const int64_t item = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarp;
  const int lane = threadIdx.x % kWarp;
  if (item >= batch * queries * keys) return;  // whole warps leave together
  const int64_t row = item / keys, j = item % keys;
  const int64_t b = row / queries, i = row % queries;
  const bool self = positions != nullptr && positions[row] == j;
  bool any = self;
  for (int64_t h = 0; h < heads && !any; ++h) any = Math<T>::load(attn[((b * heads + h) * queries + i) * keys + j]) != A(0);
  if (!any) {  // a key this query does not see (causal or padding mask): t = 0, so gain and norm are 0 (whole warp)
    if (lane == 0) {
      gain[item] = 0;
      norm[item] = 0;
    }
    return;
  }
  A mean = 0;
  if (ln_scale != nullptr && center) {
    A sum = 0;
    for (int64_t d = lane; d < hidden; d += kWarp) {
      sum += decomposed(attn, values, residual, b, i, j, d, row, self, heads, queries, keys, hidden);
    }
    mean = warp_sum(sum) / static_cast<A>(hidden);
  }
  A l1 = 0, l2 = 0;
  const A* y = resultant + row * hidden;
  for (int64_t d = lane; d < hidden; d += kWarp) {
    A value = decomposed(attn, values, residual, b, i, j, d, row, self, heads, queries, keys, hidden);
    if (ln_scale != nullptr) value = (value - mean) * ln_scale[row] * ln_weight[d];
    const A diff = y[d] - value;
    // |y| - |y - t| is sign(y) * t where y and y - t share a sign: no cancellation when t is small.
    if ((y[d] > 0 && diff > 0) || (y[d] < 0 && diff < 0)) {
      l1 += y[d] > 0 ? value : -value;
    } else {
      l1 += (y[d] < 0 ? -y[d] : y[d]) - (diff < 0 ? -diff : diff);
    }
    l2 += value * value;
  }
  l1 = warp_sum(l1);
  l2 = warp_sum(l2);
  if (lane == 0) {
    gain[item] = l1;
    norm[item] = sqrt(l2);
  }
}

template <typename T>
cudaError_t launch(const void* attn, const void* values, const void* residual, const int64_t* positions,
                   const void* ln_scale, const void* ln_weight, bool center, const void* resultant, void* gain,
                   void* norm, int64_t batch, int64_t heads, int64_t queries, int64_t keys, int64_t hidden,
                   cudaStream_t stream) {
  using A = typename Math<T>::type;
  const int64_t items = batch * queries * keys;
  if (items == 0) return cudaSuccess;
  const int64_t blocks = (items + kWarpsPerBlock - 1) / kWarpsPerBlock;
  if (blocks > 2147483647LL) return cudaErrorInvalidConfiguration;
  alti_norms_kernel<T><<<static_cast<unsigned>(blocks), kWarp * kWarpsPerBlock, 0, stream>>>(
      static_cast<const T*>(attn), static_cast<const T*>(values), static_cast<const T*>(residual), positions,
      static_cast<const A*>(ln_scale), static_cast<const A*>(ln_weight), center, static_cast<const A*>(resultant),
      static_cast<A*>(gain), static_cast<A*>(norm), batch, heads, queries, keys, hidden);
  return cudaGetLastError();
}

}  // namespace
}  // namespace cuda

const char* alti_norms_cuda(Dtype dtype, const void* attn, const void* values, const void* residual,
                            const int64_t* positions, const void* ln_scale, const void* ln_weight, bool center,
                            const void* resultant, void* gain, void* norm, int64_t batch, int64_t heads,
                            int64_t queries, int64_t keys, int64_t hidden, void* stream) {
  using namespace cuda;
  const auto s = static_cast<cudaStream_t>(stream);
#define INSTRUMENT_ALTI_LAUNCH(T)                                                                                   \
  error_string(launch<T>(attn, values, residual, positions, ln_scale, ln_weight, center, resultant, gain, norm, \
                         batch, heads, queries, keys, hidden, s))
  switch (dtype) {
    case Dtype::Float32: return INSTRUMENT_ALTI_LAUNCH(float);
    case Dtype::Float16: return INSTRUMENT_ALTI_LAUNCH(__half);
    case Dtype::BFloat16: return INSTRUMENT_ALTI_LAUNCH(__nv_bfloat16);
    case Dtype::Float64: return INSTRUMENT_ALTI_LAUNCH(double);
  }
#undef INSTRUMENT_ALTI_LAUNCH
  return "alti_norms_cuda: unsupported dtype";
}

}  // namespace instrument
