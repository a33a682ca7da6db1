// Torch binding of the CUDA kernels (compiled only in CUDA builds, with -DISOFAST_WITH_CUDA):
// argument checks, allocation and the current stream here; the kernels in the .cu files beside it.

#include <torch/extension.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include <limits>

#include "../spectral_math.h"
#include "launchers.h"

namespace isofast {
namespace {

Tensor check_cuda_batch(const char* op, const Tensor& H) {
  TORCH_CHECK(H.defined() && H.is_cuda(), op, ": H must be a CUDA tensor, got device ",
              H.defined() ? H.device() : at::Device(at::kCPU));
  TORCH_CHECK(H.scalar_type() == at::kFloat || H.scalar_type() == at::kDouble, op,
              ": H must be float32 or float64, got ", H.scalar_type());
  TORCH_CHECK(H.dim() == 3 && H.size(1) == H.size(2), op,
              ": H must have shape (B, m, m) (a batch of square matrices), got ", H.sizes());
  TORCH_CHECK(H.size(1) >= 1 && H.size(1) <= spectral::kMaxDim, op, ": H must have 1 <= m <= ", spectral::kMaxDim,
              ", got m = ", H.size(1));
  return H.contiguous();
}

void check_launch(const char* op, cudaError_t err) {
  TORCH_CHECK(err == cudaSuccess, op, ": CUDA kernel launch failed: ", cudaGetErrorString(err));
}

Tensor cuda_eigvalsh(const Tensor& H_in) {
  const Tensor H = check_cuda_batch("isofast eigvalsh (cuda)", H_in);
  const c10::cuda::CUDAGuard guard(H.device());
  Tensor out = at::empty({H.size(0), H.size(1)}, H.options());
  AT_DISPATCH_FLOATING_TYPES(H.scalar_type(), "isofast_cuda_eigvalsh", [&] {
    check_launch("isofast eigvalsh (cuda)",
                 cuda::eigvalsh<scalar_t>(H.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), H.size(0), int(H.size(1)),
                                          at::cuda::getCurrentCUDAStream()));
  });
  return out;
}

std::tuple<Tensor, Tensor> cuda_logdet(const Tensor& H_in, bool with_grad) {
  const Tensor H = check_cuda_batch("isofast logdet (cuda)", H_in);
  const c10::cuda::CUDAGuard guard(H.device());
  Tensor out = at::empty({H.size(0)}, H.options());
  Tensor grad = with_grad ? at::empty_like(H) : Tensor();
  AT_DISPATCH_FLOATING_TYPES(H.scalar_type(), "isofast_cuda_logdet", [&] {
    check_launch("isofast logdet (cuda)",
                 cuda::logdet<scalar_t>(H.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(),
                                        with_grad ? grad.data_ptr<scalar_t>() : nullptr, H.size(0), int(H.size(1)),
                                        double(std::numeric_limits<scalar_t>::min()),
                                        at::cuda::getCurrentCUDAStream()));
  });
  return {out, grad};
}

Tensor cuda_condition_numbers(const Tensor& H_in) {
  const Tensor H = check_cuda_batch("isofast condition_numbers (cuda)", H_in);
  const c10::cuda::CUDAGuard guard(H.device());
  Tensor out = at::empty({H.size(0)}, H.options());
  AT_DISPATCH_FLOATING_TYPES(H.scalar_type(), "isofast_cuda_condition_numbers", [&] {
    check_launch("isofast condition_numbers (cuda)",
                 cuda::condition_numbers<scalar_t>(H.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), H.size(0),
                                                   int(H.size(1)), at::cuda::getCurrentCUDAStream()));
  });
  return out;
}

Tensor cuda_airm_sq_to_mean(const Tensor& H_in) {
  const Tensor H = check_cuda_batch("isofast airm_sq_to_mean (cuda)", H_in);
  const c10::cuda::CUDAGuard guard(H.device());
  const int64_t m = H.size(1);
  const Tensor H64 = H.to(at::kDouble);
  const Tensor mean = ((H64 + H64.transpose(1, 2)) * 0.5).mean(0).contiguous();
  Tensor S_work = at::empty({m * m + 1}, H64.options());
  Tensor out = at::empty({H.size(0)}, H.options());
  AT_DISPATCH_FLOATING_TYPES(H.scalar_type(), "isofast_cuda_airm", [&] {
    check_launch("isofast airm_sq_to_mean (cuda)",
                 cuda::airm_sq_to_mean<scalar_t>(H.data_ptr<scalar_t>(), mean.data_ptr<double>(),
                                                 S_work.data_ptr<double>(), out.data_ptr<scalar_t>(), H.size(0),
                                                 int(m), at::cuda::getCurrentCUDAStream()));
  });
  return out;
}

Tensor check_images(const char* op, const Tensor& X) {
  TORCH_CHECK(X.defined() && X.is_cuda(), op, ": X must be a CUDA tensor");
  TORCH_CHECK(X.dim() == 3, op, ": X must have shape (B, K, D), got ", X.sizes());
  TORCH_CHECK(X.scalar_type() == at::kFloat || X.scalar_type() == at::kDouble, op,
              ": X must be float32 or float64, got ", X.scalar_type());
  return X.contiguous();
}

