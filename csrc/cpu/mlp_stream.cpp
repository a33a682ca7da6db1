// Shared pieces of the CPU multi-stream layer (see mlp_stream.h): the smooth activations'
// layer-wide derivatives and the argument checks of both MLP ops.

#include "mlp_stream.h"

namespace isofast {
namespace cpu {

// act_eval's formulas as ATen ops, so that exp / tanh / erf run in ATen's vectorised kernels (a
// scalar libm call per element in the fused loops made them slower than the unfused torch twin).
std::pair<Tensor, Tensor> act_layer(const Tensor& x, Act a, Tensor s_out, bool want_d2) {
  const double coef = a.coef, threshold = a.threshold;
  Tensor d1, d2;
  switch (a.code) {
    case kElu: {
      const Tensor pos = x > 0;
      const Tensor e = at::expm1(x.clamp_max(0)).mul_(coef);
      if (s_out.defined()) at::where_out(s_out, pos, x, e);
      d1 = e.add_(coef);  // s' = s'' = e + alpha where x <= 0
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
      const Tensor linear = x * coef > threshold;
      const Tensor sg = at::sigmoid(x * coef);
      if (s_out.defined()) at::softplus_out(s_out, x, coef, threshold);  // x where linear, as act_eval
      if (want_d2) d2 = (coef * sg * (1 - sg)).masked_fill_(linear, 0);
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

namespace {

void check_bias(const char* op, const Tensor& w, const OptTensor& b, size_t l) {
  if (!b.has_value() || !b->defined()) return;
  TORCH_CHECK(b->dim() == 1 && b->size(0) == w.size(0), op, ": biases[", l, "] must have shape (", w.size(0),
              ",), got ", b->sizes());
  TORCH_CHECK(b->scalar_type() == w.scalar_type(), op, ": biases[", l, "] has dtype ", b->scalar_type(),
              " but weights[", l, "] has ", w.scalar_type());
  TORCH_CHECK(b->device().is_cpu(), op, ": biases[", l, "] must be a CPU tensor, got device ", b->device());
}

}  // namespace

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
  TORCH_CHECK(acts.codes.size() == L && acts.coefs.size() == L && acts.thresholds.size() == L, op,
              ": codes/coefs/thresholds must have one entry per layer (", L, "), got ", acts.codes.size(), "/",
              acts.coefs.size(), "/", acts.thresholds.size());
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

Tensor contig_data_weight(const char* op, const OptTensor& w, int64_t D, at::ScalarType dtype) {
  if (!w.has_value() || !w->defined()) return Tensor();
  TORCH_CHECK(w->dim() == 1 && w->size(0) == D, op, ": data_weight must have shape (", D,
              ",) (the MLP's output width), got ", w->sizes());
  TORCH_CHECK(w->scalar_type() == dtype, op, ": data_weight has dtype ", w->scalar_type(), " but z has ", dtype);
  TORCH_CHECK(w->device().is_cpu(), op, ": data_weight must be a CPU tensor, got device ", w->device());
  return w->contiguous();
}

}  // namespace cpu
}  // namespace isofast
