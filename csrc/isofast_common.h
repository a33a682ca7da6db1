// Shared by the C++ (g++) and CUDA (nvcc) builds: no torch, no CUDA toolkit headers.
#pragma once

#if defined(__CUDACC__)
#define ISOFAST_HD __host__ __device__ __forceinline__
#else
#define ISOFAST_HD inline
#endif

#include <math.h>
#include <float.h>

namespace isofast {
namespace mathx {
// Overloads that resolve to the same libm / CUDA math calls on host and device.
ISOFAST_HD float exp_(float x) { return ::expf(x); }
ISOFAST_HD double exp_(double x) { return ::exp(x); }
ISOFAST_HD float expm1_(float x) { return ::expm1f(x); }
ISOFAST_HD double expm1_(double x) { return ::expm1(x); }
ISOFAST_HD float log1p_(float x) { return ::log1pf(x); }
ISOFAST_HD double log1p_(double x) { return ::log1p(x); }
ISOFAST_HD float log_(float x) { return ::logf(x); }
ISOFAST_HD double log_(double x) { return ::log(x); }
ISOFAST_HD float tanh_(float x) { return ::tanhf(x); }
ISOFAST_HD double tanh_(double x) { return ::tanh(x); }
ISOFAST_HD float erf_(float x) { return ::erff(x); }
ISOFAST_HD double erf_(double x) { return ::erf(x); }
ISOFAST_HD float sqrt_(float x) { return ::sqrtf(x); }
ISOFAST_HD double sqrt_(double x) { return ::sqrt(x); }
ISOFAST_HD double hypot_(double x, double y) { return ::hypot(x, y); }
ISOFAST_HD float abs_(float x) { return ::fabsf(x); }
ISOFAST_HD double abs_(double x) { return ::fabs(x); }
}  // namespace mathx
}  // namespace isofast