Tensor cuda_gram(const Tensor& X_in) {
  const Tensor X = check_images("isofast gram (cuda)", X_in);
  const c10::cuda::CUDAGuard guard(X.device());
  Tensor G = at::empty({X.size(0), X.size(1), X.size(1)}, X.options());
  AT_DISPATCH_FLOATING_TYPES(X.scalar_type(), "isofast_cuda_gram", [&] {
    check_launch("isofast gram (cuda)",
                 cuda::gram<scalar_t, scalar_t>(X.data_ptr<scalar_t>(), G.data_ptr<scalar_t>(), X.size(0),
                                                int(X.size(1)), X.size(2), at::cuda::getCurrentCUDAStream()));
  });
  return G;
}

Tensor cuda_sqnorm(const Tensor& X_in) {
  const Tensor X = check_images("isofast sqnorm (cuda)", X_in);
  const c10::cuda::CUDAGuard guard(X.device());
  Tensor out = at::empty({X.size(0), X.size(1)}, X.options());
  AT_DISPATCH_FLOATING_TYPES(X.scalar_type(), "isofast_cuda_sqnorm", [&] {
    check_launch("isofast sqnorm (cuda)",
                 cuda::sqnorm<scalar_t, scalar_t>(X.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), X.size(0),
                                                  int(X.size(1)), X.size(2), at::cuda::getCurrentCUDAStream()));
  });
  return out;
}

// A ((1+K) B, d) GEMM output, modified in place (its first B rows become p); returns S.
Tensor cuda_forward_epilogue(Tensor A, const c10::optional<Tensor>& bias, int64_t K, int64_t code,
                             double coef, double threshold, bool write_primal) {
  const char* op = "isofast mlp forward epilogue (cuda)";
  TORCH_CHECK(A.is_cuda() && A.dim() == 2 && A.is_contiguous() && A.size(0) % (K + 1) == 0, op,
              ": A must be a contiguous CUDA ((1 + K) B, d) tensor, got ", A.sizes());
  const c10::cuda::CUDAGuard guard(A.device());
  const int64_t B = A.size(0) / (K + 1), d = A.size(1);
  Tensor b = bias.has_value() && bias->defined() ? bias->contiguous() : Tensor();
  Tensor S = at::empty_like(A);
  AT_DISPATCH_FLOATING_TYPES(A.scalar_type(), "isofast_cuda_fwd_epilogue", [&] {
    check_launch(op, cuda::mlp_forward_epilogue<scalar_t>(A.data_ptr<scalar_t>(),
                                                          b.defined() ? b.data_ptr<scalar_t>() : nullptr,
                                                          S.data_ptr<scalar_t>(), K, B, d, int(code), coef,
                                                          threshold, write_primal, at::cuda::getCurrentCUDAStream()));
  });
  return S;
}

void cuda_backward_prologue(const Tensor& A, Tensor Sb, const c10::optional<Tensor>& extra, int64_t K, int64_t code,
                            double coef, double threshold) {
  const char* op = "isofast mlp backward prologue (cuda)";
  TORCH_CHECK(A.is_cuda() && Sb.is_cuda() && A.sizes() == Sb.sizes() && A.is_contiguous() && Sb.is_contiguous(), op,
              ": A and Sb must be contiguous CUDA tensors of one shape");
  const c10::cuda::CUDAGuard guard(A.device());
  const int64_t B = A.size(0) / (K + 1), d = A.size(1);
  Tensor e = extra.has_value() && extra->defined() ? extra->contiguous() : Tensor();
  AT_DISPATCH_FLOATING_TYPES(A.scalar_type(), "isofast_cuda_bwd_prologue", [&] {
    check_launch(op, cuda::mlp_backward_prologue<scalar_t>(A.data_ptr<scalar_t>(), Sb.data_ptr<scalar_t>(),
                                                           e.defined() ? e.data_ptr<scalar_t>() : nullptr, K, B, d,
                                                           int(code), coef, threshold,
                                                           at::cuda::getCurrentCUDAStream()));
  });
}

}  // namespace

void register_cuda(pybind11::module_& m) {
  m.def("cuda_eigvalsh", &cuda_eigvalsh, pybind11::arg("H"));
  m.def("cuda_logdet", &cuda_logdet, pybind11::arg("H"), pybind11::arg("with_grad"));
  m.def("cuda_condition_numbers", &cuda_condition_numbers, pybind11::arg("H"));
  m.def("cuda_airm_sq_to_mean", &cuda_airm_sq_to_mean, pybind11::arg("H"));
  m.def("cuda_gram", &cuda_gram, "per-sample Gram X X^T of (B, K, D)", pybind11::arg("X"));
  m.def("cuda_sqnorm", &cuda_sqnorm, "squared norms (B, K) of (B, K, D)", pybind11::arg("X"));
  m.def("cuda_forward_epilogue", &cuda_forward_epilogue, pybind11::arg("A"), pybind11::arg("bias"),
        pybind11::arg("K"), pybind11::arg("code"), pybind11::arg("coef"),
        pybind11::arg("threshold"), pybind11::arg("write_primal"));
  m.def("cuda_backward_prologue", &cuda_backward_prologue, pybind11::arg("A"), pybind11::arg("Sb"),
        pybind11::arg("extra"), pybind11::arg("K"), pybind11::arg("code"), pybind11::arg("coef"),
        pybind11::arg("threshold"));
}

}  // namespace isofast
