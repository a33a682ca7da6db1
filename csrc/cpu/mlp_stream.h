// The CPU multi-stream layer shared by the mlp_pullback and mlp_hutchinson ops (docs/maths.md
// section 4).
//
// Streams are stream-major, (1 + K) blocks of B rows (block 0 = primal), so each layer is ONE
// ATen GEMM over the stacked (1 + K) B rows; everything elementwise (bias, activation, s'(p)
// gating, the backward's s'' terms, the final Gram) is a fused loop over samples,
// for_each_sample below, run with at::parallel_for. s', s'' of smooth activations are computed
// per layer by ATen ops first (see act_layer); ReLU-like masks are evaluated inside the loops.
//
// Tangent pre-activations of a layer are addressed as At + k * sK + b * sB. For a GEMM output
// A ((1 + K) B x d) that is At = A + B d, sK = B d, sB = d; for the exact estimator's first layer
// (identity seeds) the tangent pre-activation of stream k is column k of W_1 for every sample,
// so At = W_1^T (m x d), sK = d, sB = 0 and no GEMM runs for the tangent streams.
//
// A diagonal data-space metric W = diag(w) (the ops' data_weight) enters the last layer only: the
// epilogues take a pointer w to D weights, nullptr for W = I (then no loop touches it).
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <tuple>
#include <utility>
#include <vector>

#include "../activation_math.h"
#include "../ops.h"

