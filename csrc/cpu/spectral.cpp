// CPU batched spectral ops: at::parallel_for over the batch, each matrix through the per-matrix
// math of spectral_math.h (the same code the CUDA kernels run).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <limits>

#include "../ops.h"
#include "../spectral_math.h"

namespace isofast {
namespace {

using spectral::kMaxDim;

Tensor check_spd_batch(const char* op, const Tensor& H) {
  TORCH_CHECK(H.defined(), op, ": H is undefined");
  TORCH_CHECK(H.device().is_cpu(), op, ": H must be a CPU tensor here, got device ", H.device());
  TORCH_CHECK(H.scalar_type() == at::kFloat || H.scalar_type() == at::kDouble, op,
              ": H must be float32 or float64, got ", H.scalar_type());
  TORCH_CHECK(H.dim() == 3 && H.size(1) == H.size(2), op,
              ": H must have shape (B, m, m) (a batch of square matrices), got ", H.sizes());
  TORCH_CHECK(H.size(1) >= 1 && H.size(1) <= kMaxDim, op, ": H must have 1 <= m <= ", kMaxDim, ", got m = ",
              H.size(1));
  return H.contiguous();
}

constexpr int64_t kGrain = 16;

}  // namespace

Tensor spectral_eigvalsh(const Tensor& H_in) {
  const Tensor H = check_spd_batch("isofast eigvalsh", H_in);
  const int64_t B = H.size(0), m = H.size(1);
  Tensor out = at::empty({B, m}, H.options());
  AT_DISPATCH_FLOATING_TYPES(H.scalar_type(), "isofast_eigvalsh", [&] {
    const scalar_t* h = H.data_ptr<scalar_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    at::parallel_for(0, B, kGrain, [&](int64_t b0, int64_t b1) {
      double work[kMaxDim * kMaxDim + kMaxDim], w[kMaxDim];
      for (int64_t b = b0; b < b1; ++b) {
        spectral::eigvalsh(h + b * m * m, int(m), w, work);
        for (int64_t i = 0; i < m; ++i) o[b * m + i] = scalar_t(w[i]);
      }
    });
  });
  return out;
}

std::tuple<Tensor, Tensor> spectral_logdet(const Tensor& H_in, bool with_grad) {
  const Tensor H = check_spd_batch("isofast logdet", H_in);
  const int64_t B = H.size(0), m = H.size(1);
  Tensor out = at::empty({B}, H.options());
  Tensor grad = with_grad ? at::empty_like(H) : Tensor();
  AT_DISPATCH_FLOATING_TYPES(H.scalar_type(), "isofast_logdet", [&] {
    const double tiny = double(std::numeric_limits<scalar_t>::min());
    const scalar_t* h = H.data_ptr<scalar_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    scalar_t* g = with_grad ? grad.data_ptr<scalar_t>() : nullptr;
    at::parallel_for(0, B, kGrain, [&](int64_t b0, int64_t b1) {
      double work[kMaxDim * kMaxDim], v[kMaxDim * kMaxDim], w[kMaxDim];
      for (int64_t b = b0; b < b1; ++b)
        o[b] = scalar_t(spectral::logdet(h + b * m * m, int(m), tiny, g ? g + b * m * m : nullptr, work, w, v));
    });
  });
  return {out, grad};
}

Tensor spectral_condition_numbers(const Tensor& H_in) {
  const Tensor H = check_spd_batch("isofast condition_numbers", H_in);
  const int64_t B = H.size(0), m = H.size(1);
  Tensor out = at::empty({B}, H.options());
  AT_DISPATCH_FLOATING_TYPES(H.scalar_type(), "isofast_condition_numbers", [&] {
    const scalar_t* h = H.data_ptr<scalar_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    at::parallel_for(0, B, kGrain, [&](int64_t b0, int64_t b1) {
      double work[kMaxDim * kMaxDim + kMaxDim], w[kMaxDim];
      for (int64_t b = b0; b < b1; ++b) o[b] = scalar_t(spectral::condition_number(h + b * m * m, int(m), work, w));
    });
  });
  return out;
}

Tensor spectral_airm_sq_to_mean(const Tensor& H_in) {
  const Tensor H = check_spd_batch("isofast airm_sq_to_mean", H_in);
  const int64_t B = H.size(0), m = H.size(1);
  // The mean of the symmetric parts, in float64 (one small reduction).
  const Tensor H64 = H.to(at::kDouble);
  const Tensor mean = ((H64 + H64.transpose(1, 2)) * 0.5).mean(0).contiguous();
  double S[kMaxDim * kMaxDim], work[kMaxDim * kMaxDim], v[kMaxDim * kMaxDim], w[kMaxDim];
  const bool mean_ok = spectral::inv_sqrt(mean.data_ptr<double>(), int(m), S, work, w, v);
  Tensor out = at::empty({B}, H.options());
  AT_DISPATCH_FLOATING_TYPES(H.scalar_type(), "isofast_airm_sq_to_mean", [&] {
    const scalar_t* h = H.data_ptr<scalar_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    at::parallel_for(0, B, kGrain, [&](int64_t b0, int64_t b1) {
      double wk[kMaxDim * kMaxDim], tmp[kMaxDim * kMaxDim], ww[kMaxDim];
      for (int64_t b = b0; b < b1; ++b)
        o[b] = mean_ok ? scalar_t(spectral::airm_sq(h + b * m * m, S, int(m), wk, tmp, ww))
                       : std::numeric_limits<scalar_t>::infinity();
    });
  });
  return out;
}

}  // namespace isofast
