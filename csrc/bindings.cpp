// instrument._C: checks the arguments of each op, allocates its output and runs the CPU or CUDA kernel.
// instrument/kernels.py validates first with friendlier errors; these checks guard direct calls.
#include <ATen/OpMathType.h>
#include <torch/extension.h>

#include <string>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#include <unistd.h>
#endif

#include "cpu_vec.h"

#ifdef WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "kernels_cuda.h"
#endif

namespace instrument {

// CPU kernels (csrc/*.cpp).
void interpolate_cpu(const at::Tensor& inputs, const at::Tensor& baselines, const at::Tensor& alphas,
                     const bool* mask, at::Tensor& out);
void accumulate_cpu(at::Tensor& acc, const at::Tensor& grads, const at::Tensor& weights);
void finalize_cpu(const at::Tensor& acc, const at::Tensor& inputs, const at::Tensor& baselines, at::Tensor& out);
void reduce_heads_cpu(const std::vector<at::Tensor>& layers, const std::vector<int64_t>& heads, bool max,
                      at::Tensor& out);
void alti_norms_cpu(const at::Tensor& attn, const at::Tensor& values, const at::Tensor* residual,
                    const int64_t* positions, const at::Tensor* ln_scale, const at::Tensor* ln_weight, bool center,
                    const at::Tensor& resultant, at::Tensor& gain, at::Tensor& norm);

namespace {

bool supported(at::ScalarType type) {
  return type == at::kFloat || type == at::kHalf || type == at::kBFloat16 || type == at::kDouble;
}

#ifdef WITH_CUDA
Dtype cuda_dtype(at::ScalarType type) {
  switch (type) {
    case at::kFloat: return Dtype::Float32;
    case at::kHalf: return Dtype::Float16;
    case at::kBFloat16: return Dtype::BFloat16;
    case at::kDouble: return Dtype::Float64;
    default: TORCH_CHECK(false, "instrument._C: unsupported dtype ", type);
  }
}

void check_cuda(const char* error, const char* op) {
  TORCH_CHECK(error == nullptr, "instrument._C.", op, ": CUDA error: ", error);
}

void* current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }
#endif

[[noreturn]] void no_kernel(const char* op, const at::Tensor& tensor) {
  TORCH_CHECK(false, op, ": instrument._C has no kernel for device ", tensor.device());
  __builtin_unreachable();
}

// A new CPU output of many MiB costs a page fault per 4 KiB page on its first write, which takes longer than the
// kernel itself (interpolate: ~0.4 s of faults for 630 MB). Its 2 MiB-aligned interior is asked for transparent
// huge pages instead, as torch does for every allocation with THP_MEM_ALLOC_ENABLE=1 (no effect where THP is off).
void advise_huge_pages(const at::Tensor& out) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t(2) << 20;
  if (!out.is_cpu() || out.nbytes() < 32 * kHuge) return;
  const auto begin = reinterpret_cast<uintptr_t>(out.data_ptr());
  const uintptr_t first = (begin + kHuge - 1) & ~(kHuge - 1), last = (begin + out.nbytes()) & ~(kHuge - 1);
  if (last > first) madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE);  // advice: errors ignored
#else
  (void)out;
#endif
}

}  // namespace

