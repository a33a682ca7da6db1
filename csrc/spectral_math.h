// Per-matrix spectral math for small symmetric matrices (m <= kMaxDim), written once and run by
// both the CPU loops (spectral_cpu.cpp) and the CUDA kernels (cuda/spectral_kernels.cu).
// Everything computes in double. Matrices are dense row-major m x m.
//
// Eigen-decompositions (eigenvectors needed: logdet's gradient, Hbar^{-1/2}) and eigenvalues of
// matrices up to kJacobiMaxDim come from the cyclic Jacobi method with the relative-accuracy
// threshold of Demmel & Veselic (an off-diagonal a_pq is annihilated unless
// |a_pq| <= eps sqrt(|a_pp a_qq|)), which keeps small eigenvalues of ill-conditioned positive
// definite matrices accurate. Eigenvalues alone of larger matrices come from Householder
// tridiagonalisation and implicit QL (about (4/3) m^3 flops against Jacobi's ~ 8 m^3 per sweep),
// accurate to about eps ||H|| absolutely, as LAPACK's.
#pragma once

#include "isofast_common.h"

namespace isofast {
namespace spectral {

constexpr int kMaxDim = 32;
constexpr int kMaxSweeps = 64;
constexpr int kJacobiMaxDim = 4;
constexpr int kMaxQLIterations = 64;

// Load the symmetric part 0.5 (H + H^T) of one matrix into the double work array a (m x m).
template <typename T>
ISOFAST_HD void load_sym(const T* h, int m, double* a) {
  for (int i = 0; i < m; ++i) {
    a[i * m + i] = double(h[i * m + i]);
    for (int j = i + 1; j < m; ++j) {
      const double v = 0.5 * (double(h[i * m + j]) + double(h[j * m + i]));
      a[i * m + j] = v;
      a[j * m + i] = v;
    }
  }
}

// Cyclic Jacobi on the symmetric a (m x m, destroyed). Eigenvalues in ascending order go to w;
// when v is not null it receives the eigenvectors as columns (v[i*m + k] = component i of vector
// k). Returns the number of sweeps taken.
ISOFAST_HD int jacobi_eigh(double* a, int m, double* w, double* v) {
  const double eps = DBL_EPSILON;
  if (v != nullptr) {
    for (int i = 0; i < m * m; ++i) v[i] = 0.0;
    for (int i = 0; i < m; ++i) v[i * m + i] = 1.0;
  }
  double scale = 0.0;
  for (int i = 0; i < m * m; ++i) scale = fmax(scale, mathx::abs_(a[i]));
  // Off-diagonals below this absolute level are rounding noise of a singular matrix.
  const double floor_abs = scale * eps * eps;
  int sweep = 0;
  for (; sweep < kMaxSweeps; ++sweep) {
    int rotations = 0;
    for (int p = 0; p < m - 1; ++p) {
      for (int q = p + 1; q < m; ++q) {
        const double apq = a[p * m + q];
        if (apq == 0.0) continue;
        const double app = a[p * m + p];
        const double aqq = a[q * m + q];
        const double aa = mathx::abs_(apq);
        if (aa <= eps * mathx::sqrt_(mathx::abs_(app * aqq)) || aa <= floor_abs) {
          a[p * m + q] = 0.0;
          a[q * m + p] = 0.0;
          continue;
        }
        ++rotations;
        const double theta = (aqq - app) / (2.0 * apq);
        double t;
        if (mathx::abs_(theta) > 1e150) {
          t = 0.5 / theta;
        } else {
          t = 1.0 / (mathx::abs_(theta) + mathx::sqrt_(theta * theta + 1.0));
          if (theta < 0.0) t = -t;
        }
        const double c = 1.0 / mathx::sqrt_(t * t + 1.0);
        const double s = t * c;
        const double tau = s / (1.0 + c);
        a[p * m + p] = app - t * apq;
        a[q * m + q] = aqq + t * apq;
        a[p * m + q] = 0.0;
        a[q * m + p] = 0.0;
        for (int r = 0; r < m; ++r) {
          if (r == p || r == q) continue;
          const double g = a[r * m + p];
          const double h = a[r * m + q];
          const double np = g - s * (h + g * tau);
          const double nq = h + s * (g - h * tau);
          a[r * m + p] = np;
          a[p * m + r] = np;
          a[r * m + q] = nq;
          a[q * m + r] = nq;
        }
        if (v != nullptr) {
          for (int r = 0; r < m; ++r) {
            const double g = v[r * m + p];
            const double h = v[r * m + q];
            v[r * m + p] = g - s * (h + g * tau);
            v[r * m + q] = h + s * (g - h * tau);
          }
        }
      }
    }
    if (rotations == 0) break;
  }
  for (int i = 0; i < m; ++i) w[i] = a[i * m + i];
  // Insertion sort, ascending, carrying the eigenvectors along.
  for (int i = 1; i < m; ++i) {
    const double key = w[i];
    int j = i - 1;
    while (j >= 0 && w[j] > key) {
      w[j + 1] = w[j];
      if (v != nullptr)
        for (int r = 0; r < m; ++r) {
          const double tmp = v[r * m + j + 1];
          v[r * m + j + 1] = v[r * m + j];
          v[r * m + j] = tmp;
        }
      --j;
    }
    w[j + 1] = key;
  }
  return sweep;
}

// Eigenvalues (ascending) of the symmetric a (m x m, destroyed) by Householder reduction to
// tridiagonal form and the implicit QL method with Wilkinson shifts. e: m doubles of scratch.
ISOFAST_HD void tridiag_ql_eigvals(double* a, int m, double* d, double* e) {
  const double eps = DBL_EPSILON;
  for (int i = m - 1; i > 0; --i) {
    const int l = i - 1;
    double h = 0.0;
    if (l > 0) {
      double scale = 0.0;
      for (int k = 0; k <= l; ++k) scale += mathx::abs_(a[i * m + k]);
      if (scale == 0.0) {
        e[i] = a[i * m + l];
      } else {
        for (int k = 0; k <= l; ++k) {
          a[i * m + k] /= scale;
          h += a[i * m + k] * a[i * m + k];
        }
        double f = a[i * m + l];
        double g = f >= 0.0 ? -mathx::sqrt_(h) : mathx::sqrt_(h);
        e[i] = scale * g;
        h -= f * g;
        a[i * m + l] = f - g;
        f = 0.0;
        for (int j = 0; j <= l; ++j) {
          g = 0.0;
          for (int k = 0; k <= j; ++k) g += a[j * m + k] * a[i * m + k];
          for (int k = j + 1; k <= l; ++k) g += a[k * m + j] * a[i * m + k];
          e[j] = g / h;
          f += e[j] * a[i * m + j];
        }
        const double hh = f / (h + h);
        for (int j = 0; j <= l; ++j) {
          f = a[i * m + j];
          g = e[j] - hh * f;
          e[j] = g;
          for (int k = 0; k <= j; ++k) a[j * m + k] -= f * e[k] + g * a[i * m + k];
        }
      }
    } else {
      e[i] = a[i * m + l];
    }
  }
  for (int i = 0; i < m; ++i) d[i] = a[i * m + i];
  // Implicit QL on the tridiagonal (d, e).
  for (int i = 1; i < m; ++i) e[i - 1] = e[i];
  e[m - 1] = 0.0;
  for (int l = 0; l < m; ++l) {
    int iter = 0;
    int mm;
    do {
      for (mm = l; mm < m - 1; ++mm) {
        const double dd = mathx::abs_(d[mm]) + mathx::abs_(d[mm + 1]);
        if (mathx::abs_(e[mm]) <= eps * dd) break;
      }
      if (mm != l) {
        if (iter++ == kMaxQLIterations) break;
        double g = (d[l + 1] - d[l]) / (2.0 * e[l]);
        double r = mathx::sqrt_(g * g + 1.0);
        g = d[mm] - d[l] + e[l] / (g + (g >= 0.0 ? r : -r));
        double s = 1.0, c = 1.0, p = 0.0;
        int i;
        for (i = mm - 1; i >= l; --i) {
          double f = s * e[i];
          const double b = c * e[i];
          r = mathx::sqrt_(f * f + g * g);
          e[i + 1] = r;
          if (r == 0.0) {
            d[i + 1] -= p;
            e[mm] = 0.0;
            break;
          }
          s = f / r;
          c = g / r;
          g = d[i + 1] - p;
          r = (d[i] - g) * s + 2.0 * c * b;
          p = s * r;
          d[i + 1] = g + p;
          g = c * r - b;
        }
        if (r == 0.0 && i >= l) continue;
        d[l] -= p;
        e[l] = g;
        e[mm] = 0.0;
      }
    } while (mm != l);
  }
  for (int i = 1; i < m; ++i) {  // insertion sort, ascending
    const double key = d[i];
    int j = i - 1;
    while (j >= 0 && d[j] > key) {
      d[j + 1] = d[j];
      --j;
    }
    d[j + 1] = key;
  }
}

// Eigenvalues (ascending) of the symmetric double a (destroyed); e: m doubles of scratch.
ISOFAST_HD void sym_eigvals(double* a, int m, double* w, double* e) {
  if (m <= kJacobiMaxDim) {
    jacobi_eigh(a, m, w, nullptr);
    return;
  }
  // Scale to max |a_ij| = 1 so the QL rotations' plain sqrt(f^2 + g^2) cannot overflow.
  double scale = 0.0;
  for (int i = 0; i < m * m; ++i) scale = fmax(scale, mathx::abs_(a[i]));
  if (scale == 0.0 || !(scale < (double)INFINITY)) {
    jacobi_eigh(a, m, w, nullptr);
    return;
  }
  const double inv = 1.0 / scale;
  for (int i = 0; i < m * m; ++i) a[i] *= inv;
  tridiag_ql_eigvals(a, m, w, e);
  for (int i = 0; i < m; ++i) w[i] *= scale;
}

// Eigenvalues (ascending) of the symmetric part of h; work: m*m + m doubles.
template <typename T>
ISOFAST_HD void eigvalsh(const T* h, int m, double* w, double* work) {
  load_sym(h, m, work);
  sym_eigvals(work, m, w, work + m * m);
}

// log det of the symmetric part of h, eigenvalues floored at `tiny` (finfo(dtype).tiny); when
// grad is not null it receives d logdet / dH = U diag(1/lambda, 0 where floored) U^T.
template <typename T>
ISOFAST_HD double logdet(const T* h, int m, double tiny, T* grad, double* work, double* w, double* v) {
  load_sym(h, m, work);
  jacobi_eigh(work, m, w, grad != nullptr ? v : nullptr);
  double acc = 0.0;
  for (int i = 0; i < m; ++i) acc += mathx::log_(w[i] > tiny ? w[i] : tiny);
  if (grad != nullptr) {
    for (int i = 0; i < m; ++i) {
      for (int j = i; j < m; ++j) {
        double g = 0.0;
        for (int k = 0; k < m; ++k)
          if (w[k] > tiny) g += v[i * m + k] * v[j * m + k] / w[k];
        grad[i * m + j] = T(g);
        grad[j * m + i] = T(g);
      }
    }
  }
  return acc;
}

// lambda_max / lambda_min, or +inf when lambda_min <= 0.
template <typename T>
ISOFAST_HD double condition_number(const T* h, int m, double* work, double* w) {
  eigvalsh(h, m, w, work);
  return w[0] > 0.0 ? w[m - 1] / w[0] : (double)INFINITY;
}

// S = Hbar^{-1/2} from the symmetric mean hbar (double m x m). Returns false when Hbar is not
// positive definite (S then uses 1 in place of the offending eigenvalues, as the torch twin).
ISOFAST_HD bool inv_sqrt(const double* hbar, int m, double* S, double* work, double* w, double* v) {
  for (int i = 0; i < m * m; ++i) work[i] = hbar[i];
  jacobi_eigh(work, m, w, v);
  bool ok = true;
  for (int k = 0; k < m; ++k) {
    if (!(w[k] > 0.0)) ok = false;
    w[k] = w[k] > 0.0 ? 1.0 / mathx::sqrt_(w[k]) : 1.0;
  }
  for (int i = 0; i < m; ++i)
    for (int j = 0; j < m; ++j) {
      double g = 0.0;
      for (int k = 0; k < m; ++k) g += v[i * m + k] * w[k] * v[j * m + k];
      S[i * m + j] = g;
    }
  return ok;
}

// sum_i log^2 lambda_i(S H S) for the symmetric part of h and S = Hbar^{-1/2}; +inf when a
// generalised eigenvalue is <= 0.
template <typename T>
ISOFAST_HD double airm_sq(const T* h, const double* S, int m, double* work, double* tmp, double* w) {
  load_sym(h, m, work);
  // tmp = H S
  for (int i = 0; i < m; ++i)
    for (int j = 0; j < m; ++j) {
      double g = 0.0;
      for (int k = 0; k < m; ++k) g += work[i * m + k] * S[k * m + j];
      tmp[i * m + j] = g;
    }
  // work = S (H S), symmetrised
  for (int i = 0; i < m; ++i)
    for (int j = 0; j < m; ++j) {
      double g = 0.0;
      for (int k = 0; k < m; ++k) g += S[i * m + k] * tmp[k * m + j];
      work[i * m + j] = g;
    }
  for (int i = 0; i < m; ++i)
    for (int j = i + 1; j < m; ++j) {
      const double s = 0.5 * (work[i * m + j] + work[j * m + i]);
      work[i * m + j] = s;
      work[j * m + i] = s;
    }
  sym_eigvals(work, m, w, tmp);
  double acc = 0.0;
  for (int i = 0; i < m; ++i) {
    if (!(w[i] > 0.0)) return (double)INFINITY;
    const double l = mathx::log_(w[i]);
    acc += l * l;
  }
  return acc;
}

}  // namespace spectral
}  // namespace isofast
