// CPU implementation of the attribution finalization (kernel body: finalize_tasks, cpu_kernels.inc).
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>

#include "cpu_paths.h"

namespace instrument {
namespace {
using namespace cpu;

template <typename T>
auto finalize_kernel() {
  INSTRUMENT_PICK_AVX2(T, finalize_tasks<T, Avx2>)
  return &scalar_path::finalize_tasks<T, Scalar<float>>;
}

}  // namespace

// acc: [rows, hidden] float32; inputs, baselines: [rows, hidden]; out: [rows, hidden] float32; all contiguous on
// the CPU.
void finalize_cpu(const at::Tensor& acc, const at::Tensor& inputs, const at::Tensor& baselines, at::Tensor& out) {
  const int64_t hidden = acc.size(-1), rows = hidden == 0 ? 0 : acc.numel() / hidden;
  if (rows == 0 || hidden == 0) return;
  const int64_t grain = std::max<int64_t>(1, kGrain / hidden);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, inputs.scalar_type(), "finalize_cpu", [&] {
    const auto run = finalize_kernel<scalar_t>();
    const float* a = acc.const_data_ptr<float>();
    const scalar_t* x = inputs.const_data_ptr<scalar_t>();
    const scalar_t* base = baselines.const_data_ptr<scalar_t>();
    float* o = out.mutable_data_ptr<float>();
    at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
      run(a, x, base, o, hidden, begin, end);
    });
  });
}

}  // namespace instrument
