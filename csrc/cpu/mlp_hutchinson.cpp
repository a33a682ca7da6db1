// CPU kernels of the mlp_hutchinson op: the statistics ||J v||^2 and ||J^T J v||^2 of an MLP
// from the 1 + K streams seeded with (z, v_1..v_K) and the VJP chain c_{l-1} = (s'(p_l) c_l) W_l,
// and their hand-written backward (docs/maths.md section 4). With a data-space weight w the chain
// starts at c_L = w t (t = J v), and the statistics are sum_d w_d t_d^2 and ||c_0||^2.
//
// Saved tensors (what the backward receives back): [X_1, A_1, ..., X_L, A_L, c_1, ..., c_L, c_L, c_0]
// where A_l's first B rows hold the primal pre-activation p_l (bias included); without a weight
// c_L = t. The last layer's tangent rows are weighted in place, so c_L is always saved once.

#include "mlp_stream.h"

namespace isofast {
namespace cpu {
namespace {

// VJP chain step: out_k = s'(p) c_k for K streams of B rows (A: the layer's saved
// pre-activations, primal block first).
template <typename T>
void gate_rows(const Tensor& A, const T* c, T* out, int64_t K, int64_t B, Act a) {
  const int64_t d = A.size(1);
  const Derivs<T> act(A, B, a, Tensor(), false);
  for_each_sample(act, B, K * d, 0, [&](int64_t b, const T* d1, T*) {
    gate(d1, c + b * d, B * d, out + b * d, B * d, K, d);
  });
}

// Backward of one VJP-chain step: gated = s'(p) c, grad_p = s''(p) sum_k c_k gg_k (if s'' != 0),
// gg_k <- s'(p) gg_k in place (the next cotangent gradient).
template <typename T>
void chain_backward(const Tensor& A, const T* c, T* gg, T* gated, T* grad_p, int64_t K, int64_t B, Act a) {
  const int64_t d = A.size(1);
  const Derivs<T> act(A, B, a, Tensor(), grad_p != nullptr);
  for_each_sample(act, B, K * d, d, [&](int64_t b, const T* d1, T* acc) {
    if (act.d2on) std::fill(acc, acc + d, T(0));
    for (int64_t k = 0; k < K; ++k) {
      const T* x = c + (k * B + b) * d;
      T* g = gg + (k * B + b) * d;
      T* o = gated + (k * B + b) * d;
      if (act.d2on)
        for (int64_t i = 0; i < d; ++i) acc[i] += x[i] * g[i];
      for (int64_t i = 0; i < d; ++i) {
        o[i] = d1[i] * x[i];
        g[i] *= d1[i];
      }
    }
    if (act.d2on) {
      const T* d2 = act.d2(b);
      T* o = grad_p + b * d;
      for (int64_t i = 0; i < d; ++i) o[i] = d2[i] * acc[i];
    }
  });
}

}  // namespace
}  // namespace cpu

using namespace cpu;  // the stream-loop helpers of mlp_stream.h

std::tuple<Tensor, std::vector<Tensor>> mlp_hutchinson_forward(
    const Tensor& z_in, const Tensor& probes_in, const std::vector<Tensor>& weights_in,
    const std::vector<OptTensor>& biases_in, const ActList& acts, const OptTensor& data_weight) {
  const char* op = "isofast mlp_hutchinson (cpu)";
  check_params(op, z_in, weights_in, biases_in.size(), acts);
  const int64_t B = z_in.size(0), m = z_in.size(1);
  TORCH_CHECK(probes_in.defined() && probes_in.dim() == 3 && probes_in.size(0) == B && probes_in.size(2) == m &&
                  probes_in.size(1) >= 1,
              op, ": probes must have shape (B, K, m) = (", B, ", K, ", m, ") with K >= 1, got ", probes_in.sizes());
  TORCH_CHECK(probes_in.scalar_type() == z_in.scalar_type(), op, ": probes has dtype ", probes_in.scalar_type(),
              " but z has ", z_in.scalar_type());
  TORCH_CHECK(probes_in.device().is_cpu(), op, ": probes must be a CPU tensor, got device ", probes_in.device());
  const int64_t K = probes_in.size(1);
  const std::vector<Tensor> W = contig(weights_in);
  const std::vector<Tensor> bias = contig_bias(op, W, biases_in);
  const Tensor dw = contig_data_weight(op, data_weight, W.back().size(0), z_in.scalar_type());
  const size_t L = W.size();
  Tensor stats = at::empty({B, K, 2}, z_in.options());
  std::vector<Tensor> saved;
  saved.reserve(4 * L + 2);
  AT_DISPATCH_FLOATING_TYPES(z_in.scalar_type(), "isofast_mlp_hutchinson_forward", [&] {
    using T = scalar_t;
    Tensor S = at::cat({z_in.unsqueeze(0), probes_in.transpose(0, 1)}, 0).reshape({(K + 1) * B, m}).contiguous();
    for (size_t l = 0; l < L; ++l) {
      Tensor A = at::mm(S, W[l].t());
      saved.push_back(S);
      saved.push_back(A);
      Tensor Sn = at::empty_like(A);
      fwd_epilogue<T>(stacked_view<T>(A, B), bias[l], Sn, l + 1 < L, K, B, act_at(acts, l));
      S = Sn;
    }
    const int64_t D = W[L - 1].size(0);
    const Tensor t = S.narrow(0, B, K * B);
    T* out = stats.data_ptr<T>();
    const T* w = data_ptr_or_null<T>(dw);
    if (w != nullptr) {
      // q = sum_d w_d t_d^2, then t <- w t in place: the chain's c_L (t itself is not needed again).
      T* tp = t.data_ptr<T>();
      at::parallel_for(0, K * B, grain_rows(D), [&](int64_t r0, int64_t r1) {
        for (int64_t r = r0; r < r1; ++r) {
          T* x = tp + r * D;
          const T q = T(dot(w, x, x, D));
          for (int64_t i = 0; i < D; ++i) x[i] *= w[i];
          out[((r % B) * K + r / B) * 2] = q;
        }
      });
    }
    std::vector<Tensor> chain(L);
    Tensor c = t;
    for (size_t li = L; li-- > 0;) {
      chain[li] = c;
      const int64_t d = W[li].size(0);
      Tensor g = at::empty({K * B, d}, c.options());
      gate_rows<T>(saved[2 * li + 1], c.data_ptr<T>(), g.data_ptr<T>(), K, B, act_at(acts, li));
      c = at::mm(g, W[li]);
    }
    for (const auto& x : chain) saved.push_back(x);
    saved.push_back(t);
    saved.push_back(c);
    const T* tp = t.data_ptr<T>();
    const T* cp = c.data_ptr<T>();
    at::parallel_for(0, B, grain_rows(K * ((w != nullptr ? 0 : D) + m)), [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b)
        for (int64_t k = 0; k < K; ++k) {
          const T* x = tp + (k * B + b) * D;
          const T* y = cp + (k * B + b) * m;
          if (w == nullptr) out[(b * K + k) * 2] = T(dot(x, x, D));
          out[(b * K + k) * 2 + 1] = T(dot(y, y, m));
        }
    });
  });
  return {stats, saved};
}