// [K*B, L, D] rows k*B + b = baselines[b] + alphas[k] * (inputs[b] - baselines[b]); positions where the [B, L]
// mask is false keep inputs[b].
at::Tensor interpolate(const at::Tensor& inputs, const at::Tensor& baselines, const at::Tensor& alphas,
                       const c10::optional<at::Tensor>& mask) {
  TORCH_CHECK(inputs.dim() == 3, "interpolate: inputs must be [B, L, D], got ", inputs.sizes());
  TORCH_CHECK(baselines.sizes() == inputs.sizes(), "interpolate: baselines ", baselines.sizes(),
              " != inputs ", inputs.sizes());
  TORCH_CHECK(supported(inputs.scalar_type()), "interpolate: unsupported dtype ", inputs.scalar_type());
  TORCH_CHECK(baselines.scalar_type() == inputs.scalar_type(), "interpolate: dtype mismatch");
  TORCH_CHECK(alphas.dim() == 1 && alphas.scalar_type() == at::toOpMathType(inputs.scalar_type()),
              "interpolate: alphas must be 1-D of dtype ", at::toOpMathType(inputs.scalar_type()));
  TORCH_CHECK(baselines.device() == inputs.device() && alphas.device() == inputs.device(),
              "interpolate: all tensors must be on one device");
  TORCH_CHECK(inputs.is_contiguous() && baselines.is_contiguous() && alphas.is_contiguous(),
              "interpolate: tensors must be contiguous");
  const bool* mask_ptr = nullptr;
  if (mask.has_value()) {
    TORCH_CHECK(mask->scalar_type() == at::kBool && mask->dim() == 2 && mask->size(0) == inputs.size(0) &&
                    mask->size(1) == inputs.size(1),
                "interpolate: mask must be a bool [B, L] = [", inputs.size(0), ", ", inputs.size(1), "], got ",
                mask->scalar_type(), " ", mask->sizes());
    TORCH_CHECK(mask->device() == inputs.device() && mask->is_contiguous(),
                "interpolate: mask must be contiguous, on the inputs' device");
    mask_ptr = mask->const_data_ptr<bool>();
  }

  const int64_t batch = inputs.size(0), k = alphas.size(0);
  at::Tensor out = at::empty({k * batch, inputs.size(1), inputs.size(2)}, inputs.options());
  if (inputs.is_cpu()) {
    advise_huge_pages(out);
    interpolate_cpu(inputs, baselines, alphas, mask_ptr, out);
    return out;
  }
#ifdef WITH_CUDA
  if (inputs.is_cuda()) {
    const c10::cuda::CUDAGuard guard(inputs.device());
    check_cuda(interpolate_cuda(cuda_dtype(inputs.scalar_type()), inputs.const_data_ptr(),
                                baselines.const_data_ptr(), alphas.const_data_ptr(), mask_ptr, out.mutable_data_ptr(),
                                batch, inputs.size(1) * inputs.size(2), inputs.size(2), k, current_stream()),
               "interpolate");
    return out;
  }
#endif
  no_kernel("interpolate", inputs);
}

// acc [B, L, D] += sum_k weights[k] * grads[k] (grads [K*B, L, D] k-major or [K, B, L, D]), in place.
void accumulate(at::Tensor& acc, const at::Tensor& grads, const at::Tensor& weights) {
  TORCH_CHECK(acc.dim() == 3 && acc.scalar_type() == at::kFloat, "accumulate: acc must be a float32 [B, L, D]");
  TORCH_CHECK(supported(grads.scalar_type()), "accumulate: unsupported grads dtype ", grads.scalar_type());
  TORCH_CHECK(weights.dim() == 1 && weights.scalar_type() == at::kFloat, "accumulate: weights must be 1-D float32");
  const int64_t k = weights.size(0);
  TORCH_CHECK(grads.numel() == k * acc.numel() &&
                  (grads.dim() == 4 ? grads.size(0) == k && grads.sizes().slice(1) == acc.sizes()
                                    : grads.dim() == 3 && grads.size(0) == k * acc.size(0) &&
                                          grads.sizes().slice(1) == acc.sizes().slice(1)),
              "accumulate: grads ", grads.sizes(), " must be [K*B, L, D] or [K, B, L, D] with K = ", k,
              " and acc [B, L, D] = ", acc.sizes());
  TORCH_CHECK(grads.device() == acc.device() && weights.device() == acc.device(),
              "accumulate: all tensors must be on one device");
  TORCH_CHECK(acc.is_contiguous() && grads.is_contiguous() && weights.is_contiguous(),
              "accumulate: tensors must be contiguous");
  if (acc.is_cpu()) {
    accumulate_cpu(acc, grads, weights);
    return;
  }
#ifdef WITH_CUDA
  if (acc.is_cuda()) {
    const c10::cuda::CUDAGuard guard(acc.device());
    check_cuda(accumulate_cuda(cuda_dtype(grads.scalar_type()), acc.mutable_data_ptr<float>(), grads.const_data_ptr(),
                               weights.const_data_ptr<float>(), k, acc.numel(), current_stream()),
               "accumulate");
    return;
  }
#endif
  no_kernel("accumulate", acc);
}

