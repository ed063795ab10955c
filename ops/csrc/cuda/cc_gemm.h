// Batched matrix products over strided views, planned as one cuBLAS strided-batched GEMM.
//
// The criss-cross contractions (cc_kernels.cuh) are, per image, batches of small matrix products
// over views of the NCHW maps: the rows of an image are a batch with a stride of W elements, the
// columns (of an H/W-transposed copy) a batch with a stride of H. plan_gemm turns such a product,
// written with the views' element strides, into the arguments of cublasGemmStridedBatchedEx
// (column-major operands, op(X) = X or X^T, leading dimensions), or fails if no such call
// exists. The CUDA build runs the plan with cuBLAS; the host emulation runs the same plan with
// cuBLAS's column-major semantics, so the planning is tested without a GPU.
#pragma once

#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdint>
#include <utility>

namespace ccnet_ops {

// A batch of (rows x cols) matrices: element (i, j) of matrix b at b * batch + i * row + j * col.
struct Strides {
  int64_t row, col, batch;
};

// The arguments of cublas<T>gemmStridedBatched: C[b] = op(A[b]) op(B[b]) for b < batch, with
// column-major X(i, j) = X[i + j * ldx]; op(A) is m x k, op(B) is k x n, C is m x n.
// swap: A and B of the plan are the product's B and A (C computed as its transpose).
struct GemmPlan {
  bool trans_a, trans_b, swap;
  int64_t m, n, k, lda, ldb, ldc, stride_a, stride_b, stride_c, batch;
};

namespace detail {

// Whether a rows x cols matrix with these strides is column-major with a valid leading
// dimension (>= rows), and that leading dimension. A dimension of size 1 has no stride to obey.
inline bool column_major(int64_t rows, int64_t cols, int64_t row_stride, int64_t col_stride, int64_t* ld) {
  if (rows != 1 && row_stride != 1) return false;
  const int64_t need = std::max<int64_t>(rows, 1);
  if (cols == 1) {
    *ld = need;
    return true;
  }
  if (col_stride < need) return false;
  *ld = col_stride;
  return true;
}

// op and leading dimension of a (rows x cols) operand: as stored (column-major), or the
// transpose of a column-major (cols x rows) matrix.
inline bool operand(int64_t rows, int64_t cols, const Strides& s, bool* trans, int64_t* ld) {
  if (column_major(rows, cols, s.row, s.col, ld)) {
    *trans = false;
    return true;
  }
  if (column_major(cols, rows, s.col, s.row, ld)) {
    *trans = true;
    return true;
  }
  return false;
}

inline bool try_plan(int64_t batch, int64_t M, int64_t N, int64_t K, const Strides& a, const Strides& b,
                     const Strides& c, bool swap, GemmPlan* plan) {
  GemmPlan p{};
  p.swap = swap;
  p.m = M, p.n = N, p.k = K, p.batch = batch;
  p.stride_a = a.batch, p.stride_b = b.batch, p.stride_c = c.batch;
  if (!column_major(M, N, c.row, c.col, &p.ldc)) return false;
  if (!operand(M, K, a, &p.trans_a, &p.lda)) return false;
  if (!operand(K, N, b, &p.trans_b, &p.ldb)) return false;
  *plan = p;
  return true;
}

}  // namespace detail

// cuBLAS's own argument rules (leading dimensions at least the stored rows), for both builds.
inline void check_plan(const GemmPlan& p) {
  TORCH_INTERNAL_ASSERT(p.m >= 1 && p.n >= 1 && p.k >= 1 && p.batch >= 1, "cc_gemm: empty product");
  TORCH_INTERNAL_ASSERT(p.lda >= (p.trans_a ? p.k : p.m) && p.ldb >= (p.trans_b ? p.n : p.k) && p.ldc >= p.m,
                        "cc_gemm: leading dimension below the stored rows");
}

// C[b] (M x N) = A[b] (M x K) B[b] (K x N) for b < batch, as one strided-batched GEMM. When C is
// not column-major, computes C^T = B^T A^T instead (swap: the plan's A is the product's B).
inline GemmPlan plan_gemm(int64_t batch, int64_t M, int64_t N, int64_t K, const Strides& a, const Strides& b,
                          const Strides& c) {
  GemmPlan plan{};
  if (detail::try_plan(batch, M, N, K, a, b, c, false, &plan)) return plan;
  const Strides at{a.col, a.row, a.batch}, bt{b.col, b.row, b.batch}, ct{c.col, c.row, c.batch};
  if (detail::try_plan(batch, N, M, K, bt, at, ct, true, &plan)) return plan;
  TORCH_INTERNAL_ASSERT(false, "cc_gemm: no strided-batched GEMM computes this product (M=", M, ", N=", N,
                        ", K=", K, ")");
  return plan;
}

}  // namespace ccnet_ops
