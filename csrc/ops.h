// Declarations of the extension's CPU ops, one file per op in cpu/ (the CUDA build's binding is
// cuda/cuda_ops.cpp).
#pragma once

#include <ATen/ATen.h>

#include <tuple>
#include <vector>

namespace isofast {

using at::Tensor;
using OptTensor = c10::optional<Tensor>;

// Activation records of the layers: kind codes and the two parameters of activation_math.h's
// act_eval (0 where unused).
struct ActList {
  std::vector<int64_t> codes;
  std::vector<double> coefs, thresholds;
};

// data_weight: the diagonal data-space metric w (D,) of H = J^T diag(w) J (z's dtype, CPU), or none
// (W = I, no extra work); the backward receives the forward's data_weight again.
std::tuple<Tensor, std::vector<Tensor>> mlp_pullback_forward(
    const Tensor& z, const std::vector<Tensor>& weights, const std::vector<OptTensor>& biases, const ActList& acts,
    const OptTensor& data_weight);
std::tuple<Tensor, std::vector<Tensor>, std::vector<Tensor>> mlp_pullback_backward(
    const Tensor& grad_h, const std::vector<Tensor>& weights, const std::vector<bool>& has_bias, const ActList& acts,
    const std::vector<Tensor>& saved, const OptTensor& data_weight);
std::tuple<Tensor, std::vector<Tensor>> mlp_hutchinson_forward(
    const Tensor& z, const Tensor& probes, const std::vector<Tensor>& weights, const std::vector<OptTensor>& biases,
    const ActList& acts, const OptTensor& data_weight);
std::tuple<Tensor, std::vector<Tensor>, std::vector<Tensor>> mlp_hutchinson_backward(
    const Tensor& grad_stats, const std::vector<Tensor>& weights, const std::vector<bool>& has_bias,
    const ActList& acts, const std::vector<Tensor>& saved, const OptTensor& data_weight);

Tensor spectral_eigvalsh(const Tensor& H);
std::tuple<Tensor, Tensor> spectral_logdet(const Tensor& H, bool with_grad);
Tensor spectral_condition_numbers(const Tensor& H);
Tensor spectral_airm_sq_to_mean(const Tensor& H);

}  // namespace isofast