// acc * (inputs - baselines) over [..., D]; float32.
at::Tensor finalize(const at::Tensor& acc, const at::Tensor& inputs, const at::Tensor& baselines) {
  TORCH_CHECK((acc.dim() == 3 || acc.dim() == 4) && acc.scalar_type() == at::kFloat,
              "finalize: acc must be a float32 [B, L, D] or [layers, B, L, D]");
  TORCH_CHECK(inputs.sizes() == acc.sizes() && baselines.sizes() == acc.sizes(), "finalize: inputs ", inputs.sizes(),
              " and baselines ", baselines.sizes(), " must have the shape of acc ", acc.sizes());
  TORCH_CHECK(supported(inputs.scalar_type()) && baselines.scalar_type() == inputs.scalar_type(),
              "finalize: inputs and baselines must have one supported dtype");
  TORCH_CHECK(inputs.device() == acc.device() && baselines.device() == acc.device(),
              "finalize: all tensors must be on one device");
  TORCH_CHECK(acc.is_contiguous() && inputs.is_contiguous() && baselines.is_contiguous(),
              "finalize: tensors must be contiguous");
  at::Tensor out = at::empty_like(acc);
  if (acc.is_cpu()) {
    advise_huge_pages(out);
    finalize_cpu(acc, inputs, baselines, out);
    return out;
  }
#ifdef WITH_CUDA
  if (acc.is_cuda()) {
    const c10::cuda::CUDAGuard guard(acc.device());
    check_cuda(finalize_cuda(cuda_dtype(inputs.scalar_type()), acc.const_data_ptr<float>(), inputs.const_data_ptr(),
                             baselines.const_data_ptr(), out.mutable_data_ptr<float>(), acc.numel(), current_stream()),
               "finalize");
    return out;
  }
#endif
  no_kernel("finalize", acc);
}

// Mean or max over the given layers (each [B, H, T, S]) and head indices: [B, T, S] in the math type.
at::Tensor reduce_heads(const std::vector<at::Tensor>& layers, const std::vector<int64_t>& heads,
                        const std::string& reduce) {
  TORCH_CHECK(reduce == "mean" || reduce == "max", "reduce_heads: reduce must be mean or max, got ", reduce);
  TORCH_CHECK(!layers.empty() && !heads.empty(), "reduce_heads: select at least one layer and one head");
  const at::Tensor& first = layers.front();
  TORCH_CHECK(first.dim() == 4, "reduce_heads: each layer must be [B, H, T, S], got ", first.sizes());
  TORCH_CHECK(supported(first.scalar_type()), "reduce_heads: unsupported dtype ", first.scalar_type());
  for (const at::Tensor& layer : layers) {
    TORCH_CHECK(layer.sizes() == first.sizes() && layer.scalar_type() == first.scalar_type() &&
                    layer.device() == first.device(),
                "reduce_heads: every layer must have one shape, dtype and device");
    TORCH_CHECK(layer.is_contiguous(), "reduce_heads: layers must be contiguous");
  }
  for (const int64_t head : heads) {
    TORCH_CHECK(0 <= head && head < first.size(1), "reduce_heads: head index ", head, " out of range [0, ",
                first.size(1), ")");
  }
  const bool max = reduce == "max";
  at::Tensor out = at::empty({first.size(0), first.size(2), first.size(3)},
                             first.options().dtype(at::toOpMathType(first.scalar_type())));
  if (first.is_cpu()) {
    advise_huge_pages(out);
    reduce_heads_cpu(layers, heads, max, out);
    return out;
  }
#ifdef WITH_CUDA
  if (first.is_cuda()) {
    const c10::cuda::CUDAGuard guard(first.device());
    const int64_t plane = first.size(2) * first.size(3), elem = first.element_size();
    std::vector<const void*> planes;
    planes.reserve(layers.size() * heads.size());
    for (const at::Tensor& layer : layers) {
      for (const int64_t head : heads) {
        planes.push_back(static_cast<const char*>(layer.const_data_ptr()) + head * plane * elem);
      }
    }
    check_cuda(reduce_heads_cuda(cuda_dtype(first.scalar_type()), planes.data(), static_cast<int64_t>(planes.size()),
                                 out.mutable_data_ptr(), first.size(0), first.size(1) * plane, plane, max,
                                 current_stream()),
               "reduce_heads");
    return out;
  }
#endif
  no_kernel("reduce_heads", first);
}

