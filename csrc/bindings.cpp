// Python bindings of the isofast extension (module name from TORCH_EXTENSION_NAME: isofast._C
// when built by setup.py, isofast_C when built just in time).

#include <torch/extension.h>

#include "ops.h"

// The build description (isofast/_build.py) passes the binding ABI number and the build-info
// macros; the latter arrive as bare tokens (-DISOFAST_TORCH_VERSION_RAW=2.13.0+cpu) and are
// stringified here. Without them the torch headers' numeric version is recorded.
#ifndef ISOFAST_ABI_VERSION
#error "isofast: build the extension through setup.py or isofast._ext (they pass -DISOFAST_ABI_VERSION)"
#endif
#define ISOFAST_STR2(x) #x
#define ISOFAST_STR(x) ISOFAST_STR2(x)
#ifdef ISOFAST_TORCH_VERSION_RAW
#define ISOFAST_TORCH_VERSION ISOFAST_STR(ISOFAST_TORCH_VERSION_RAW)
#else
#define ISOFAST_TORCH_VERSION \
  ISOFAST_STR(TORCH_VERSION_MAJOR) "." ISOFAST_STR(TORCH_VERSION_MINOR) "." ISOFAST_STR(TORCH_VERSION_PATCH)
#endif
#ifdef ISOFAST_CUDA_VERSION_RAW
#define ISOFAST_CUDA_VERSION ISOFAST_STR(ISOFAST_CUDA_VERSION_RAW)
#else
#define ISOFAST_CUDA_VERSION ""
#endif
#ifdef ISOFAST_CUDA_ARCHS_RAW
#define ISOFAST_CUDA_ARCHS ISOFAST_STR(ISOFAST_CUDA_ARCHS_RAW)
#else
#define ISOFAST_CUDA_ARCHS ""
#endif

#ifdef ISOFAST_WITH_CUDA
namespace isofast {
void register_cuda(pybind11::module_& m);
}
#endif

namespace {

isofast::ActList make_acts(const std::vector<int64_t>& codes, const std::vector<double>& coefs,
                           const std::vector<double>& thresholds) {
  return isofast::ActList{codes, coefs, thresholds};
}

pybind11::dict build_info() {
  pybind11::dict d;
  d["torch_version"] = std::string(ISOFAST_TORCH_VERSION);
  d["cuda_version"] = std::string(ISOFAST_CUDA_VERSION);
#ifdef ISOFAST_WITH_CUDA
  d["cuda"] = true;
#else
  d["cuda"] = false;
#endif
  d["cuda_archs"] = std::string(ISOFAST_CUDA_ARCHS);
  d["abi_version"] = ISOFAST_ABI_VERSION;
  return d;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "isofast compiled kernels: fused multi-stream MLP ops and batched small-SPD spectral ops";
  m.def("build_info", &build_info, "What this extension was built against (torch, CUDA, archs)");

  m.def(
      "mlp_pullback_forward",
      [](const at::Tensor& z, const std::vector<at::Tensor>& w, const std::vector<c10::optional<at::Tensor>>& b,
         const std::vector<int64_t>& codes, const std::vector<double>& coefs, const std::vector<double>& thresholds,
         const c10::optional<at::Tensor>& data_weight) {
        return isofast::mlp_pullback_forward(z, w, b, make_acts(codes, coefs, thresholds), data_weight);
      },
      "exact pullback metric H (B, m, m) = J^T diag(data_weight) J and the tensors its backward needs",
      pybind11::arg("z"), pybind11::arg("weights"), pybind11::arg("biases"), pybind11::arg("codes"),
      pybind11::arg("coefs"), pybind11::arg("thresholds"), pybind11::arg("data_weight") = pybind11::none());
  m.def(
      "mlp_pullback_backward",
      [](const at::Tensor& g, const std::vector<at::Tensor>& w, const std::vector<bool>& has_bias,
         const std::vector<int64_t>& codes, const std::vector<double>& coefs, const std::vector<double>& thresholds,
         const std::vector<at::Tensor>& saved, const c10::optional<at::Tensor>& data_weight) {
        return isofast::mlp_pullback_backward(g, w, has_bias, make_acts(codes, coefs, thresholds), saved,
                                              data_weight);
      },
      "(grad_z, grad_weights, grad_biases) of mlp_pullback", pybind11::arg("grad_h"), pybind11::arg("weights"),
      pybind11::arg("has_bias"), pybind11::arg("codes"), pybind11::arg("coefs"), pybind11::arg("thresholds"),
      pybind11::arg("saved"), pybind11::arg("data_weight") = pybind11::none());
  m.def(
      "mlp_hutchinson_forward",
      [](const at::Tensor& z, const at::Tensor& probes, const std::vector<at::Tensor>& w,
         const std::vector<c10::optional<at::Tensor>>& b, const std::vector<int64_t>& codes,
         const std::vector<double>& coefs, const std::vector<double>& thresholds,
         const c10::optional<at::Tensor>& data_weight) {
        return isofast::mlp_hutchinson_forward(z, probes, w, b, make_acts(codes, coefs, thresholds), data_weight);
      },
      "Hutchinson statistics (B, K, 2) (under the data-space metric diag(data_weight)) and the tensors its "
      "backward needs",
      pybind11::arg("z"), pybind11::arg("probes"), pybind11::arg("weights"), pybind11::arg("biases"),
      pybind11::arg("codes"), pybind11::arg("coefs"), pybind11::arg("thresholds"),
      pybind11::arg("data_weight") = pybind11::none());
  m.def(
      "mlp_hutchinson_backward",
      [](const at::Tensor& g, const std::vector<at::Tensor>& w, const std::vector<bool>& has_bias,
         const std::vector<int64_t>& codes, const std::vector<double>& coefs, const std::vector<double>& thresholds,
         const std::vector<at::Tensor>& saved, const c10::optional<at::Tensor>& data_weight) {
        return isofast::mlp_hutchinson_backward(g, w, has_bias, make_acts(codes, coefs, thresholds), saved,
                                                data_weight);
      },
      "(grad_z, grad_weights, grad_biases) of mlp_hutchinson", pybind11::arg("grad_stats"),
      pybind11::arg("weights"), pybind11::arg("has_bias"), pybind11::arg("codes"), pybind11::arg("coefs"),
      pybind11::arg("thresholds"), pybind11::arg("saved"), pybind11::arg("data_weight") = pybind11::none());

  m.def("eigvalsh", &isofast::spectral_eigvalsh, "ascending eigenvalues (B, m) of symmetric (B, m, m), m <= 32",
        pybind11::arg("H"));
  m.def("logdet", &isofast::spectral_logdet,
        "(logdet (B,), d logdet / dH (B, m, m) or None) of symmetric positive definite (B, m, m)",
        pybind11::arg("H"), pybind11::arg("with_grad"));
  m.def("condition_numbers", &isofast::spectral_condition_numbers, "lambda_max / lambda_min per matrix",
        pybind11::arg("H"));
  m.def("airm_sq_to_mean", &isofast::spectral_airm_sq_to_mean,
        "squared AIRM distance of each matrix to the batch mean", pybind11::arg("H"));

#ifdef ISOFAST_WITH_CUDA
  isofast::register_cuda(m);
#endif
}
