// CUDA kernels of the batched spectral ops: one thread per matrix, running exactly the per-matrix
// functions of ../spectral_math.h that the CPU build runs.

#include <cuda_runtime.h>

#include "../spectral_math.h"
#include "launchers.h"

namespace isofast {
namespace cuda {
namespace {

using spectral::kMaxDim;
constexpr int kThreads = 64;

inline unsigned blocks_for(int64_t n) { return unsigned((n + kThreads - 1) / kThreads); }

template <typename T>
__global__ void eigvalsh_kernel(const T* H, T* out, int64_t B, int m) {
  const int64_t b = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (b >= B) return;
  double work[kMaxDim * kMaxDim + kMaxDim], w[kMaxDim];
  spectral::eigvalsh(H + b * m * m, m, w, work);
  for (int i = 0; i < m; ++i) out[b * m + i] = T(w[i]);
}

template <typename T>
__global__ void logdet_kernel(const T* H, T* out, T* grad, int64_t B, int m, double tiny) {
  const int64_t b = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (b >= B) return;
  double work[kMaxDim * kMaxDim], v[kMaxDim * kMaxDim], w[kMaxDim];
  out[b] = T(spectral::logdet(H + b * m * m, m, tiny, grad != nullptr ? grad + b * m * m : nullptr, work, w, v));
}

template <typename T>
__global__ void condition_kernel(const T* H, T* out, int64_t B, int m) {
  const int64_t b = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (b >= B) return;
  double work[kMaxDim * kMaxDim + kMaxDim], w[kMaxDim];
  out[b] = T(spectral::condition_number(H + b * m * m, m, work, w));
}

__global__ void inv_sqrt_kernel(const double* mean, double* S_work, int m) {
  if (blockIdx.x != 0 || threadIdx.x != 0) return;
  double work[kMaxDim * kMaxDim], v[kMaxDim * kMaxDim], w[kMaxDim];
  const bool ok = spectral::inv_sqrt(mean, m, S_work, work, w, v);
  S_work[m * m] = ok ? 1.0 : 0.0;
}

template <typename T>
__global__ void airm_kernel(const T* H, const double* S_work, T* out, int64_t B, int m) {
  const int64_t b = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (b >= B) return;
  if (S_work[m * m] == 0.0) {
    out[b] = T(INFINITY);
    return;
  }
  double work[kMaxDim * kMaxDim], tmp[kMaxDim * kMaxDim], w[kMaxDim];
  out[b] = T(spectral::airm_sq(H + b * m * m, S_work, m, work, tmp, w));
}

}  // namespace

template <typename T>
cudaError_t eigvalsh(const T* H, T* out, int64_t B, int m, cudaStream_t stream) {
  if (B > 0) eigvalsh_kernel<T><<<blocks_for(B), kThreads, 0, stream>>>(H, out, B, m);
  return cudaGetLastError();
}

template <typename T>
cudaError_t logdet(const T* H, T* out, T* grad, int64_t B, int m, double tiny, cudaStream_t stream) {
  if (B > 0) logdet_kernel<T><<<blocks_for(B), kThreads, 0, stream>>>(H, out, grad, B, m, tiny);
  return cudaGetLastError();
}

template <typename T>
cudaError_t condition_numbers(const T* H, T* out, int64_t B, int m, cudaStream_t stream) {
  if (B > 0) condition_kernel<T><<<blocks_for(B), kThreads, 0, stream>>>(H, out, B, m);
  return cudaGetLastError();
}

template <typename T>
cudaError_t airm_sq_to_mean(const T* H, const double* mean, double* S_work, T* out, int64_t B, int m,
                            cudaStream_t stream) {
  inv_sqrt_kernel<<<1, 1, 0, stream>>>(mean, S_work, m);
  if (B > 0) airm_kernel<T><<<blocks_for(B), kThreads, 0, stream>>>(H, S_work, out, B, m);
  return cudaGetLastError();
}

#define ISOFAST_INSTANTIATE(T)                                                                         \
  template cudaError_t eigvalsh<T>(const T*, T*, int64_t, int, cudaStream_t);                          \
  template cudaError_t logdet<T>(const T*, T*, T*, int64_t, int, double, cudaStream_t);                \
  template cudaError_t condition_numbers<T>(const T*, T*, int64_t, int, cudaStream_t);                 \
  template cudaError_t airm_sq_to_mean<T>(const T*, const double*, double*, T*, int64_t, int, cudaStream_t);
ISOFAST_INSTANTIATE(float)
ISOFAST_INSTANTIATE(double)
#undef ISOFAST_INSTANTIATE

}  // namespace cuda
}  // namespace isofast
