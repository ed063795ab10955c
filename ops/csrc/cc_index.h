// Criss-cross attention index maths, shared by the CPU and the CUDA kernels.
//
// Huang et al., "CCNet: Criss-Cross Attention for Semantic Segmentation" (ICCV 2019).
// Every pixel (y, x) of an H x W map attends to the L = H + W - 1 pixels of its row and
// column, itself counted once. The attention map has shape (N, L, H, W):
//   slot s <  W : the row pixel    (y, s)         -- the centre pixel is slot s == x
//   slot s >= W : the column pixel (k, x) with k = column_pixel(s - W, y), which skips
//                 k == y, so the centre is never counted twice.
// Every kernel of this extension goes through these functions, so the CPU tests exercise
// the same index logic the GPU runs.
#pragma once

#include <cstdint>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define CC_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define CC_HOST_DEVICE inline
#endif

namespace ccnet_ops {

// Number of attention slots of a pixel.
CC_HOST_DEVICE int64_t num_slots(int64_t H, int64_t W) { return H + W - 1; }

// Key row of column slot j (0 <= j < H - 1) for a query on row y.
CC_HOST_DEVICE int64_t column_pixel(int64_t j, int64_t y) { return j < y ? j : j + 1; }

// Column slot j of key row k (k != y) for a query on row y: the inverse of column_pixel.
CC_HOST_DEVICE int64_t column_slot(int64_t k, int64_t y) { return k < y ? k : k - 1; }

// Offset of attention element (s, y, x) inside one image of a contiguous (L, H, W) map.
CC_HOST_DEVICE int64_t attn_offset(int64_t s, int64_t y, int64_t x, int64_t H, int64_t W) {
  return (s * H + y) * W + x;
}

// Offset, inside one channel plane (H, W), of the key pixel that slot s of query (y, x) reads.
CC_HOST_DEVICE int64_t slot_pixel(int64_t s, int64_t y, int64_t x, int64_t W) {
  return s < W ? y * W + s : column_pixel(s - W, y) * W + x;
}

// Offset of the attention weight that links query row q_row to key row k_row (k_row != q_row)
// in image column x: slot W + column_slot(k_row, q_row) of query pixel (q_row, x).
CC_HOST_DEVICE int64_t column_weight_offset(int64_t k_row, int64_t q_row, int64_t x,
                                            int64_t H, int64_t W) {
  return attn_offset(W + column_slot(k_row, q_row), q_row, x, H, W);
}

}  // namespace ccnet_ops
