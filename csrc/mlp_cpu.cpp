// CPU multi-stream MLP forward and backward (MATH.md section 4).
//
// Streams are stream-major, (1 + K) blocks of B rows (block 0 = primal), so each layer is ONE
// ATen GEMM over the stacked (1 + K) B rows; everything elementwise (bias, activation, s'(p)
// gating, the backward's s'' terms, the final Gram) is a fused loop over samples run with
// at::parallel_for. s', s'' of smooth activations are computed per layer by ATen ops first (see
// act_layer); ReLU-like masks are evaluated inside the loops.
//
// Tangent pre-activations of a layer are addressed as At + k * sK + b * sB. For a GEMM output
// A ((1 + K) B x d) that is At = A + B d, sK = B d, sB = d; for the exact estimator's first layer
// (identity seeds) the tangent pre-activation of stream k is column k of W_1 for every sample,
// so At = W_1^T (m x d), sK = d, sB = 0 and no GEMM runs for the tangent streams.
//
// Saved tensors (what the backward receives back):
//   pullback:   [z, P_1, S_1, A_2, S_2, A_3, ..., S_{L-1}, A_L]   (P_1 = z W_1^T + b_1)
//   hutchinson: [X_1, A_1, ..., X_L, A_L, c_1, ..., c_L, t, c_0]
// where A_l's first B rows hold the primal pre-activation p_l (bias included).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/OpMathType.h>

#include <algorithm>
#include <tuple>
#include <utility>
#include <vector>

#include "activation_math.h"
#include "ops.h"

namespace isofast {
namespace {

constexpr int64_t kGrainElems = 8192;

int64_t grain_rows(int64_t per_row) { return std::max<int64_t>(1, kGrainElems / std::max<int64_t>(1, per_row)); }

struct Act {
  int code;
  double q0, q1;
};

// s (when s_out is defined), s', s'' (when want_d2) of a whole layer's primal pre-activations
// x (B, d), for the smooth kinds (act_has_d2): act_eval's formulas as ATen ops, so that exp / tanh
// / erf run in ATen's vectorised kernels (a scalar libm call per element in the fused loops made
// them slower than the unfused torch twin).
std::pair<Tensor, Tensor> act_layer(const Tensor& x, Act a, Tensor s_out, bool want_d2) {
  const double q0 = a.q0, q1 = a.q1;
  Tensor d1, d2;
  switch (a.code) {
    case kElu: {
      const Tensor pos = x > 0;
      const Tensor e = at::expm1(x.clamp_max(0)).mul_(q0);
      if (s_out.defined()) at::where_out(s_out, pos, x, e);
      d1 = e.add_(q0);  // s' = s'' = e + alpha where x <= 0
      if (want_d2) d2 = d1.masked_fill(pos, 0);
      d1.masked_fill_(pos, 1);
      break;
    }
    case kSilu: {
      const Tensor sg = at::sigmoid(x), om = 1 - sg;
      if (s_out.defined()) at::mul_out(s_out, x, sg);
      d1 = sg * (1 + x * om);
      if (want_d2) d2 = sg * om * (2 + x * (1 - 2 * sg));
      break;
    }
    case kSoftplus: {
      const Tensor linear = x * q0 > q1;
      const Tensor sg = at::sigmoid(x * q0);
      if (s_out.defined()) at::softplus_out(s_out, x, q0, q1);  // x where linear, as act_eval
      if (want_d2) d2 = (q0 * sg * (1 - sg)).masked_fill_(linear, 0);
      d1 = sg.masked_fill_(linear, 1);
      break;
    }
    case kTanh: {
      const Tensor t = s_out.defined() ? at::tanh_out(s_out, x) : at::tanh(x);
      d1 = 1 - t * t;
      if (want_d2) d2 = -2 * t * d1;
      break;
    }
    case kSigmoid: {
      const Tensor sg = s_out.defined() ? at::sigmoid_out(s_out, x) : at::sigmoid(x);
      d1 = sg * (1 - sg);
      if (want_d2) d2 = d1 * (1 - 2 * sg);
      break;
    }
    case kGelu: {
      const Tensor cdf = 0.5 * (1 + at::erf(x * 0.70710678118654752440));
      const Tensor pdf = 0.39894228040143267794 * at::exp(-0.5 * x * x);
      if (s_out.defined()) at::mul_out(s_out, x, cdf);
      d1 = cdf + x * pdf;
      if (want_d2) d2 = pdf * (2 - x * x);
      break;
    }
    default: {  // kGeluTanh
      const double k0 = 0.79788456080286535588, c = 0.044715;  // sqrt(2 / pi)
      const Tensor xx = x * x;
      const Tensor du = k0 * (1 + 3 * c * xx);
      const Tensor t = at::tanh(k0 * (x + c * xx * x));
      const Tensor sech2 = 1 - t * t;
      if (s_out.defined()) at::mul_out(s_out, 0.5 * x, 1 + t);
      d1 = 0.5 * (1 + t) + 0.5 * x * sech2 * du;
      if (want_d2) d2 = sech2 * du + 0.5 * x * (sech2 * (k0 * 6 * c * x) - 2 * t * sech2 * du * du);
      break;
    }
  }
  return {d1.contiguous(), want_d2 ? d2.contiguous() : d2};
}

// s and s' of one row for the mask kinds (identity, ReLU, leaky ReLU: s'' = 0); s may be null.
template <int KIND, typename T>
void mask_row_k(const T* x, int64_t n, T q0, T* s, T* d1) {
  T c;
  if (s != nullptr)
    for (int64_t i = 0; i < n; ++i) act_eval<KIND>(x[i], q0, T(0), s[i], d1[i], c);
  else
    for (int64_t i = 0; i < n; ++i) {
      T a;
      act_eval<KIND>(x[i], q0, T(0), a, d1[i], c);
    }
}

// s' and s'' of one layer's primal pre-activations (the first B rows of A), read row by row by
// the fused loops: smooth kinds precomputed for the whole layer by act_layer, mask kinds (cheaper
// than a pass over memory) evaluated per row into the calling thread's scratch.
template <typename T>
struct Derivs {
  Act a;
  const T* P;
  int64_t d;
  T* s;             // mask kinds: s(P) is written here per row when non-null
  bool d2on;        // s'' wanted and not identically zero
  Tensor d1t, d2t;  // smooth kinds: (B, d)

