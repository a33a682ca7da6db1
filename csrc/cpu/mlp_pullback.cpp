// CPU kernels of the mlp_pullback op: the exact pullback metric H = J^T J (J^T diag(w) J with a
// data-space weight w) of an MLP from the 1 + m streams seeded with (z, I_m), and its hand-written
// backward (docs/maths.md section 4).
//
// Saved tensors (what the backward receives back): [z, P_1, S_1, A_2, S_2, A_3, ..., S_{L-1}, A_L]
// with P_1 = z W_1^T + b_1 and A_l's first B rows the primal pre-activation p_l (bias included).

#include "mlp_stream.h"

namespace isofast {
namespace cpu {
namespace {

// Last layer: P += bias, t_k = s'(P) A_k, G[b][k, l] = <w t_k, t_l> (accumulated in opmath, fp32
// or wider; w = 1 when null); the D-wide tangent images are never written out.
template <typename T>
void gram_epilogue(const View<T>& v, const Tensor& bias, T* G, int64_t K, int64_t B, Act a, const T* w) {
  const int64_t d = v.d;
  if (bias.defined()) v.A.narrow(0, 0, B).add_(bias);
  const Derivs<T> act(v.A, B, a, Tensor(), false);
  for_each_sample(act, B, (K + 1) * d, K * d, [&](int64_t b, const T* d1, T* t) {
    gate(d1, v.tangent(0, b), v.sK, t, d, K, d);
    T* g = G + b * K * K;
    for (int64_t k = 0; k < K; ++k) {
      for (int64_t l = k; l < K; ++l) {
        const T s = T(w == nullptr ? dot(t + k * d, t + l * d, d) : dot(w, t + k * d, t + l * d, d));
        g[k * K + l] = s;
        g[l * K + k] = s;
      }
    }
  });
}

// Backward of the Gram epilogue given Gs = Gbar + Gbar^T: Sbar_k = w sum_l Gs[k,l] t_l (Sbar_0 = 0;
// w = 1 when null), then back through the gates (gate_backward). Writes Abar ((1 + K) B x d).
template <typename T>
void gram_backward(const View<T>& v, const T* Gs, T* Abar, int64_t K, int64_t B, Act a, const T* w) {
  const int64_t d = v.d;
  const Derivs<T> act(v.A, B, a, Tensor(), true);
  for_each_sample(act, B, (K + 1) * d, (K + 1) * d, [&](int64_t b, const T* d1, T* scratch) {
    T* t = scratch;  // w t when weighted: Sbar_k is then sum_l Gs[k,l] (w t_l)
    gate(d1, v.tangent(0, b), v.sK, t, d, K, d);
    if (w != nullptr) scale_rows(w, t, d, K, d);
    const T* g = Gs + b * K * K;
    for (int64_t k = 0; k < K; ++k) {
      T* o = Abar + ((k + 1) * B + b) * d;
      std::fill(o, o + d, T(0));
      for (int64_t l = 0; l < K; ++l) {
        const T c = g[k * K + l];
        const T* x = t + l * d;
        for (int64_t i = 0; i < d; ++i) o[i] += c * x[i];
      }
    }
    std::fill(Abar + b * d, Abar + (b + 1) * d, T(0));
    gate_backward(v, act, b, d1, Abar, static_cast<const T*>(nullptr), K, B, scratch + K * d);
  });
}

}  // namespace
}  // namespace cpu

using namespace cpu;  // the stream-loop helpers of mlp_stream.h

std::tuple<Tensor, std::vector<Tensor>> mlp_pullback_forward(
    const Tensor& z_in, const std::vector<Tensor>& weights_in, const std::vector<OptTensor>& biases_in,
    const ActList& acts, const OptTensor& data_weight) {
  const char* op = "isofast mlp_pullback (cpu)";
  check_params(op, z_in, weights_in, biases_in.size(), acts);
  const Tensor z = z_in.contiguous();
  const std::vector<Tensor> W = contig(weights_in);
  const std::vector<Tensor> bias = contig_bias(op, W, biases_in);
  const Tensor dw = contig_data_weight(op, data_weight, W.back().size(0), z.scalar_type());
  const int64_t B = z.size(0), K = z.size(1);
  const size_t L = W.size();
  Tensor H = at::empty({B, K, K}, z.options());
  std::vector<Tensor> saved;
  saved.reserve(2 * L);
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "isofast_mlp_pullback_forward", [&] {
    using T = scalar_t;
    const Tensor W1t = W[0].t().contiguous();  // (m, d_1): the tangent pre-activations of layer 1
    const int64_t d1 = W[0].size(0);
    Tensor P1 = bias[0].defined() ? at::addmm(bias[0], z, W[0].t()) : at::mm(z, W[0].t());
    saved.push_back(z);
    saved.push_back(P1);
    const View<T> v1{P1, W1t.data_ptr<T>(), d1, 0, d1};
    if (L == 1) {
      gram_epilogue<T>(v1, Tensor(), H.data_ptr<T>(), K, B, act_at(acts, 0), data_ptr_or_null<T>(dw));
      return;
    }
    Tensor S = at::empty({(K + 1) * B, d1}, z.options());
    fwd_epilogue<T>(v1, Tensor(), S, true, K, B, act_at(acts, 0));
    for (size_t l = 1; l < L; ++l) {
      Tensor A = at::mm(S, W[l].t());
      saved.push_back(S);
      saved.push_back(A);
      const View<T> v = stacked_view<T>(A, B);
      if (l == L - 1) {
        gram_epilogue<T>(v, bias[l], H.data_ptr<T>(), K, B, act_at(acts, l), data_ptr_or_null<T>(dw));
      } else {
        Tensor Sn = at::empty_like(A);
        fwd_epilogue<T>(v, bias[l], Sn, true, K, B, act_at(acts, l));
        S = Sn;
      }
    }
  });
  return {H, saved};
}

