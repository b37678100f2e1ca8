// CPU implementation of the integrated-gradients interpolation (kernel body: interpolate_tasks, cpu_kernels.inc).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>

#include "cpu_paths.h"

namespace instrument {
namespace {
using namespace cpu;

constexpr int64_t kStreamBytes = int64_t(64) << 20;

template <typename T>
auto interpolate_kernel() {
  INSTRUMENT_PICK_AVX2(T, interpolate_tasks<T, Avx2>)
  return &scalar_path::interpolate_tasks<T, Scalar<at::opmath_type<T>>>;
}

}  // namespace

void interpolate_cpu(const at::Tensor& inputs, const at::Tensor& baselines, const at::Tensor& alphas,
                     const bool* mask, at::Tensor& out) {
  const int64_t batch = inputs.size(0), hidden = inputs.size(2), row = inputs.size(1) * hidden;
  const int64_t k = alphas.numel();
  if (batch == 0 || row == 0 || k == 0) return;
  const int64_t tasks = batch * ((row + kChunk - 1) / kChunk);
  const int64_t grain = std::max<int64_t>(1, kGrain / (k * kChunk));
  // Outputs well beyond the last-level cache go past it: nothing reads them before they would be evicted.
  const bool streaming = out.nbytes() >= kStreamBytes;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, inputs.scalar_type(), "interpolate_cpu", [&] {
    const auto run = interpolate_kernel<scalar_t>();
    const scalar_t* x = inputs.const_data_ptr<scalar_t>();
    const scalar_t* base = baselines.const_data_ptr<scalar_t>();
    const auto* a = alphas.const_data_ptr<at::opmath_type<scalar_t>>();
    scalar_t* o = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, tasks, grain, [&](int64_t begin, int64_t end) {
      run(x, base, a, mask, o, batch, row, hidden, k, streaming, begin, end);
    });
  });
}

}  // namespace instrument
