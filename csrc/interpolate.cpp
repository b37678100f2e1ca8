// CPU implementation of the integrated-gradients interpolation.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>

#include <algorithm>

namespace instrument {
namespace {

// Elements of a batch row converted to the math type at a time; two such buffers stay in L1.
constexpr int64_t kChunk = 1024;
// Output elements below which a task is not worth a thread (ATen's GRAIN_SIZE).
constexpr int64_t kGrain = 32768;

// A task is one chunk of one batch row, written for every alpha, so inputs and baselines are read once.
template <typename T>
void interpolate_kernel(const T* inputs, const T* baselines, const at::opmath_type<T>* alphas, T* out,
                        int64_t batch, int64_t row, int64_t k) {
  using Math = at::opmath_type<T>;
  const int64_t chunks = (row + kChunk - 1) / kChunk;
  const int64_t grain = std::max<int64_t>(1, kGrain / (k * kChunk));
  at::parallel_for(0, batch * chunks, grain, [&](int64_t begin, int64_t end) {
    Math lo[kChunk], diff[kChunk];
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / chunks, start = task % chunks * kChunk;
      const int64_t n = std::min(kChunk, row - start);
      const T* x = inputs + b * row + start;
      const T* base = baselines + b * row + start;
      for (int64_t i = 0; i < n; ++i) {
        lo[i] = static_cast<Math>(base[i]);
        diff[i] = static_cast<Math>(x[i]) - lo[i];
      }
      for (int64_t j = 0; j < k; ++j) {
        const Math alpha = alphas[j];
        T* dst = out + (j * batch + b) * row + start;
        for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<T>(lo[i] + alpha * diff[i]);
      }
    }
  });
}

}  // namespace

void interpolate_cpu(const at::Tensor& inputs, const at::Tensor& baselines, const at::Tensor& alphas,
                     at::Tensor& out) {
  const int64_t batch = inputs.size(0), row = inputs.size(1) * inputs.size(2), k = alphas.numel();
  if (batch == 0 || row == 0 || k == 0) return;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, inputs.scalar_type(), "interpolate_cpu", [&] {
    interpolate_kernel<scalar_t>(inputs.const_data_ptr<scalar_t>(), baselines.const_data_ptr<scalar_t>(),
                                 alphas.const_data_ptr<at::opmath_type<scalar_t>>(),
                                 out.mutable_data_ptr<scalar_t>(), batch, row, k);
  });
}

}  // namespace instrument
