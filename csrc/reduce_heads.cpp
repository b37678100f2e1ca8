// CPU implementation of the attention reduction over layers and heads (kernel body: reduce_heads_tasks,
// cpu_kernels.inc).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>

#include <vector>

#include "cpu_paths.h"

namespace instrument {
namespace {
using namespace cpu;

template <typename T>
auto reduce_heads_kernel() {
  INSTRUMENT_PICK_AVX2(T, reduce_heads_tasks<T, Avx2>)
  return &scalar_path::reduce_heads_tasks<T, Scalar<at::opmath_type<T>>>;
}

}  // namespace

// layers: selected layers, each [B, H, T, S] contiguous, one dtype, on the CPU; heads: indices in [0, H) (at least
// one); out: [B, T, S] contiguous in the math type (float32, float64 for float64).
void reduce_heads_cpu(const std::vector<at::Tensor>& layers, const std::vector<int64_t>& heads, bool max,
                      at::Tensor& out) {
  const at::Tensor& first = layers.front();
  const int64_t batch = first.size(0), n_heads = first.size(1), plane = first.size(2) * first.size(3);
  if (batch == 0 || plane == 0) return;
  const int64_t n_pairs = static_cast<int64_t>(layers.size() * heads.size());
  const int64_t tasks = batch * ((plane + kStreamChunk - 1) / kStreamChunk);
  const int64_t grain = std::max<int64_t>(1, kGrain / (n_pairs * kStreamChunk));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, first.scalar_type(), "reduce_heads_cpu", [&] {
    const auto run = reduce_heads_kernel<scalar_t>();
    std::vector<const scalar_t*> pairs;  // layer-major, as the sum runs
    pairs.reserve(n_pairs);
    for (const at::Tensor& layer : layers) {
      for (const int64_t head : heads) pairs.push_back(layer.const_data_ptr<scalar_t>() + head * plane);
    }
    auto* o = out.mutable_data_ptr<at::opmath_type<scalar_t>>();
    at::parallel_for(0, tasks, grain, [&](int64_t begin, int64_t end) {
      run(pairs.data(), n_pairs, o, plane, n_heads * plane, max, begin, end);
    });
  });
}

}  // namespace instrument
