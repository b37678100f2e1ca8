// CUDA kernel of the attention reduction over layers and heads; see kernels_cuda.h for the contract.
#include "cuda_common.cuh"

namespace instrument {
namespace cuda {
namespace {

// (layer, head) planes of one launch, passed by value (2 KiB of kernel parameters).
constexpr int kMaxPairs = 256;
struct Pairs {
  const void* planes[kMaxPairs];
};

// A thread owns one pack of the [T, S] plane of one batch row and runs over the launch's pairs in order:
// `first` starts from the first pair, otherwise from the partial result in `out`; `last` divides a mean by
// `count`. Neighbouring threads read neighbouring packs of the same plane (coalesced).
template <typename T, int VEC>
__global__ void reduce_heads_kernel(Pairs pairs, int n_pairs, typename Math<T>::type* __restrict__ out,
                                    int64_t batch, int64_t plane, int64_t batch_stride, bool max, bool first,
                                    bool last, typename Math<T>::type count) {
  using M = Math<T>;
  using A = typename M::type;
  using P = Pack<T, VEC>;
  using O = Pack<A, VEC>;
  const int64_t pack = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (pack >= plane / VEC) return;
  for (int64_t b = blockIdx.y; b < batch; b += gridDim.y) {
    const int64_t offset = b * batch_stride + pack * VEC;
    O* dst = reinterpret_cast<O*>(out + b * plane + pack * VEC);
    O total;
    int p = 0;
    if (first) {
      const P v = *reinterpret_cast<const P*>(static_cast<const T*>(pairs.planes[0]) + offset);
#pragma unroll
      for (int i = 0; i < VEC; ++i) total.v[i] = M::load(v.v[i]);
      p = 1;
    } else {
      total = *dst;
    }
    for (; p < n_pairs; ++p) {
      const P v = *reinterpret_cast<const P*>(static_cast<const T*>(pairs.planes[p]) + offset);
#pragma unroll
      for (int i = 0; i < VEC; ++i) {
        const A value = M::load(v.v[i]);
        if (max) {
          total.v[i] = (value > total.v[i] || value != value) ? value : total.v[i];
        } else {
          total.v[i] = add(total.v[i], value);
        }
      }
    }
    if (last && !max) {
#pragma unroll
      for (int i = 0; i < VEC; ++i) total.v[i] = div(total.v[i], count);
    }
    *dst = total;
  }
}

template <typename T>
cudaError_t launch(const void* const* planes, int64_t n_pairs, void* out, int64_t batch, int64_t batch_stride,
                   int64_t plane, bool max, cudaStream_t stream) {
  using A = typename Math<T>::type;
  constexpr int kVec = vec_of<T>();
  constexpr int kThreads = 256;
  if (batch == 0 || plane == 0 || n_pairs == 0) return cudaSuccess;
  bool vectorized = plane % kVec == 0 && batch_stride % kVec == 0 && aligned(out, sizeof(A) * kVec);
  for (int64_t p = 0; p < n_pairs && vectorized; ++p) vectorized = aligned(planes[p], 16);
  const int64_t packs = vectorized ? plane / kVec : plane;
  const dim3 grid(static_cast<unsigned>((packs + kThreads - 1) / kThreads),
                  static_cast<unsigned>(batch < 65535 ? batch : 65535));
  A* o = static_cast<A*>(out);
  const A count = static_cast<A>(n_pairs);
  // Launches of at most kMaxPairs pairs, in order, each going on from the partial result of the one before.
  for (int64_t begin = 0; begin < n_pairs; begin += kMaxPairs) {
    const int n = static_cast<int>(n_pairs - begin < kMaxPairs ? n_pairs - begin : kMaxPairs);
    Pairs pairs{};
    for (int p = 0; p < n; ++p) pairs.planes[p] = planes[begin + p];
    const bool first = begin == 0, last = begin + n == n_pairs;
    if (vectorized) {
      reduce_heads_kernel<T, kVec><<<grid, kThreads, 0, stream>>>(pairs, n, o, batch, plane, batch_stride, max, first,
                                                                  last, count);
    } else {
      reduce_heads_kernel<T, 1><<<grid, kThreads, 0, stream>>>(pairs, n, o, batch, plane, batch_stride, max, first,
                                                               last, count);
    }
    const cudaError_t error = cudaGetLastError();
    if (error != cudaSuccess) return error;
  }
  return cudaSuccess;
}

}  // namespace
}  // namespace cuda

const char* reduce_heads_cuda(Dtype dtype, const void* const* planes, int64_t n_pairs, void* out, int64_t batch,
                              int64_t batch_stride, int64_t plane, bool max, void* stream) {
  using namespace cuda;
  const auto s = static_cast<cudaStream_t>(stream);
  switch (dtype) {
    case Dtype::Float32: return error_string(launch<float>(planes, n_pairs, out, batch, batch_stride, plane, max, s));
    case Dtype::Float16: return error_string(launch<__half>(planes, n_pairs, out, batch, batch_stride, plane, max, s));
    case Dtype::BFloat16:
      return error_string(launch<__nv_bfloat16>(planes, n_pairs, out, batch, batch_stride, plane, max, s));
    case Dtype::Float64:
      return error_string(launch<double>(planes, n_pairs, out, batch, batch_stride, plane, max, s));
  }
  return "reduce_heads_cuda: unsupported dtype";
}

}  // namespace instrument
