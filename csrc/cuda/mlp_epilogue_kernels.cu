// CUDA epilogues of the multi-stream MLP (docs/maths.md section 4), one thread per (sample, feature),
// looping over the K tangent streams; the activation math is ../activation_math.h, shared with
// the CPU loops.

#include <cuda_runtime.h>

#include "../activation_math.h"
#include "launchers.h"

namespace isofast {
namespace cuda {
namespace {

constexpr int kThreads = 256;

template <typename T>
__global__ void forward_epilogue_kernel(T* A, const T* bias, T* S, int64_t K, int64_t B, int64_t d, int code, T coef,
                                        T threshold, bool write_primal) {
  const int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= B * d) return;
  const int64_t i = idx % d;
  T p = A[idx];
  if (bias != nullptr) p += bias[i];
  A[idx] = p;
  T s, d1, d2;
  act_eval_dyn<T>(code, p, coef, threshold, s, d1, d2);
  if (write_primal) S[idx] = s;
  for (int64_t k = 1; k <= K; ++k) S[k * B * d + idx] = d1 * A[k * B * d + idx];
}

template <typename T>
__global__ void backward_prologue_kernel(const T* A, T* Sb, const T* extra, int64_t K, int64_t B, int64_t d, int code,
                                         T coef, T threshold) {
  const int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= B * d) return;
  T s, d1, d2;
  act_eval_dyn<T>(code, A[idx], coef, threshold, s, d1, d2);
  const bool d2on = act_has_d2(code);
  T acc = T(0);
  for (int64_t k = 1; k <= K; ++k) {
    const int64_t j = k * B * d + idx;
    if (d2on) acc += A[j] * Sb[j];
    Sb[j] *= d1;
  }
  T g = d1 * Sb[idx];
  if (d2on) g += d2 * acc;
  if (extra != nullptr) g += extra[idx];
  Sb[idx] = g;
}

inline unsigned blocks_for(int64_t n) { return unsigned((n + kThreads - 1) / kThreads); }

}  // namespace

template <typename T>
cudaError_t mlp_forward_epilogue(T* A, const T* bias, T* S, int64_t K, int64_t B, int64_t d, int code, double coef,
                                 double threshold, bool write_primal, cudaStream_t stream) {
  if (B * d > 0)
    forward_epilogue_kernel<T><<<blocks_for(B * d), kThreads, 0, stream>>>(A, bias, S, K, B, d, code, T(coef),
                                                                            T(threshold), write_primal);
  return cudaGetLastError();
}

template <typename T>
cudaError_t mlp_backward_prologue(const T* A, T* Sb, const T* extra, int64_t K, int64_t B, int64_t d, int code,
                                  double coef, double threshold, cudaStream_t stream) {
  if (B * d > 0)
    backward_prologue_kernel<T><<<blocks_for(B * d), kThreads, 0, stream>>>(A, Sb, extra, K, B, d, code, T(coef),
                                                                             T(threshold));
  return cudaGetLastError();
}

template cudaError_t mlp_forward_epilogue<float>(float*, const float*, float*, int64_t, int64_t, int64_t, int, double,
                                                 double, bool, cudaStream_t);
template cudaError_t mlp_forward_epilogue<double>(double*, const double*, double*, int64_t, int64_t, int64_t, int,
                                                  double, double, bool, cudaStream_t);
template cudaError_t mlp_backward_prologue<float>(const float*, float*, const float*, int64_t, int64_t, int64_t, int,
                                                  double, double, cudaStream_t);
template cudaError_t mlp_backward_prologue<double>(const double*, double*, const double*, int64_t, int64_t, int64_t,
                                                   int, double, double, cudaStream_t);

}  // namespace cuda
}  // namespace isofast