std::tuple<Tensor, std::vector<Tensor>, std::vector<Tensor>> mlp_pullback_backward(
    const Tensor& grad_h, const std::vector<Tensor>& weights_in, const std::vector<bool>& has_bias,
    const ActList& acts, const std::vector<Tensor>& saved, const OptTensor& data_weight) {
  const char* op = "isofast mlp_pullback backward (cpu)";
  const size_t L = weights_in.size();
  TORCH_CHECK(saved.size() == 2 * L, op, ": saved must hold ", 2 * L, " tensors, got ", saved.size());
  const Tensor& z = saved[0];
  check_params(op, z, weights_in, has_bias.size(), acts);
  const int64_t B = z.size(0), K = z.size(1);
  TORCH_CHECK(grad_h.dim() == 3 && grad_h.size(0) == B && grad_h.size(1) == K && grad_h.size(2) == K, op,
              ": grad_h must have shape (", B, ", ", K, ", ", K, "), got ", grad_h.sizes());
  TORCH_CHECK(grad_h.device().is_cpu(), op, ": grad_h must be a CPU tensor, got device ", grad_h.device());
  const std::vector<Tensor> W = contig(weights_in);
  const Tensor dw = contig_data_weight(op, data_weight, W.back().size(0), z.scalar_type());
  const Tensor Gs = (grad_h + grad_h.transpose(1, 2)).to(z.scalar_type()).contiguous();
  Tensor grad_z;
  std::vector<Tensor> gw(L), gb(L);
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "isofast_mlp_pullback_backward", [&] {
    using T = scalar_t;
    const Tensor W1t = W[0].t().contiguous();
    const int64_t d1 = W[0].size(0);
    auto view = [&](size_t l) -> View<T> {
      if (l == 0) return View<T>{saved[1], W1t.data_ptr<T>(), d1, 0, d1};
      return stacked_view<T>(saved[2 * l + 1], B);
    };
    Tensor Abar = at::empty({(K + 1) * B, W[L - 1].size(0)}, z.options());
    gram_backward<T>(view(L - 1), Gs.data_ptr<T>(), Abar.data_ptr<T>(), K, B, act_at(acts, L - 1),
                     data_ptr_or_null<T>(dw));
    for (size_t li = L; li-- > 0;) {
      if (li < L - 1) bwd_prologue<T>(view(li), Abar.data_ptr<T>(), nullptr, K, B, act_at(acts, li));
      const Tensor A0 = Abar.narrow(0, 0, B);
      if (has_bias[li]) gb[li] = A0.sum(0);
      if (li > 0) {
        gw[li] = at::mm(Abar.t(), saved[2 * li]);
        Abar = at::mm(Abar, W[li]);
      } else {
        const int64_t d = W[0].size(0);
        gw[0] = at::mm(A0.t(), z);
        gw[0].add_(Abar.narrow(0, B, K * B).view({K, B, d}).sum(1).t());
        grad_z = at::mm(A0, W[0]);
      }
    }
  });
  return {grad_z, gw, gb};
}

}  // namespace isofast
