// Elementwise activations s, s', s'' (isofast/activations.py is the specification; the kind
// numbering is activations.KINDS). Used per element by the CUDA kernels; the CPU loops use it for
// the mask kinds only (cpu/mlp_stream.cpp's act_layer evaluates the smooth ones with ATen ops).
#pragma once

#include "isofast_common.h"

namespace isofast {

enum ActKind : int {
  kIdentity = 0,
  kRelu = 1,
  kLeakyRelu = 2,
  kElu = 3,
  kSilu = 4,
  kSoftplus = 5,
  kTanh = 6,
  kSigmoid = 7,
  kGelu = 8,
  kGeluTanh = 9,
  kNumKinds = 10,
};

// Whether s'' is not identically zero (the tangent pre-activations must then be kept).
ISOFAST_HD bool act_has_d2(int code) { return !(code == kIdentity || code == kRelu || code == kLeakyRelu); }

template <typename T>
ISOFAST_HD T sigmoid_(T x) {
  return T(1) / (T(1) + mathx::exp_(-x));
}

// (s, s', s'') of one element. coef, threshold: Activation.params (coef = leaky ReLU slope, ELU
// alpha or softplus beta; threshold = softplus threshold; 0 where unused).
template <int KIND, typename T>
ISOFAST_HD void act_eval(T x, T coef, T threshold, T& s, T& d1, T& d2) {
  using namespace mathx;
  if (KIND == kIdentity) {
    s = x; d1 = T(1); d2 = T(0);
  } else if (KIND == kRelu) {
    const bool pos = x > T(0);
    s = pos ? x : T(0); d1 = pos ? T(1) : T(0); d2 = T(0);
  } else if (KIND == kLeakyRelu) {
    const bool pos = x > T(0);
    s = pos ? x : x * coef; d1 = pos ? T(1) : coef; d2 = T(0);
  } else if (KIND == kElu) {
    if (x > T(0)) {
      s = x; d1 = T(1); d2 = T(0);
    } else {
      const T e = coef * expm1_(x);
      s = e; d1 = e + coef; d2 = e + coef;
    }
  } else if (KIND == kSilu) {
    const T sg = sigmoid_(x);
    s = x * sg;
    d1 = sg * (T(1) + x * (T(1) - sg));
    d2 = sg * (T(1) - sg) * (T(2) + x * (T(1) - T(2) * sg));
  } else if (KIND == kSoftplus) {
    const T bx = x * coef;
    if (bx > threshold) {
      s = x; d1 = T(1); d2 = T(0);
    } else {
      const T sg = sigmoid_(bx);
      s = log1p_(exp_(bx)) / coef; d1 = sg; d2 = coef * sg * (T(1) - sg);
    }
  } else if (KIND == kTanh) {
    const T t = tanh_(x);
    s = t; d1 = T(1) - t * t; d2 = T(-2) * t * d1;
  } else if (KIND == kSigmoid) {
    const T sg = sigmoid_(x);
    s = sg; d1 = sg * (T(1) - sg); d2 = d1 * (T(1) - T(2) * sg);
  } else if (KIND == kGelu) {
    const T cdf = T(0.5) * (T(1) + erf_(x * T(0.70710678118654752440)));
    const T pdf = T(0.39894228040143267794) * exp_(T(-0.5) * x * x);
    s = x * cdf; d1 = cdf + x * pdf; d2 = pdf * (T(2) - x * x);
  } else {  // kGeluTanh
    const T k0 = T(0.79788456080286535588);  // sqrt(2 / pi)
    const T c = T(0.044715);
    const T u = k0 * (x + c * x * x * x);
    const T du = k0 * (T(1) + T(3) * c * x * x);
    const T ddu = k0 * T(6) * c * x;
    const T t = tanh_(u);
    const T sech2 = T(1) - t * t;
    s = T(0.5) * x * (T(1) + t);
    d1 = T(0.5) * (T(1) + t) + T(0.5) * x * sech2 * du;
    d2 = sech2 * du + T(0.5) * x * (sech2 * ddu - T(2) * t * sech2 * du * du);
  }
}

// Runtime dispatch on the kind code (used per element on the GPU).
template <typename T>
ISOFAST_HD void act_eval_dyn(int code, T x, T coef, T threshold, T& s, T& d1, T& d2) {
  switch (code) {
    case kIdentity: act_eval<kIdentity>(x, coef, threshold, s, d1, d2); break;
    case kRelu: act_eval<kRelu>(x, coef, threshold, s, d1, d2); break;
    case kLeakyRelu: act_eval<kLeakyRelu>(x, coef, threshold, s, d1, d2); break;
    case kElu: act_eval<kElu>(x, coef, threshold, s, d1, d2); break;
    case kSilu: act_eval<kSilu>(x, coef, threshold, s, d1, d2); break;
    case kSoftplus: act_eval<kSoftplus>(x, coef, threshold, s, d1, d2); break;
    case kTanh: act_eval<kTanh>(x, coef, threshold, s, d1, d2); break;
    case kSigmoid: act_eval<kSigmoid>(x, coef, threshold, s, d1, d2); break;
    case kGelu: act_eval<kGelu>(x, coef, threshold, s, d1, d2); break;
    default: act_eval<kGeluTanh>(x, coef, threshold, s, d1, d2); break;
  }
}

}  // namespace isofast
