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

// Reduce::None: out = acc * (inputs - baselines), a thread per pack, coalesced.
template <typename T, int VEC>
__global__ void finalize_none_kernel(const float* __restrict__ acc, const T* __restrict__ inputs,
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

// Whether (value, index) comes before (best, best_index) for AbsMax: a NaN first, then the larger magnitude,
// then the smaller index; best_index < 0 means none yet.
__device__ __forceinline__ bool absmax_before(float value, int64_t index, float best, int64_t best_index) {
  if (index < 0) return false;
  if (best_index < 0) return true;
  const bool nan = value != value, best_nan = best != best;
  if (nan != best_nan) return nan;
  if (!nan) {
    const float magnitude = fabsf(value), best_magnitude = fabsf(best);
    if (magnitude != best_magnitude) return magnitude > best_magnitude;
  }
  return index < best_index;
}

// The reductions over the hidden dimension: a warp per row, each lane striding over packs of the row. Sum, mean
// and L2 accumulate in double (rounded once at the end, so the order of the sum does not show); AbsMax keeps the
// first element of the largest magnitude.
template <typename T, int VEC>
__global__ void finalize_reduce_kernel(const float* __restrict__ acc, const T* __restrict__ inputs,
                                       const T* __restrict__ baselines, float* __restrict__ out, int64_t rows,
                                       int64_t hidden, int reduce) {
  using P = Pack<T, VEC>;
  using F = Pack<float, VEC>;
  constexpr unsigned kAll = 0xffffffffu;
  const int lane = threadIdx.x % 32;
  const int64_t warps = blockDim.x / 32;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * warps;
  for (int64_t r = static_cast<int64_t>(blockIdx.x) * warps + threadIdx.x / 32; r < rows; r += stride) {
    const float* a = acc + r * hidden;
    const T* x = inputs + r * hidden;
    const T* base = baselines + r * hidden;
    double total = 0.0;
    float best = 0.0f;
    int64_t best_index = -1;
    for (int64_t start = static_cast<int64_t>(lane) * VEC; start < hidden; start += 32 * VEC) {
      const P xp = *reinterpret_cast<const P*>(x + start);
      const P bp = *reinterpret_cast<const P*>(base + start);
      const F ap = *reinterpret_cast<const F*>(a + start);
#pragma unroll
      for (int i = 0; i < VEC; ++i) {
        const float p = mul(ap.v[i], difference(xp.v[i], bp.v[i]));
        if (reduce == static_cast<int>(Reduce::AbsMax)) {
          if (absmax_before(p, start + i, best, best_index)) {
            best = p;
            best_index = start + i;
          }
        } else if (reduce == static_cast<int>(Reduce::L2)) {
          total = add(total, mul(static_cast<double>(p), static_cast<double>(p)));
        } else {
          total = add(total, static_cast<double>(p));
        }
      }
    }
    if (reduce == static_cast<int>(Reduce::AbsMax)) {
      for (int offset = 16; offset > 0; offset /= 2) {
        const float other = __shfl_down_sync(kAll, best, offset);
        const long long other_index = __shfl_down_sync(kAll, static_cast<long long>(best_index), offset);
        if (absmax_before(other, other_index, best, best_index)) {
          best = other;
          best_index = other_index;
        }
      }
      if (lane == 0) out[r] = best;
    } else {
      for (int offset = 16; offset > 0; offset /= 2) total = add(total, __shfl_down_sync(kAll, total, offset));
      if (lane == 0) {
        double value = total;
        if (reduce == static_cast<int>(Reduce::L2)) value = sqrt(total);  // correctly rounded
        if (reduce == static_cast<int>(Reduce::Mean)) value = div(total, static_cast<double>(hidden));
        out[r] = __double2float_rn(value);
      }
    }
  }
}

template <typename T>
cudaError_t launch(const float* acc, const void* inputs, const void* baselines, float* out, int64_t rows,
                   int64_t hidden, Reduce reduce, cudaStream_t stream) {
  constexpr int kVec = vec_of<T>();
  constexpr int kThreads = 256;
  constexpr int64_t kMaxBlocks = int64_t(1) << 20;
  if (rows == 0 || hidden == 0) return cudaSuccess;
  const T* x = static_cast<const T*>(inputs);
  const T* base = static_cast<const T*>(baselines);
  const bool aligned_all = aligned(inputs, 16) && aligned(baselines, 16) && aligned(acc, sizeof(float) * kVec) &&
                           aligned(out, sizeof(float) * kVec);
  if (reduce == Reduce::None) {
    const int64_t n = rows * hidden;
    const bool vectorized = n % kVec == 0 && aligned_all;
    int64_t blocks = ((vectorized ? n / kVec : n) + kThreads - 1) / kThreads;
    blocks = blocks < kMaxBlocks ? blocks : kMaxBlocks;
    if (vectorized) {
      finalize_none_kernel<T, kVec><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(acc, x, base, out, n);
    } else {
      finalize_none_kernel<T, 1><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(acc, x, base, out, n);
    }
    return cudaGetLastError();
  }
  const bool vectorized = hidden % kVec == 0 && aligned_all;
  int64_t blocks = (rows + kThreads / 32 - 1) / (kThreads / 32);
  blocks = blocks < kMaxBlocks ? blocks : kMaxBlocks;
  const int how = static_cast<int>(reduce);
  if (vectorized) {
    finalize_reduce_kernel<T, kVec><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(acc, x, base, out, rows,
                                                                                           hidden, how);
  } else {
    finalize_reduce_kernel<T, 1><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(acc, x, base, out, rows,
                                                                                       hidden, how);
  }
  return cudaGetLastError();
}

}  // namespace
}  // namespace cuda

const char* finalize_cuda(Dtype dtype, const float* acc, const void* inputs, const void* baselines, float* out,
                          int64_t rows, int64_t hidden, Reduce reduce, void* stream) {
  using namespace cuda;
  const auto s = static_cast<cudaStream_t>(stream);
  switch (dtype) {
    case Dtype::Float32: return error_string(launch<float>(acc, inputs, baselines, out, rows, hidden, reduce, s));
    case Dtype::Float16: return error_string(launch<__half>(acc, inputs, baselines, out, rows, hidden, reduce, s));
    case Dtype::BFloat16:
      return error_string(launch<__nv_bfloat16>(acc, inputs, baselines, out, rows, hidden, reduce, s));
    case Dtype::Float64: return error_string(launch<double>(acc, inputs, baselines, out, rows, hidden, reduce, s));
  }
  return "finalize_cuda: unsupported dtype";
}

}  // namespace instrument