  // s_out (B, d), when defined, receives s(P).
  Derivs(const Tensor& A, int64_t B, Act a_, const Tensor& s_out, bool want_d2)
      : a(a_), P(A.data_ptr<T>()), d(A.size(1)), s(nullptr), d2on(want_d2 && act_has_d2(a_.code)) {
    if (act_has_d2(a.code)) {
      std::tie(d1t, d2t) = act_layer(A.narrow(0, 0, B), a, s_out, d2on);
    } else if (s_out.defined()) {
      s = s_out.data_ptr<T>();
    }
  }

  // Row b's s' (and s'' if d2on); buf1 is d wide scratch.
  const T* d1(int64_t b, T* buf1) const {
    if (d1t.defined()) return d1t.data_ptr<T>() + b * d;
    const T* x = P + b * d;
    T* sb = s != nullptr ? s + b * d : nullptr;
    switch (a.code) {
      case kIdentity: mask_row_k<kIdentity>(x, d, T(a.q0), sb, buf1); break;
      case kRelu: mask_row_k<kRelu>(x, d, T(a.q0), sb, buf1); break;
      default: mask_row_k<kLeakyRelu>(x, d, T(a.q0), sb, buf1); break;
    }
    return buf1;
  }
  const T* d2(int64_t b) const { return d2t.data_ptr<T>() + b * d; }
};

// One layer's pre-activations as the fused loops see them.
template <typename T>
struct View {
  Tensor A;      // first B rows: primal pre-activation (bias included once the forward epilogue ran)
  const T* At;   // tangent pre-activation of (stream k, sample b) at At + k sK + b sB
  int64_t sK, sB, d;
};

// Forward epilogue: P += bias; S[0] = s(P) (if write_primal); S[k] = s'(P) * A_k.
template <typename T>
void fwd_epilogue(const View<T>& v, const Tensor& bias, const Tensor& S, bool write_primal, int64_t K, int64_t B,
                  Act a) {
  const int64_t d = v.d;
  if (bias.defined()) v.A.narrow(0, 0, B).add_(bias);
  const Derivs<T> act(v.A, B, a, write_primal ? S.narrow(0, 0, B) : Tensor(), false);
  T* Sp = S.data_ptr<T>();
  at::parallel_for(0, B, grain_rows((K + 1) * d), [&](int64_t b0, int64_t b1) {
    std::vector<T> buf(d);
    for (int64_t b = b0; b < b1; ++b) {
      const T* d1 = act.d1(b, buf.data());
      for (int64_t k = 0; k < K; ++k) {
        const T* at = v.At + k * v.sK + b * v.sB;
        T* o = Sp + ((k + 1) * B + b) * d;
        for (int64_t i = 0; i < d; ++i) o[i] = d1[i] * at[i];
      }
    }
  });
}

// Last layer of the exact estimator: P += bias, t_k = s'(P) A_k, G[b] = Gram(t) (accumulated in
// opmath, fp32 or wider); the D-wide tangent images are never written out.
template <typename T>
void gram_epilogue(const View<T>& v, const Tensor& bias, T* G, int64_t K, int64_t B, Act a) {
  using acc_t = at::opmath_type<T>;
  const int64_t d = v.d;
  if (bias.defined()) v.A.narrow(0, 0, B).add_(bias);
  const Derivs<T> act(v.A, B, a, Tensor(), false);
  at::parallel_for(0, B, grain_rows((K + 1) * d), [&](int64_t b0, int64_t b1) {
    std::vector<T> buf(d), t(K * d);
    for (int64_t b = b0; b < b1; ++b) {
      const T* d1 = act.d1(b, buf.data());
      for (int64_t k = 0; k < K; ++k) {
        const T* at = v.At + k * v.sK + b * v.sB;
        T* o = t.data() + k * d;
        for (int64_t i = 0; i < d; ++i) o[i] = d1[i] * at[i];
      }
      T* g = G + b * K * K;
      for (int64_t k = 0; k < K; ++k) {
        for (int64_t l = k; l < K; ++l) {
          const T* x = t.data() + k * d;
          const T* y = t.data() + l * d;
          acc_t s0 = 0, s1 = 0, s2 = 0, s3 = 0;
          int64_t i = 0;
          for (; i + 4 <= d; i += 4) {
            s0 += acc_t(x[i]) * acc_t(y[i]);
            s1 += acc_t(x[i + 1]) * acc_t(y[i + 1]);
            s2 += acc_t(x[i + 2]) * acc_t(y[i + 2]);
            s3 += acc_t(x[i + 3]) * acc_t(y[i + 3]);
          }
          for (; i < d; ++i) s0 += acc_t(x[i]) * acc_t(y[i]);
          const T s = T((s0 + s1) + (s2 + s3));
          g[k * K + l] = s;
          g[l * K + k] = s;
        }
      }
    }
  });
}

// Backward of the Gram epilogue given Gs = Gbar + Gbar^T: Sbar_k = sum_l Gs[k,l] t_l, then
// Abar_k = s'(p) Sbar_k and Abar_0 = s''(p) sum_k A_k Sbar_k. Writes Abar ((1 + K) B x d).
template <typename T>
void gram_backward(const View<T>& v, const T* Gs, T* Abar, int64_t K, int64_t B, Act a) {
  const int64_t d = v.d;
  const Derivs<T> act(v.A, B, a, Tensor(), true);
  at::parallel_for(0, B, grain_rows((K + 1) * d), [&](int64_t b0, int64_t b1) {
    std::vector<T> buf(d), t(K * d), acc(d);
    for (int64_t b = b0; b < b1; ++b) {
      const T* d1 = act.d1(b, buf.data());
      for (int64_t k = 0; k < K; ++k) {
        const T* at = v.At + k * v.sK + b * v.sB;
        T* o = t.data() + k * d;
        for (int64_t i = 0; i < d; ++i) o[i] = d1[i] * at[i];
      }
      std::fill(acc.begin(), acc.end(), T(0));
      const T* g = Gs + b * K * K;
      for (int64_t k = 0; k < K; ++k) {
        T* o = Abar + ((k + 1) * B + b) * d;
        std::fill(o, o + d, T(0));
        for (int64_t l = 0; l < K; ++l) {
          const T c = g[k * K + l];
          const T* x = t.data() + l * d;
          for (int64_t i = 0; i < d; ++i) o[i] += c * x[i];
        }
        if (act.d2on) {
          const T* at = v.At + k * v.sK + b * v.sB;
          for (int64_t i = 0; i < d; ++i) acc[i] += at[i] * o[i];
        }
        for (int64_t i = 0; i < d; ++i) o[i] *= d1[i];
      }
      T* o0 = Abar + b * d;
      if (act.d2on) {
        const T* d2 = act.d2(b);
        for (int64_t i = 0; i < d; ++i) o0[i] = d2[i] * acc[i];
      } else {
        std::fill(o0, o0 + d, T(0));
      }
    }
  });
}

// Backward prologue of a layer, in place on Sb ((1 + K) B x d): Abar_k = s'(p) Sbar_k and
// Abar_0 = s'(p) Sbar_0 + s''(p) sum_k A_k Sbar_k (+ extra, the Hutchinson chain's p-gradient).
template <typename T>
void bwd_prologue(const View<T>& v, T* Sb, const T* extra, int64_t K, int64_t B, Act a) {
  const int64_t d = v.d;
  const Derivs<T> act(v.A, B, a, Tensor(), true);
  at::parallel_for(0, B, grain_rows((K + 1) * d), [&](int64_t b0, int64_t b1) {
    std::vector<T> buf(d), acc(d);
    for (int64_t b = b0; b < b1; ++b) {
      const T* d1 = act.d1(b, buf.data());
      if (act.d2on) std::fill(acc.begin(), acc.end(), T(0));
      for (int64_t k = 0; k < K; ++k) {
        T* sb = Sb + ((k + 1) * B + b) * d;
        if (act.d2on) {
          const T* at = v.At + k * v.sK + b * v.sB;
          for (int64_t i = 0; i < d; ++i) acc[i] += at[i] * sb[i];
        }
        for (int64_t i = 0; i < d; ++i) sb[i] *= d1[i];
      }
      T* s0 = Sb + b * d;
      if (act.d2on) {
        const T* d2 = act.d2(b);
        for (int64_t i = 0; i < d; ++i) s0[i] = d1[i] * s0[i] + d2[i] * acc[i];
      } else {
        for (int64_t i = 0; i < d; ++i) s0[i] *= d1[i];
      }
      if (extra != nullptr) {
        const T* e = extra + b * d;
        for (int64_t i = 0; i < d; ++i) s0[i] += e[i];
      }
    }
  });
}

// Hutchinson VJP chain step: out_k = s'(p) c_k for K streams of B rows (A: the layer's saved
// pre-activations, primal block first).
template <typename T>
void gate_rows(const Tensor& A, const T* c, T* out, int64_t K, int64_t B, Act a) {
  const int64_t d = A.size(1);
  const Derivs<T> act(A, B, a, Tensor(), false);
  at::parallel_for(0, B, grain_rows(K * d), [&](int64_t b0, int64_t b1) {
    std::vector<T> buf(d);
    for (int64_t b = b0; b < b1; ++b) {
      const T* d1 = act.d1(b, buf.data());
      for (int64_t k = 0; k < K; ++k) {
        const T* x = c + (k * B + b) * d;
        T* o = out + (k * B + b) * d;
        for (int64_t i = 0; i < d; ++i) o[i] = d1[i] * x[i];
      }
    }
  });
}

// Backward of one VJP-chain step: gated = s'(p) c, grad_p = s''(p) sum_k c_k gg_k (if s'' != 0),
// gg_k <- s'(p) gg_k in place (the next cotangent gradient).
template <typename T>
void chain_backward(const Tensor& A, const T* c, T* gg, T* gated, T* grad_p, int64_t K, int64_t B, Act a) {
  const int64_t d = A.size(1);
  const Derivs<T> act(A, B, a, Tensor(), grad_p != nullptr);
  at::parallel_for(0, B, grain_rows(K * d), [&](int64_t b0, int64_t b1) {
    std::vector<T> buf(d), acc(d);
    for (int64_t b = b0; b < b1; ++b) {
      const T* d1 = act.d1(b, buf.data());
      if (act.d2on) std::fill(acc.begin(), acc.end(), T(0));
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
    }
  });
}

// ---------------------------------------------------------------------------------------------
// Argument checks (messages name the argument).

Act act_at(const ActList& acts, size_t l) { return Act{int(acts.codes[l]), acts.p0[l], acts.p1[l]}; }

void check_params(const char* op, const Tensor& z, const std::vector<Tensor>& weights, size_t n_bias,
                  const ActList& acts) {
  TORCH_CHECK(z.defined(), op, ": z is undefined");
  TORCH_CHECK(z.device().is_cpu(), op, ": z must be a CPU tensor for the cpu backend, got device ", z.device());
  TORCH_CHECK(z.scalar_type() == at::kFloat || z.scalar_type() == at::kDouble, op,
              ": z must be float32 or float64, got ", z.scalar_type());
  TORCH_CHECK(z.dim() == 2, op, ": z must have shape (B, m), got ", z.sizes());
  TORCH_CHECK(z.size(0) >= 1 && z.size(1) >= 1, op, ": z must have B >= 1 and m >= 1, got ", z.sizes());
  const size_t L = weights.size();
  TORCH_CHECK(L >= 1, op, ": weights must hold at least one layer");
  TORCH_CHECK(n_bias == L, op, ": biases has ", n_bias, " entries for ", L, " weights");
  TORCH_CHECK(acts.codes.size() == L && acts.p0.size() == L && acts.p1.size() == L, op,
              ": codes/p0/p1 must have one entry per layer (", L, "), got ", acts.codes.size(), "/",
              acts.p0.size(), "/", acts.p1.size());
  int64_t in = z.size(1);
  for (size_t l = 0; l < L; ++l) {
    const Tensor& w = weights[l];
    TORCH_CHECK(w.defined() && w.dim() == 2, op, ": weights[", l, "] must be a 2-D (d_out, d_in) tensor");
    TORCH_CHECK(w.scalar_type() == z.scalar_type(), op, ": weights[", l, "] has dtype ", w.scalar_type(),
                " but z has ", z.scalar_type());
    TORCH_CHECK(w.device().is_cpu(), op, ": weights[", l, "] must be a CPU tensor, got device ", w.device());
    TORCH_CHECK(w.size(1) == in, op, ": weights[", l, "] has ", w.size(1), " input features, expected ", in);
    TORCH_CHECK(acts.codes[l] >= 0 && acts.codes[l] < kNumKinds, op, ": codes[", l, "] = ", acts.codes[l],
                " is not an activation kind code");
    in = w.size(0);
  }
}

void check_bias(const char* op, const Tensor& w, const OptTensor& b, size_t l) {
  if (!b.has_value() || !b->defined()) return;
  TORCH_CHECK(b->dim() == 1 && b->size(0) == w.size(0), op, ": biases[", l, "] must have shape (", w.size(0),
              ",), got ", b->sizes());
  TORCH_CHECK(b->scalar_type() == w.scalar_type(), op, ": biases[", l, "] has dtype ", b->scalar_type(),
              " but weights[", l, "] has ", w.scalar_type());
  TORCH_CHECK(b->device().is_cpu(), op, ": biases[", l, "] must be a CPU tensor, got device ", b->device());
}

std::vector<Tensor> contig(const std::vector<Tensor>& xs) {
  std::vector<Tensor> out;
  out.reserve(xs.size());
  for (const auto& x : xs) out.push_back(x.contiguous());
  return out;
}

std::vector<Tensor> contig_bias(const char* op, const std::vector<Tensor>& w, const std::vector<OptTensor>& bs) {
  std::vector<Tensor> out;
  for (size_t l = 0; l < bs.size(); ++l) {
    check_bias(op, w[l], bs[l], l);
    out.push_back(bs[l].has_value() && bs[l]->defined() ? bs[l]->contiguous() : Tensor());
  }
  return out;
}

template <typename T>
View<T> stacked_view(const Tensor& A, int64_t B) {
  const int64_t d = A.size(1);
  return View<T>{A, A.data_ptr<T>() + B * d, B * d, d, d};
}

}  // namespace

// =============================================================================================
// Exact pullback metric H = J^T J.

std::tuple<Tensor, std::vector<Tensor>> mlp_pullback_forward(
    const Tensor& z_in, const std::vector<Tensor>& weights_in, const std::vector<OptTensor>& biases_in,
    const ActList& acts) {
  const char* op = "isofast mlp_pullback (cpu)";
  check_params(op, z_in, weights_in, biases_in.size(), acts);
  const Tensor z = z_in.contiguous();
  const std::vector<Tensor> W = contig(weights_in);
  const std::vector<Tensor> bias = contig_bias(op, W, biases_in);
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
      gram_epilogue<T>(v1, Tensor(), H.data_ptr<T>(), K, B, act_at(acts, 0));
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
        gram_epilogue<T>(v, bias[l], H.data_ptr<T>(), K, B, act_at(acts, l));
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
    const ActList& acts, const std::vector<Tensor>& saved) {
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
    gram_backward<T>(view(L - 1), Gs.data_ptr<T>(), Abar.data_ptr<T>(), K, B, act_at(acts, L - 1));
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

// =============================================================================================
// Hutchinson statistics ||J v||^2 and ||J^T J v||^2.

std::tuple<Tensor, std::vector<Tensor>> mlp_hutchinson_forward(
    const Tensor& z_in, const Tensor& probes_in, const std::vector<Tensor>& weights_in,
    const std::vector<OptTensor>& biases_in, const ActList& acts) {
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
  const size_t L = W.size();
  Tensor stats = at::empty({B, K, 2}, z_in.options());
  std::vector<Tensor> saved;
  saved.reserve(4 * L + 2);
  AT_DISPATCH_FLOATING_TYPES(z_in.scalar_type(), "isofast_mlp_hutchinson_forward", [&] {
    using T = scalar_t;
    using acc_t = at::opmath_type<T>;
    Tensor S = at::cat({z_in.unsqueeze(0), probes_in.transpose(0, 1)}, 0).reshape({(K + 1) * B, m}).contiguous();
    for (size_t l = 0; l < L; ++l) {
      Tensor A = at::mm(S, W[l].t());
      saved.push_back(S);
      saved.push_back(A);
      Tensor Sn = at::empty_like(A);
      fwd_epilogue<T>(stacked_view<T>(A, B), bias[l], Sn, l + 1 < L, K, B,
                      act_at(acts, l));
      S = Sn;
    }
    const int64_t D = W[L - 1].size(0);
    const Tensor t = S.narrow(0, B, K * B);
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
    T* out = stats.data_ptr<T>();
    at::parallel_for(0, B, grain_rows(K * (D + m)), [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b)
        for (int64_t k = 0; k < K; ++k) {
          const T* x = tp + (k * B + b) * D;
          const T* y = cp + (k * B + b) * m;
          acc_t q = 0, r = 0;
          for (int64_t i = 0; i < D; ++i) q += acc_t(x[i]) * acc_t(x[i]);
          for (int64_t i = 0; i < m; ++i) r += acc_t(y[i]) * acc_t(y[i]);
          out[(b * K + k) * 2] = T(q);
          out[(b * K + k) * 2 + 1] = T(r);
        }
    });
  });
  return {stats, saved};
}

std::tuple<Tensor, std::vector<Tensor>, std::vector<Tensor>> mlp_hutchinson_backward(
    const Tensor& grad_stats, const std::vector<Tensor>& weights_in, const std::vector<bool>& has_bias,
    const ActList& acts, const std::vector<Tensor>& saved) {
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
    // dL/dS_L: zero primal block, tangent block 2 gq t + cbar_L.
    const int64_t D = W[L - 1].size(0);
    Tensor Sb = at::empty({(K + 1) * B, D}, t.options());
    {
      T* sb = Sb.data_ptr<T>();
      const T* tp = t.data_ptr<T>();
      const T* cp = grad_c.data_ptr<T>();
      const T* q = gq.data_ptr<T>();
      std::fill(sb, sb + B * D, T(0));
      at::parallel_for(0, K * B, grain_rows(D), [&](int64_t r0, int64_t r1) {
        for (int64_t r = r0; r < r1; ++r) {
          const T f = T(2) * q[r];
          T* o = sb + (B + r) * D;
          const T* x = tp + r * D;
          const T* y = cp + r * D;
          for (int64_t i = 0; i < D; ++i) o[i] = f * x[i] + y[i];
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
