// C-style launchers of the CUDA kernels in csrc/*.cu, called from bindings.cpp.
//
// Raw pointers and plain integers only, no torch or CUDA headers, so that the .cu files compile with a bare
// `nvcc -c` and this header with any C++ compiler. Every launcher enqueues on `stream` (a cudaStream_t) and
// returns nullptr on success or the CUDA error string. Every tensor argument is contiguous; results equal the
// CPU kernels' (no FMA contraction: every multiply and add is rounded on its own).
#pragma once

#include <cstdint>

namespace instrument {

// Element type of a tensor argument. The math type is float, or double for Float64.
enum class Dtype : int { Float32 = 0, Float16 = 1, BFloat16 = 2, Float64 = 3 };

// out[k, b, i] = baselines[b, i] + alphas[k] * (inputs[b, i] - baselines[b, i]), in the math type, rounded once;
// where mask (nullable, [batch, row / hidden]) is false at i's position, out[k, b, i] = inputs[b, i].
// inputs, baselines: [batch, row]; alphas: [k] in the math type; out: [k, batch, row].
const char* interpolate_cuda(Dtype dtype, const void* inputs, const void* baselines, const void* alphas,
                             const bool* mask, void* out, int64_t batch, int64_t row, int64_t hidden, int64_t k,
                             void* stream);

// acc[i] += sum_j weights[j] * float(grads[j, i]) in float32, summed in the order j = 0, 1, ..., then added.
// acc: [n] float32; grads: [k, n]; weights: [k] float32.
const char* accumulate_cuda(Dtype dtype, float* acc, const void* grads, const float* weights, int64_t k, int64_t n,
                            void* stream);

// out[i] = acc[i] * float(inputs[i] - baselines[i]) (difference in the math type). acc, out: [n] float32; inputs,
// baselines: [n].
const char* finalize_cuda(Dtype dtype, const float* acc, const void* inputs, const void* baselines, float* out,
                          int64_t n, void* stream);

// out[b, i] = mean (sum in order, then divided by n_pairs) or NaN-propagating max over p of planes[p][b *
// batch_stride + i], in the math type. planes: n_pairs (>= 1) device pointers, one per selected (layer, head),
// layer-major; out: [batch, plane] in the math type.
const char* reduce_heads_cuda(Dtype dtype, const void* const* planes, int64_t n_pairs, void* out, int64_t batch,
                              int64_t batch_stride, int64_t plane, bool max, void* stream);

// For each (b, i, j): t = sum_h attn[b, h, i, j] * values[b, h, j, :] (+ residual[b, i, :] where j == positions[b, i]),
// then, with ln_scale, t = (t - (center ? mean(t) : 0)) * ln_scale[b, i] * ln_weight; gain[b, i, j] = sum_d
// |resultant[b, i, d]| - |resultant[b, i, d] - t[d]|, norm[b, i, j] = sqrt(sum_d t[d]^2), in the math type. attn: [batch, heads, queries,
// keys]; values: [batch, heads, keys, hidden]; residual: [batch, queries, hidden] and positions [batch, queries]
// (both nullable); ln_scale: [batch, queries], ln_weight: [hidden], resultant: [batch, queries, hidden], gain and
// norm: [batch, queries, keys], all in the math type (ln_* nullable). Sums run in another order than the CPU's.
const char* alti_norms_cuda(Dtype dtype, const void* attn, const void* values, const void* residual,
                            const int64_t* positions, const void* ln_scale, const void* ln_weight, bool center,
                            const void* resultant, void* gain, void* norm, int64_t batch, int64_t heads,
                            int64_t queries, int64_t keys, int64_t hidden, void* stream);

}  // namespace instrument
