// CPU kernel of the ALTI family's gains and norms of decomposed vectors (see instrument.kernels.alti_norms).
// Each (b, i, j) builds the decomposed vector t = sum_h attn[b,h,i,j] * values[b,h,j,:] (+ residual[b,i,:] where
// j == positions[b,i]; then (t - mean t) * ln_scale[b,i] * ln_weight with a layer norm) one hidden unit at a time,
// so no [queries, keys, hidden] tensor is ever formed.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace instrument {
namespace {

template <typename T, typename A>
void alti_rows(const T* attn, const T* values, const T* residual, const int64_t* positions, const A* ln_scale,
               const A* ln_weight, bool center, const A* resultant, A* gain, A* norm, int64_t heads,
               int64_t queries, int64_t keys, int64_t hidden, int64_t begin, int64_t end) {
  std::vector<A> weights(heads), t(hidden);
  for (int64_t row = begin; row < end; ++row) {  // row = b * queries + i
    const int64_t b = row / queries, i = row % queries;
    const int64_t pos = positions != nullptr ? positions[row] : -1;
    const A* y = resultant + row * hidden;
    for (int64_t j = 0; j < keys; ++j) {
      bool any = j == pos;
      for (int64_t h = 0; h < heads; ++h) {
        weights[h] = static_cast<A>(attn[((b * heads + h) * queries + i) * keys + j]);
        any = any || weights[h] != A(0);
      }
      if (!any) {  // a key this query does not see (causal or padding mask): t = 0, so gain and norm are 0
        gain[row * keys + j] = 0;
        norm[row * keys + j] = 0;
        continue;
      }
      std::fill(t.begin(), t.end(), A(0));
      for (int64_t h = 0; h < heads; ++h) {  // heads in order, each over contiguous hidden units
        const A w = weights[h];
        const T* v = values + ((b * heads + h) * keys + j) * hidden;
        for (int64_t d = 0; d < hidden; ++d) t[d] += w * static_cast<A>(v[d]);
      }
      if (j == pos) {
        for (int64_t d = 0; d < hidden; ++d) t[d] += static_cast<A>(residual[row * hidden + d]);
      }
      A sum = 0;
      for (int64_t d = 0; d < hidden; ++d) sum += t[d];
      const A mean = center ? sum / static_cast<A>(hidden) : A(0);
      A l1 = 0, l2 = 0;
      for (int64_t d = 0; d < hidden; ++d) {
        A value = t[d];
        if (ln_scale != nullptr) value = (value - mean) * ln_scale[row] * ln_weight[d];
        const A diff = y[d] - value;
        // |y| - |y - t| is sign(y) * t where y and y - t share a sign: no cancellation when t is small.
        if ((y[d] > 0 && diff > 0) || (y[d] < 0 && diff < 0)) {
          l1 += y[d] > 0 ? value : -value;
        } else {
          l1 += std::abs(y[d]) - std::abs(diff);
        }
        l2 += value * value;
      }
      gain[row * keys + j] = l1;
      norm[row * keys + j] = std::sqrt(l2);
    }
  }
}

}  // namespace

// attn [B, H, Q, K], values [B, H, K, D], residual [B, Q, D] (nullable; with positions [B, Q]); ln_scale [B, Q] and
// ln_weight [D] in the math type (nullable); resultant [B, Q, D] in the math type; gain, norm [B, Q, K] in the
// math type. All contiguous on the CPU.
void alti_norms_cpu(const at::Tensor& attn, const at::Tensor& values, const at::Tensor* residual,
                    const int64_t* positions, const at::Tensor* ln_scale, const at::Tensor* ln_weight, bool center,
                    const at::Tensor& resultant, at::Tensor& gain, at::Tensor& norm) {
  const int64_t batch = attn.size(0), heads = attn.size(1), queries = attn.size(2), keys = attn.size(3);
  const int64_t hidden = values.size(3);
  if (batch * queries * keys == 0) return;
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, keys * hidden * heads));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, attn.scalar_type(), "alti_norms_cpu", [&] {
    using A = at::opmath_type<scalar_t>;
    const scalar_t* a = attn.const_data_ptr<scalar_t>();
    const scalar_t* v = values.const_data_ptr<scalar_t>();
    const scalar_t* r = residual != nullptr ? residual->const_data_ptr<scalar_t>() : nullptr;
    const A* s = ln_scale != nullptr ? ln_scale->const_data_ptr<A>() : nullptr;
    const A* w = ln_weight != nullptr ? ln_weight->const_data_ptr<A>() : nullptr;
    const A* y = resultant.const_data_ptr<A>();
    A* gn = gain.mutable_data_ptr<A>();
    A* nrm = norm.mutable_data_ptr<A>();
    at::parallel_for(0, batch * queries, grain, [&](int64_t begin, int64_t end) {
      alti_rows<scalar_t, A>(a, v, r, positions, s, w, center, y, gn, nrm, heads, queries, keys, hidden, begin,
                             end);
    });
  });
}

}  // namespace instrument