// ALTI's gains ||resultant_i||_1 - ||resultant_i - t_ij||_1 and L2 norms ||t_ij||_2 of the decomposed vectors t_ij, without forming
// them all: two [B, Q, K] tensors in the math type. See instrument.kernels.alti_norms.
std::tuple<at::Tensor, at::Tensor> alti_norms(const at::Tensor& attn, const at::Tensor& values,
                                              const c10::optional<at::Tensor>& residual,
                                              const c10::optional<at::Tensor>& positions,
                                              const c10::optional<at::Tensor>& ln_scale,
                                              const c10::optional<at::Tensor>& ln_weight, bool center,
                                              const at::Tensor& resultant) {
  TORCH_CHECK(attn.dim() == 4 && values.dim() == 4, "alti_norms: attn must be [B, H, Q, K] and values [B, H, K, D]");
  const int64_t batch = attn.size(0), heads = attn.size(1), queries = attn.size(2), keys = attn.size(3);
  const int64_t hidden = values.size(3);
  TORCH_CHECK(values.size(0) == batch && values.size(1) == heads && values.size(2) == keys,
              "alti_norms: values ", values.sizes(), " do not match attn ", attn.sizes());
  TORCH_CHECK(supported(attn.scalar_type()) && values.scalar_type() == attn.scalar_type(),
              "alti_norms: attn and values must have one supported dtype");
  const auto math = at::toOpMathType(attn.scalar_type());
  const auto device = attn.device();
  TORCH_CHECK(attn.is_contiguous() && values.is_contiguous() && values.device() == device,
              "alti_norms: attn and values must be contiguous, on one device");
  TORCH_CHECK(resultant.sizes() == at::IntArrayRef({batch, queries, hidden}) && resultant.scalar_type() == math &&
                  resultant.is_contiguous() && resultant.device() == device,
              "alti_norms: resultant must be a contiguous [B, Q, D] tensor in the math type");
  TORCH_CHECK(residual.has_value() == positions.has_value(), "alti_norms: residual and positions go together");
  if (residual.has_value()) {
    TORCH_CHECK(residual->sizes() == resultant.sizes() && residual->scalar_type() == attn.scalar_type() &&
                    residual->is_contiguous() && residual->device() == device,
                "alti_norms: residual must be a contiguous [B, Q, D] tensor of attn's dtype");
    TORCH_CHECK(positions->sizes() == at::IntArrayRef({batch, queries}) && positions->scalar_type() == at::kLong &&
                    positions->is_contiguous() && positions->device() == device,
                "alti_norms: positions must be a contiguous int64 [B, Q] tensor");
  }
  TORCH_CHECK(ln_scale.has_value() == ln_weight.has_value(), "alti_norms: ln_scale and ln_weight go together");
  if (ln_scale.has_value()) {
    TORCH_CHECK(ln_scale->sizes() == at::IntArrayRef({batch, queries}) && ln_scale->scalar_type() == math &&
                    ln_scale->is_contiguous() && ln_scale->device() == device,
                "alti_norms: ln_scale must be a contiguous [B, Q] tensor in the math type");
    TORCH_CHECK(ln_weight->sizes() == at::IntArrayRef({hidden}) && ln_weight->scalar_type() == math &&
                    ln_weight->is_contiguous() && ln_weight->device() == device,
                "alti_norms: ln_weight must be a contiguous [D] tensor in the math type");
  }
  at::Tensor gain = at::empty({batch, queries, keys}, attn.options().dtype(math));
  at::Tensor norm = at::empty_like(gain);
  const at::Tensor* residual_ptr = residual.has_value() ? &*residual : nullptr;
  const int64_t* positions_ptr = positions.has_value() ? positions->const_data_ptr<int64_t>() : nullptr;
  const at::Tensor* scale_ptr = ln_scale.has_value() ? &*ln_scale : nullptr;
  const at::Tensor* weight_ptr = ln_weight.has_value() ? &*ln_weight : nullptr;
  if (attn.is_cpu()) {
    alti_norms_cpu(attn, values, residual_ptr, positions_ptr, scale_ptr, weight_ptr, center, resultant, gain, norm);
    return {gain, norm};
  }
#ifdef WITH_CUDA
  if (attn.is_cuda()) {
    const c10::cuda::CUDAGuard guard(device);
    check_cuda(alti_norms_cuda(cuda_dtype(attn.scalar_type()), attn.const_data_ptr(), values.const_data_ptr(),
                               residual_ptr != nullptr ? residual_ptr->const_data_ptr() : nullptr, positions_ptr,
                               scale_ptr != nullptr ? scale_ptr->const_data_ptr() : nullptr,
                               weight_ptr != nullptr ? weight_ptr->const_data_ptr() : nullptr, center,
                               resultant.const_data_ptr(), gain.mutable_data_ptr(), norm.mutable_data_ptr(), batch,
                               heads, queries, keys, hidden, current_stream()),
               "alti_norms");
    return {gain, norm};
  }
#endif
  no_kernel("alti_norms", attn);
}

}  // namespace instrument

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "Native kernels of seq-instrument; use them through instrument.kernels.";
#ifdef WITH_CUDA
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
  m.attr("api") = 2;  // instrument.kernels.API: 2 since finalize lost its reductions
  m.def("interpolate", &instrument::interpolate, "Integrated-gradients interpolation; see instrument.kernels.",
        py::arg("inputs"), py::arg("baselines"), py::arg("alphas"), py::arg("mask") = py::none(),
        py::call_guard<py::gil_scoped_release>());
  m.def("accumulate", &instrument::accumulate, "In-place weighted sum of gradients; see instrument.kernels.",
        py::arg("acc"), py::arg("grads"), py::arg("weights"), py::call_guard<py::gil_scoped_release>());
  m.def("finalize", &instrument::finalize, "acc * (inputs - baselines); see instrument.kernels.",
        py::arg("acc"), py::arg("inputs"), py::arg("baselines"), py::call_guard<py::gil_scoped_release>());
  m.def("reduce_heads", &instrument::reduce_heads, "Attention mean or max over layers and heads; see instrument.kernels.",
        py::arg("layers"), py::arg("heads"), py::arg("reduce"), py::call_guard<py::gil_scoped_release>());
  m.def("alti_norms", &instrument::alti_norms, "ALTI gains and norms of decomposed vectors; see instrument.kernels.",
        py::arg("attn"), py::arg("values"), py::arg("residual"), py::arg("positions"), py::arg("ln_scale"),
        py::arg("ln_weight"), py::arg("center"), py::arg("resultant"), py::call_guard<py::gil_scoped_release>());
  m.def("cpu_simd", [] { return instrument::cpu::has_avx2(); },
        "Whether the CPU kernels run their AVX2 versions (else the scalar ones).");
  m.def(
      "_set_cpu_simd",
      [](bool enabled) { return instrument::cpu::avx2_allowed().exchange(enabled); },
      "Allows (True) or forbids (False) the AVX2 CPU kernels; returns the previous setting. For tests.",
      py::arg("enabled"));
}