namespace isofast {
namespace cpu {

// One layer's activation: kind code and its parameters (activation_math.h says which).
struct Act {
  int code;
  double coef, threshold;
};

inline Act act_at(const ActList& acts, size_t l) {
  return Act{int(acts.codes[l]), acts.coefs[l], acts.thresholds[l]};
}

// s (into s_out when it is defined), s', s'' (when want_d2) of a whole layer's primal
// pre-activations x (B, d), for the smooth kinds (act_has_d2). Defined in mlp_stream.cpp.
std::pair<Tensor, Tensor> act_layer(const Tensor& x, Act a, Tensor s_out, bool want_d2);

// s and s' of one row for the mask kinds (identity, ReLU, leaky ReLU: s'' = 0); s may be null.
// Two loops rather than a branch per element, so that each one vectorises.
template <int KIND, typename T>
void mask_row(const T* x, int64_t n, T coef, T* s, T* d1) {
  T d2;
  if (s != nullptr) {
    for (int64_t i = 0; i < n; ++i) act_eval<KIND>(x[i], coef, T(0), s[i], d1[i], d2);
  } else {
    for (int64_t i = 0; i < n; ++i) {
      T unused;
      act_eval<KIND>(x[i], coef, T(0), unused, d1[i], d2);
    }
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

  // Row b's s' (and s'' if d2on); row is d wide scratch.
  const T* d1(int64_t b, T* row) const {
    if (d1t.defined()) return d1t.data_ptr<T>() + b * d;
    const T* x = P + b * d;
    T* sb = s != nullptr ? s + b * d : nullptr;
    switch (a.code) {
      case kIdentity: mask_row<kIdentity>(x, d, T(a.coef), sb, row); break;
      case kRelu: mask_row<kRelu>(x, d, T(a.coef), sb, row); break;
      default: mask_row<kLeakyRelu>(x, d, T(a.coef), sb, row); break;
    }
    return row;
  }
  const T* d2(int64_t b) const { return d2t.data_ptr<T>() + b * d; }
};

// Parallel grain (samples or rows per task) for loops that touch `per_row` elements a row.
inline int64_t grain_rows(int64_t per_row) {
  constexpr int64_t kGrainElems = 8192;
  return std::max<int64_t>(1, kGrainElems / std::max<int64_t>(1, per_row));
}

// The per-sample stream loop of every fused epilogue and prologue: body(b, d1, scratch) for each
// sample b < B, in parallel, with d1 = s'(p_b) (d wide) and n_scratch elements of per-thread
// scratch; work is the elements one sample touches (it sets the parallel grain).
template <typename T, typename Body>
void for_each_sample(const Derivs<T>& act, int64_t B, int64_t work, int64_t n_scratch, const Body& body) {
  at::parallel_for(0, B, grain_rows(work), [&](int64_t b0, int64_t b1) {
    std::vector<T> row(act.d), scratch(n_scratch);
    for (int64_t b = b0; b < b1; ++b) body(b, act.d1(b, row.data()), scratch.data());
  });
}

// One layer's pre-activations as the fused loops see them.
template <typename T>
struct View {
  Tensor A;      // first B rows: primal pre-activation (bias included once the forward epilogue ran)
  const T* At;   // tangent pre-activation of (stream k, sample b) at At + k sK + b sB
  int64_t sK, sB, d;

  const T* tangent(int64_t k, int64_t b) const { return At + k * sK + b * sB; }
};

template <typename T>
View<T> stacked_view(const Tensor& A, int64_t B) {
  const int64_t d = A.size(1);
  return View<T>{A, A.data_ptr<T>() + B * d, B * d, d, d};
}

// out_k = d1 * x_k for K rows of width d: x_k at x + k x_step, out_k at out + k out_step.
template <typename T>
inline void gate(const T* d1, const T* x, int64_t x_step, T* out, int64_t out_step, int64_t K, int64_t d) {
  for (int64_t k = 0; k < K; ++k) {
    const T* xk = x + k * x_step;
    T* ok = out + k * out_step;
    for (int64_t i = 0; i < d; ++i) ok[i] = d1[i] * xk[i];
  }
}

// <x, y> over n entries, accumulated in opmath (fp32 or wider) with four partial sums.
template <typename T>
inline at::opmath_type<T> dot(const T* x, const T* y, int64_t n) {
  using acc_t = at::opmath_type<T>;
  acc_t s0 = 0, s1 = 0, s2 = 0, s3 = 0;
  int64_t i = 0;
  for (; i + 4 <= n; i += 4) {
    s0 += acc_t(x[i]) * acc_t(y[i]);
    s1 += acc_t(x[i + 1]) * acc_t(y[i + 1]);
    s2 += acc_t(x[i + 2]) * acc_t(y[i + 2]);
    s3 += acc_t(x[i + 3]) * acc_t(y[i + 3]);
  }
  for (; i < n; ++i) s0 += acc_t(x[i]) * acc_t(y[i]);
  return (s0 + s1) + (s2 + s3);
}

// x_k *= w for K rows of width d at x + k x_step (the data-space weight of the tangent rows).
template <typename T>
inline void scale_rows(const T* w, T* x, int64_t x_step, int64_t K, int64_t d) {
  for (int64_t k = 0; k < K; ++k) {
    T* xk = x + k * x_step;
    for (int64_t i = 0; i < d; ++i) xk[i] *= w[i];
  }
}

// sum_i w_i x_i y_i over n entries (the weighted inner product), accumulated as dot above.
template <typename T>
inline at::opmath_type<T> dot(const T* w, const T* x, const T* y, int64_t n) {
  using acc_t = at::opmath_type<T>;
  acc_t s0 = 0, s1 = 0, s2 = 0, s3 = 0;
  int64_t i = 0;
  for (; i + 4 <= n; i += 4) {
    s0 += acc_t(w[i]) * acc_t(x[i]) * acc_t(y[i]);
    s1 += acc_t(w[i + 1]) * acc_t(x[i + 1]) * acc_t(y[i + 1]);
    s2 += acc_t(w[i + 2]) * acc_t(x[i + 2]) * acc_t(y[i + 2]);
    s3 += acc_t(w[i + 3]) * acc_t(x[i + 3]) * acc_t(y[i + 3]);
  }
  for (; i < n; ++i) s0 += acc_t(w[i]) * acc_t(x[i]) * acc_t(y[i]);
  return (s0 + s1) + (s2 + s3);
}

// Forward epilogue: P += bias; S[0] = s(P) (if write_primal); S[k] = s'(P) * A_k.
template <typename T>
void fwd_epilogue(const View<T>& v, const Tensor& bias, const Tensor& S, bool write_primal, int64_t K, int64_t B,
                  Act a) {
  const int64_t d = v.d;
  if (bias.defined()) v.A.narrow(0, 0, B).add_(bias);
  const Derivs<T> act(v.A, B, a, write_primal ? S.narrow(0, 0, B) : Tensor(), false);
  T* Sp = S.data_ptr<T>();
  for_each_sample(act, B, (K + 1) * d, 0, [&](int64_t b, const T* d1, T*) {
    gate(d1, v.tangent(0, b), v.sK, Sp + (B + b) * d, B * d, K, d);
  });
}

// Backward through the gates of sample b, in place on its rows of Sb ((1 + K) B x d):
// Abar_k = s'(p) Sbar_k and Abar_0 = s'(p) Sbar_0 + s''(p) sum_k A_k Sbar_k (+ extra, the
// Hutchinson chain's p-gradient, when non-null). acc: d wide scratch.
template <typename T>
void gate_backward(const View<T>& v, const Derivs<T>& act, int64_t b, const T* d1, T* Sb, const T* extra, int64_t K,
                   int64_t B, T* acc) {
  const int64_t d = v.d;
  if (act.d2on) std::fill(acc, acc + d, T(0));
  for (int64_t k = 0; k < K; ++k) {
    T* sb = Sb + ((k + 1) * B + b) * d;
    if (act.d2on) {
      const T* at = v.tangent(k, b);
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

// Backward prologue of a layer: gate_backward for every sample.
template <typename T>
void bwd_prologue(const View<T>& v, T* Sb, const T* extra, int64_t K, int64_t B, Act a) {
  const Derivs<T> act(v.A, B, a, Tensor(), true);
  for_each_sample(act, B, (K + 1) * v.d, v.d,
                  [&](int64_t b, const T* d1, T* acc) { gate_backward(v, act, b, d1, Sb, extra, K, B, acc); });
}

// ---------------------------------------------------------------------------------------------
// Argument checks (messages name the argument) and contiguous copies. Defined in mlp_stream.cpp.

void check_params(const char* op, const Tensor& z, const std::vector<Tensor>& weights, size_t n_bias,
                  const ActList& acts);
std::vector<Tensor> contig(const std::vector<Tensor>& xs);
// The biases, checked against the weights, contiguous; an undefined tensor for a layer without.
std::vector<Tensor> contig_bias(const char* op, const std::vector<Tensor>& w, const std::vector<OptTensor>& bs);
// The data-space weight checked against the output width D and z's dtype, contiguous; an
// undefined tensor when absent (W = I).
Tensor contig_data_weight(const char* op, const OptTensor& w, int64_t D, at::ScalarType dtype);
// Its data pointer, nullptr when undefined.
template <typename T>
inline const T* data_ptr_or_null(const Tensor& x) {
  return x.defined() ? x.data_ptr<T>() : nullptr;
}

}  // namespace cpu
}  // namespace isofast
