// CPU implementation of the integrated-gradients accumulation (kernel body: accumulate_tasks, cpu_kernels.inc).
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>

#include "cpu_paths.h"

namespace instrument {
namespace {
using namespace cpu;

template <typename T>
auto accumulate_kernel() {
  INSTRUMENT_PICK_AVX2(T, accumulate_tasks<T, Avx2>)
  return &scalar_path::accumulate_tasks<T, Scalar<float>>;
}

}  // namespace

// acc: [n] float32, grads: [k, n], weights: [k] float32; all contiguous on the CPU.
void accumulate_cpu(at::Tensor& acc, const at::Tensor& grads, const at::Tensor& weights) {
  const int64_t n = acc.numel(), k = weights.numel();
  if (n == 0 || k == 0) return;
  const int64_t tasks = (n + kStreamChunk - 1) / kStreamChunk;
  const int64_t grain = std::max<int64_t>(1, kGrain / (k * kStreamChunk));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grads.scalar_type(), "accumulate_cpu", [&] {
    const auto run = accumulate_kernel<scalar_t>();
    float* a = acc.mutable_data_ptr<float>();
    const scalar_t* g = grads.const_data_ptr<scalar_t>();
    const float* w = weights.const_data_ptr<float>();
    at::parallel_for(0, tasks, grain, [&](int64_t begin, int64_t end) { run(a, g, w, k, n, begin, end); });
  });
}

}  // namespace instrument
