// The GEMM of the compiled ops on raw pointers.
#pragma once

#include <torch/extension.h>

#include <algorithm>
#include <limits>
#include <type_traits>

// Row-major C (m x n) = op(A) (m x k) @ op(B) (k x n) + beta * C, leading
// dimensions lda, ldb, ldc: the Fortran BLAS GEMM that libtorch itself calls
// (MKL or OpenBLAS), called directly: at::mm_out on per-tile tensor views
// cost 3-6% of a whole layer step at C = 64, 56x56 in views and dispatch.
extern "C" {
void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
            const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
            const float* beta, float* c, const int* ldc);
void dgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
            const double* alpha, const double* a, const int* lda, const double* b, const int* ldb,
            const double* beta, double* c, const int* ldc);
}

template <typename scalar_t>
void gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, const scalar_t* a, int64_t lda,
          const scalar_t* b, int64_t ldb, scalar_t beta, scalar_t* c, int64_t ldc) {
  // column-major BLAS computes C^T = op(B)^T op(A)^T from the same memory
  const char ta = trans_b ? 'T' : 'N', tb = trans_a ? 'T' : 'N';
  TORCH_CHECK(std::max({m, n, k, lda, ldb, ldc}) <= std::numeric_limits<int>::max(),
              "a GEMM exceeds BLAS's 32-bit sizes");
  const int M = static_cast<int>(n), N = static_cast<int>(m), K = static_cast<int>(k);
  const int LDA = static_cast<int>(ldb), LDB = static_cast<int>(lda), LDC = static_cast<int>(ldc);
  const scalar_t one = 1;
  if constexpr (std::is_same_v<scalar_t, float>) {
    sgemm_(&ta, &tb, &M, &N, &K, &one, b, &LDA, a, &LDB, &beta, c, &LDC);
  } else {
    dgemm_(&ta, &tb, &M, &N, &K, &one, b, &LDA, a, &LDB, &beta, c, &LDC);
  }
}
