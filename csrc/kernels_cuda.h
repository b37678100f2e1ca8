// C-style launchers of the CUDA kernels in csrc/*.cu, called from bindings.cpp.
//
// Raw pointers and plain integers only, no torch or CUDA headers, so that the .cu files compile with a bare
// `nvcc -c` and this header with any C++ compiler. Every launcher enqueues on `stream` (a cudaStream_t) and
// returns nullptr on success or the CUDA error string.
#pragma once

#include <cstdint>

namespace instrument {

// Element type of a tensor argument. The math type is float, or double for Float64.
enum class Dtype : int { Float32 = 0, Float16 = 1, BFloat16 = 2, Float64 = 3 };

// out[k, b, i] = baselines[b, i] + alphas[k] * (inputs[b, i] - baselines[b, i]), in the math type, rounded once.
// inputs, baselines: [batch, row] contiguous; alphas: [k] in the math type; out: [k, batch, row] contiguous.
const char* interpolate_cuda(Dtype dtype, const void* inputs, const void* baselines, const void* alphas, void* out,
                             int64_t batch, int64_t row, int64_t k, void* stream);

}  // namespace instrument
