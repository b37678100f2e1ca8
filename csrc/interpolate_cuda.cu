// CUDA kernel of the integrated-gradients interpolation; see kernels_cuda.h for the contract.
#include "cuda_common.cuh"

namespace instrument {
namespace cuda {
namespace {

// A thread owns one pack of one batch row: it reads inputs and baselines once and writes the pack for the
// alphas [blockIdx.z * k_chunk, +k_chunk). Neighbouring threads touch neighbouring packs (coalesced). With a
// mask, a pack lies within one position (hidden % VEC == 0) and a masked-out position copies the inputs.
template <typename T, int VEC>
__global__ void interpolate_kernel(const T* __restrict__ inputs, const T* __restrict__ baselines,
                                   const typename Math<T>::type* __restrict__ alphas, const bool* __restrict__ mask,
                                   T* __restrict__ out, int64_t batch, int64_t row, int64_t hidden, int64_t k,
                                   int64_t k_chunk) {
  using M = Math<T>;
  using P = Pack<T, VEC>;
  const int64_t pack = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (pack >= row / VEC) return;
  const int64_t k_begin = blockIdx.z * k_chunk;
  const int64_t k_end = k_begin + k_chunk < k ? k_begin + k_chunk : k;
  const int64_t positions = row / hidden;

  for (int64_t b = blockIdx.y; b < batch; b += gridDim.y) {
    const int64_t offset = b * row + pack * VEC;
    const P x = *reinterpret_cast<const P*>(inputs + offset);
    const bool keep = mask == nullptr || mask[b * positions + pack * VEC / hidden];
    if (!keep) {
      for (int64_t j = k_begin; j < k_end; ++j) *reinterpret_cast<P*>(out + j * batch * row + offset) = x;
      continue;
    }
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

template <typename T>
cudaError_t launch(const void* inputs, const void* baselines, const void* alphas, const bool* mask, void* out,
                   int64_t batch, int64_t row, int64_t hidden, int64_t k, cudaStream_t stream) {
  constexpr int kVec = vec_of<T>();
  constexpr int kThreads = 256;
  constexpr int64_t kMinBlocks = 1024;  // enough to fill any current GPU several times over
  if (batch == 0 || row == 0 || k == 0) return cudaSuccess;

  const bool vectorized = row % kVec == 0 && (mask == nullptr || hidden % kVec == 0) && aligned(inputs, 16) &&
                          aligned(baselines, 16) && aligned(out, 16);
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
    interpolate_kernel<T, kVec><<<grid, kThreads, 0, stream>>>(x, base, a, mask, o, batch, row, hidden, k, k_chunk);
  } else {
    interpolate_kernel<T, 1><<<grid, kThreads, 0, stream>>>(x, base, a, mask, o, batch, row, hidden, k, k_chunk);
  }
  return cudaGetLastError();
}

}  // namespace
}  // namespace cuda

const char* interpolate_cuda(Dtype dtype, const void* inputs, const void* baselines, const void* alphas,
                             const bool* mask, void* out, int64_t batch, int64_t row, int64_t hidden, int64_t k,
                             void* stream) {
  using namespace cuda;
  const auto s = static_cast<cudaStream_t>(stream);
  switch (dtype) {
    case Dtype::Float32:
      return error_string(launch<float>(inputs, baselines, alphas, mask, out, batch, row, hidden, k, s));
    case Dtype::Float16:
      return error_string(launch<__half>(inputs, baselines, alphas, mask, out, batch, row, hidden, k, s));
    case Dtype::BFloat16:
      return error_string(launch<__nv_bfloat16>(inputs, baselines, alphas, mask, out, batch, row, hidden, k, s));
    case Dtype::Float64:
      return error_string(launch<double>(inputs, baselines, alphas, mask, out, batch, row, hidden, k, s));
  }
  return "interpolate_cuda: unsupported dtype";
}

}  // namespace instrument
