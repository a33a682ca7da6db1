// Host-side launchers of the CUDA kernels: plain C++ over raw device pointers and a stream, so
// the .cu files need only <cuda_runtime.h> and the shared math headers (no torch, no cuBLAS);
// the torch binding lives in cuda_ops.cpp. Each returns the launch's cudaError_t.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace isofast {
namespace cuda {

// Batched spectral ops on B symmetric m x m matrices (m <= 32); T is float or double.
template <typename T>
cudaError_t eigvalsh(const T* H, T* out, int64_t B, int m, cudaStream_t stream);
template <typename T>
cudaError_t logdet(const T* H, T* out, T* grad /* nullable */, int64_t B, int m, double tiny, cudaStream_t stream);
template <typename T>
cudaError_t condition_numbers(const T* H, T* out, int64_t B, int m, cudaStream_t stream);
// mean: the symmetric mean Hbar (double, m x m, on the device); S_work: m*m doubles + 1 flag.
template <typename T>
cudaError_t airm_sq_to_mean(const T* H, const double* mean, double* S_work, T* out, int64_t B, int m,
                            cudaStream_t stream);

// Reductions of the generic path: G[b] = X[b] X[b]^T for X (B, K, D), and ||X[b, k]||^2.
// Accumulate in float for float/half inputs and double for double (acc_t below).
template <typename T, typename Acc>
cudaError_t gram(const T* X, Acc* G, int64_t B, int K, int64_t D, cudaStream_t stream);
template <typename T, typename Acc>
cudaError_t sqnorm(const T* X, Acc* out, int64_t B, int K, int64_t D, cudaStream_t stream);

// Fused MLP epilogues on the stream-major layout (1 + K blocks of B rows of width d); see
// ../cpu/mlp_stream.h for the math. A's first B rows become p = A_0 + bias in place.
template <typename T>
cudaError_t mlp_forward_epilogue(T* A, const T* bias, T* S, int64_t K, int64_t B, int64_t d, int code, double coef,
                                 double threshold, bool write_primal, cudaStream_t stream);
// In place on Sb: Abar_k = s'(p) Sbar_k, Abar_0 = s'(p) Sbar_0 + s''(p) sum_k A_k Sbar_k + extra.
template <typename T>
cudaError_t mlp_backward_prologue(const T* A, T* Sb, const T* extra, int64_t K, int64_t B, int64_t d, int code,
                                  double coef, double threshold, cudaStream_t stream);

}  // namespace cuda
}  // namespace isofast
