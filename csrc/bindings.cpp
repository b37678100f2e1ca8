// instrument._C: checks the arguments of each op, allocates its output and runs the CPU or CUDA kernel.
// instrument/kernels.py validates first with friendlier errors; these checks guard direct calls.
#include <ATen/OpMathType.h>
#include <torch/extension.h>

#ifdef WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "kernels_cuda.h"
#endif

namespace instrument {

// CPU kernels (csrc/*.cpp).
void interpolate_cpu(const at::Tensor& inputs, const at::Tensor& baselines, const at::Tensor& alphas,
                     at::Tensor& out);

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

// [K*B, L, D] rows k*B + b = baselines[b] + alphas[k] * (inputs[b] - baselines[b]).
at::Tensor interpolate(const at::Tensor& inputs, const at::Tensor& baselines, const at::Tensor& alphas) {
  TORCH_CHECK(inputs.dim() == 3, "interpolate: inputs must be [B, L, D], got ", inputs.sizes());
  TORCH_CHECK(baselines.sizes() == inputs.sizes(), "interpolate: baselines ", baselines.sizes(),
              " != inputs ", inputs.sizes());
  TORCH_CHECK(baselines.scalar_type() == inputs.scalar_type(), "interpolate: dtype mismatch");
  TORCH_CHECK(alphas.dim() == 1 && alphas.scalar_type() == at::toOpMathType(inputs.scalar_type()),
              "interpolate: alphas must be 1-D of dtype ", at::toOpMathType(inputs.scalar_type()));
  TORCH_CHECK(baselines.device() == inputs.device() && alphas.device() == inputs.device(),
              "interpolate: all tensors must be on one device");
  TORCH_CHECK(inputs.is_contiguous() && baselines.is_contiguous() && alphas.is_contiguous(),
              "interpolate: tensors must be contiguous");

  const int64_t batch = inputs.size(0), k = alphas.size(0);
  at::Tensor out = at::empty({k * batch, inputs.size(1), inputs.size(2)}, inputs.options());
  if (inputs.is_cpu()) {
    interpolate_cpu(inputs, baselines, alphas, out);
    return out;
  }
#ifdef WITH_CUDA
  if (inputs.is_cuda()) {
    const c10::cuda::CUDAGuard guard(inputs.device());
    check_cuda(interpolate_cuda(cuda_dtype(inputs.scalar_type()), inputs.const_data_ptr(),
                                baselines.const_data_ptr(), alphas.const_data_ptr(), out.mutable_data_ptr(), batch,
                                inputs.size(1) * inputs.size(2), k, current_stream()),
               "interpolate");
    return out;
  }
#endif
  TORCH_CHECK(false, "interpolate: instrument._C has no kernel for device ", inputs.device());
}

}  // namespace instrument

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "Native kernels of seq-instrument; use them through instrument.kernels.";
#ifdef WITH_CUDA
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
  m.def("interpolate", &instrument::interpolate, "Integrated-gradients interpolation; see instrument.kernels.",
        py::arg("inputs"), py::arg("baselines"), py::arg("alphas"), py::call_guard<py::gil_scoped_release>());
}
