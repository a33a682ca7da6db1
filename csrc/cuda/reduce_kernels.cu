// CUDA reductions of the generic path: per-sample Gram of (B, K, D) tangent images and their
// squared norms (the traces Tr H = sum_k ||J v_k||^2 / K), accumulated in float or wider.

#include <cuda_runtime.h>

#include "launchers.h"

namespace isofast {
namespace cuda {
namespace {

constexpr int kThreads = 256;

template <typename Acc>
__device__ Acc block_sum(Acc v, Acc* shared) {
  for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  const int warps = (blockDim.x + 31) >> 5;
  v = threadIdx.x < warps ? shared[threadIdx.x] : Acc(0);
  if (warp == 0)
    for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
  __syncthreads();
  return v;
}

// One block per (b, k, l) with k <= l.
template <typename T, typename Acc>
__global__ void gram_kernel(const T* X, Acc* G, int K, int64_t D) {
  __shared__ Acc shared[32];
  const int64_t b = blockIdx.y;
  int pair = blockIdx.x, k = 0;
  while (pair >= K - k) {
    pair -= K - k;
    ++k;
  }
  const int l = k + pair;
  const T* x = X + (b * K + k) * D;
  const T* y = X + (b * K + l) * D;
  Acc acc = 0;
  for (int64_t i = threadIdx.x; i < D; i += blockDim.x) acc += Acc(x[i]) * Acc(y[i]);
  acc = block_sum(acc, shared);
  if (threadIdx.x == 0) {
    G[(b * K + k) * K + l] = acc;
    G[(b * K + l) * K + k] = acc;
  }
}

template <typename T, typename Acc>
__global__ void sqnorm_kernel(const T* X, Acc* out, int64_t D) {
  __shared__ Acc shared[32];
  const int64_t row = blockIdx.x;
  const T* x = X + row * D;
  Acc acc = 0;
  for (int64_t i = threadIdx.x; i < D; i += blockDim.x) acc += Acc(x[i]) * Acc(x[i]);
  acc = block_sum(acc, shared);
  if (threadIdx.x == 0) out[row] = acc;
}

}  // namespace

template <typename T, typename Acc>
cudaError_t gram(const T* X, Acc* G, int64_t B, int K, int64_t D, cudaStream_t stream) {
  if (B > 0 && K > 0) {
    const dim3 grid(unsigned(K * (K + 1) / 2), unsigned(B));
    gram_kernel<T, Acc><<<grid, kThreads, 0, stream>>>(X, G, K, D);
  }
  return cudaGetLastError();
}

template <typename T, typename Acc>
cudaError_t sqnorm(const T* X, Acc* out, int64_t B, int K, int64_t D, cudaStream_t stream) {
  if (B > 0 && K > 0) sqnorm_kernel<T, Acc><<<unsigned(B * K), kThreads, 0, stream>>>(X, out, D);
  return cudaGetLastError();
}

template cudaError_t gram<float, float>(const float*, float*, int64_t, int, int64_t, cudaStream_t);
template cudaError_t gram<double, double>(const double*, double*, int64_t, int, int64_t, cudaStream_t);
template cudaError_t sqnorm<float, float>(const float*, float*, int64_t, int, int64_t, cudaStream_t);
template cudaError_t sqnorm<double, double>(const double*, double*, int64_t, int, int64_t, cudaStream_t);

}  // namespace cuda
}  // namespace isofast