std::tuple<Tensor, std::vector<Tensor>, std::vector<Tensor>> mlp_hutchinson_backward(
    const Tensor& grad_stats, const std::vector<Tensor>& weights_in, const std::vector<bool>& has_bias,
    const ActList& acts, const std::vector<Tensor>& saved, const OptTensor& data_weight) {
  const char* op = "isofast mlp_hutchinson backward (cpu)";
  const size_t L = weights_in.size();
  TORCH_CHECK(saved.size() == 3 * L + 2, op, ": saved must hold ", 3 * L + 2, " tensors, got ", saved.size());
  const Tensor& t = saved[3 * L];
  const Tensor& c0 = saved[3 * L + 1];
  const int64_t m = c0.size(1);
  const std::vector<Tensor> W = contig(weights_in);
  const int64_t rows = saved[0].size(0);  // (K + 1) B
  const int64_t KB = t.size(0);           // K B
  const int64_t Bn = rows - KB;
  TORCH_CHECK(Bn >= 1 && KB % Bn == 0, op, ": inconsistent saved tensors");
  const int64_t K = KB / Bn;
  TORCH_CHECK(grad_stats.dim() == 3 && grad_stats.size(0) == Bn && grad_stats.size(1) == K && grad_stats.size(2) == 2,
              op, ": grad_stats must have shape (", Bn, ", ", K, ", 2), got ", grad_stats.sizes());
  TORCH_CHECK(grad_stats.device().is_cpu(), op, ": grad_stats must be a CPU tensor, got device ", grad_stats.device());
  TORCH_CHECK(has_bias.size() == L && acts.codes.size() == L, op, ": has_bias/codes must have one entry per layer");
  const auto dtype = t.scalar_type();
  const Tensor dw = contig_data_weight(op, data_weight, t.size(1), dtype);
  const Tensor gs = grad_stats.to(dtype);
  const Tensor gq = gs.select(2, 0).t().contiguous();  // (K, B)
  const Tensor gr = gs.select(2, 1).t().contiguous();
  Tensor grad_z;
  std::vector<Tensor> gw(L), gb(L);
  AT_DISPATCH_FLOATING_TYPES(dtype, "isofast_mlp_hutchinson_backward", [&] {
    using T = scalar_t;
    const int64_t B = Bn;
    // Backward of the VJP chain, l = 1..L.
    Tensor grad_c = (gr.unsqueeze(-1) * c0.view({K, B, m}) * 2).reshape({K * B, m});
    std::vector<Tensor> gw_chain(L), gp_chain(L);
    for (size_t l = 0; l < L; ++l) {
      const Tensor& cl = saved[2 * L + l];
      const int64_t d = W[l].size(0);
      Tensor gg = at::mm(grad_c, W[l].t());
      Tensor gated = at::empty_like(cl);
      if (act_has_d2(int(acts.codes[l]))) gp_chain[l] = at::empty({B, d}, cl.options());
      chain_backward<T>(saved[2 * l + 1], cl.data_ptr<T>(), gg.data_ptr<T>(), gated.data_ptr<T>(),
                        gp_chain[l].defined() ? gp_chain[l].data_ptr<T>() : nullptr, K, B, act_at(acts, l));
      gw_chain[l] = at::mm(gated.t(), grad_c);
      grad_c = gg;
    }
    // dL/dS_L: zero primal block, tangent block 2 gq t + cbar_L; with a weight (t saved as
    // c_L = w t) w (2 gq t + cbar_L) = 2 gq c_L + w cbar_L.
    const int64_t D = W[L - 1].size(0);
    Tensor Sb = at::empty({(K + 1) * B, D}, t.options());
    {
      T* sb = Sb.data_ptr<T>();
      const T* tp = t.data_ptr<T>();
      const T* cp = grad_c.data_ptr<T>();
      const T* q = gq.data_ptr<T>();
      const T* w = data_ptr_or_null<T>(dw);
      std::fill(sb, sb + B * D, T(0));
      at::parallel_for(0, K * B, grain_rows(D), [&](int64_t r0, int64_t r1) {
        for (int64_t r = r0; r < r1; ++r) {
          const T f = T(2) * q[r];
          T* o = sb + (B + r) * D;
          const T* x = tp + r * D;
          const T* y = cp + r * D;
          if (w == nullptr) {
            for (int64_t i = 0; i < D; ++i) o[i] = f * x[i] + y[i];
          } else {
            for (int64_t i = 0; i < D; ++i) o[i] = f * x[i] + w[i] * y[i];
          }
        }
      });
    }
    for (size_t li = L; li-- > 0;) {
      const Tensor& A = saved[2 * li + 1];
      bwd_prologue<T>(stacked_view<T>(A, B), Sb.data_ptr<T>(),
                      gp_chain[li].defined() ? gp_chain[li].data_ptr<T>() : nullptr, K, B, act_at(acts, li));
      const Tensor A0 = Sb.narrow(0, 0, B);
      if (has_bias[li]) gb[li] = A0.sum(0);
      gw[li] = at::addmm(gw_chain[li], Sb.t(), saved[2 * li]);
      if (li > 0)
        Sb = at::mm(Sb, W[li]);
      else
        grad_z = at::mm(A0, W[0]);
    }
  });
  return {grad_z, gw, gb};
}

}  // namespace isofast
