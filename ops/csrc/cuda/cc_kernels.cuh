// Criss-cross attention: the CUDA kernels of the three primitives and their host wrappers (see
// ../cc_attention.cpp), shared by two builds so that the code the GPU runs is the code tested:
//   cc_attention_cuda.cu           nvcc: launches on the current CUDA stream;
//   emulation/cc_emulation.cpp     g++ with cuda_emulation.h: runs every thread of the same grid
//                                  one after another on the host, so a machine without a GPU
//                                  checks the kernels (tests/test_cuda_emulation.py).
// The including file defines, before including this header,
//   CC_LAUNCH(kernel, blocks, threads, ...)   launches kernel<<<blocks, threads>>>(...);
//   CC_DEVICE_GUARD(device)                   makes `device` current for the scope.
//
// float32, float64, float16 and bfloat16, accumulating in float32 (float64 for float64).
// Threads run along x, the contiguous dimension, so loads of feature maps and attention maps
// coalesce; each thread keeps a small group of outputs in registers and reuses every load
// it makes across that group. No atomics: every output has one owner thread, so results are
// deterministic.
#pragma once

#if !defined(CC_LAUNCH) || !defined(CC_DEVICE_GUARD)
#error "define CC_LAUNCH and CC_DEVICE_GUARD before including cc_kernels.cuh"
#endif

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>

#include <algorithm>
#include <cstdint>

#include "../cc_checks.h"
#include "../cc_index.h"

namespace ccnet_ops {
namespace {

constexpr int kThreads = 256;
constexpr int kGroup = 8;                    // slots (energy) or channels (aggregate, scatter) per thread
constexpr int64_t kMaxBlocks = 1 << 20;      // the CUDA build's grid cap: grid-stride beyond

// Blocks of kThreads covering `items`, at most max_blocks (the emulation lowers the cap so
// that each thread runs its grid-stride loop many times).
inline unsigned int num_blocks(int64_t items, int64_t max_blocks) {
  const int64_t blocks = (items + kThreads - 1) / kThreads;
  return static_cast<unsigned int>(std::min<int64_t>(blocks, max_blocks));
}

// Work items of each kernel: one per (n, group, y, x).
inline int64_t energy_items(int64_t N, int64_t H, int64_t W) {
  return N * ((num_slots(H, W) + kGroup - 1) / kGroup) * H * W;
}
inline int64_t mix_items(int64_t N, int64_t C, int64_t H, int64_t W) {
  return N * ((C + kGroup - 1) / kGroup) * H * W;
}

// A thread's work item: image n, group g (of slots or channels) and pixel (y, x), x fastest so
// neighbouring threads read neighbouring addresses.
struct Item {
  int64_t n, g, y, x;
};

__device__ __forceinline__ Item decode(int64_t item, int64_t groups, int64_t H, int64_t W) {
  const int64_t plane = H * W;
  return {item / (plane * groups), (item / plane) % groups, (item / W) % H, item % W};
}

// Grid-stride loop over `items` work items.
#define CC_FOR_EACH_ITEM(item, items)                                                  \
  for (int64_t item = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; item < (items); \
       item += int64_t(gridDim.x) * blockDim.x)

// One thread per (n, slot group, y, x): e[n, s, y, x] = sum_c a[n, c, y, x] * b[n, c, p_s(y, x)].
template <typename scalar_t>
__global__ void energy_kernel(const scalar_t* __restrict__ a, const scalar_t* __restrict__ b,
                              scalar_t* __restrict__ e, int64_t N, int64_t C, int64_t H, int64_t W) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t L = num_slots(H, W), plane = H * W, groups = (L + kGroup - 1) / kGroup;
  CC_FOR_EACH_ITEM(item, N * groups * plane) {
    const auto [n, g, y, x] = decode(item, groups, H, W);
    const int64_t s0 = g * kGroup;
    int64_t pix[kGroup];
#pragma unroll
    for (int j = 0; j < kGroup; ++j) pix[j] = s0 + j < L ? slot_pixel(s0 + j, y, x, W) : y * W + x;
    acc_t acc[kGroup] = {};
    const scalar_t* an = a + n * C * plane + y * W + x;
    const scalar_t* bn = b + n * C * plane;
    for (int64_t c = 0; c < C; ++c) {
      const acc_t av = static_cast<acc_t>(an[c * plane]);
#pragma unroll
      for (int j = 0; j < kGroup; ++j) acc[j] += av * static_cast<acc_t>(bn[c * plane + pix[j]]);
    }
#pragma unroll
    for (int j = 0; j < kGroup; ++j)
      if (s0 + j < L) e[n * L * plane + attn_offset(s0 + j, y, x, H, W)] = static_cast<scalar_t>(acc[j]);
  }
}

// One thread per (n, channel group, y, x): out[n, c, y, x] = sum_s w[n, s, y, x] * v[n, c, p_s(y, x)].
template <typename scalar_t>
__global__ void aggregate_kernel(const scalar_t* __restrict__ w, const scalar_t* __restrict__ v,
                                 scalar_t* __restrict__ out, int64_t N, int64_t C, int64_t H, int64_t W) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t L = num_slots(H, W), plane = H * W, groups = (C + kGroup - 1) / kGroup;
  CC_FOR_EACH_ITEM(item, N * groups * plane) {
    const auto [n, g, y, x] = decode(item, groups, H, W);
    const int64_t c0 = g * kGroup;
    const int64_t cn = C - c0 < kGroup ? C - c0 : kGroup;
    const scalar_t* wn = w + n * L * plane;
    const scalar_t* vn = v + (n * C + c0) * plane;
    acc_t acc[kGroup] = {};
    for (int64_t s = 0; s < L; ++s) {
      const acc_t wv = static_cast<acc_t>(wn[attn_offset(s, y, x, H, W)]);
      const int64_t p = slot_pixel(s, y, x, W);
#pragma unroll
      for (int j = 0; j < kGroup; ++j)
        if (j < cn) acc[j] += wv * static_cast<acc_t>(vn[j * plane + p]);
    }
#pragma unroll
    for (int j = 0; j < kGroup; ++j)
      if (j < cn) out[(n * C + c0 + j) * plane + y * W + x] = static_cast<scalar_t>(acc[j]);
  }
}

// One thread per (n, channel group, key pixel (k, x)), gathering every query that reads it:
//   r[n, c, k, x] = sum_{x'} w[n, x, k, x'] * g[n, c, k, x']                 (row slots)
//                 + sum_{y != k} w[n, W + column_slot(k, y), y, x] * g[n, c, y, x]   (column slots)
template <typename scalar_t>
__global__ void scatter_kernel(const scalar_t* __restrict__ w, const scalar_t* __restrict__ g,
                               scalar_t* __restrict__ r, int64_t N, int64_t C, int64_t H, int64_t W) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t L = num_slots(H, W), plane = H * W, groups = (C + kGroup - 1) / kGroup;
  CC_FOR_EACH_ITEM(item, N * groups * plane) {
    const auto [n, grp, k, x] = decode(item, groups, H, W);  // k: the key pixel's row
    const int64_t c0 = grp * kGroup;
    const int64_t cn = C - c0 < kGroup ? C - c0 : kGroup;
    const scalar_t* wn = w + n * L * plane;
    const scalar_t* gn = g + (n * C + c0) * plane;
    acc_t acc[kGroup] = {};
    for (int64_t xq = 0; xq < W; ++xq) {  // queries (k, xq) whose row slot x is this pixel
      const acc_t wv = static_cast<acc_t>(wn[attn_offset(x, k, xq, H, W)]);
#pragma unroll
      for (int j = 0; j < kGroup; ++j)
        if (j < cn) acc[j] += wv * static_cast<acc_t>(gn[j * plane + k * W + xq]);
    }
    for (int64_t y = 0; y < H; ++y) {  // queries (y, x), y != k, whose column slot is this pixel
      if (y == k) continue;
      const acc_t wv = static_cast<acc_t>(wn[column_weight_offset(k, y, x, H, W)]);
#pragma unroll
      for (int j = 0; j < kGroup; ++j)
        if (j < cn) acc[j] += wv * static_cast<acc_t>(gn[j * plane + y * W + x]);
    }
#pragma unroll
    for (int j = 0; j < kGroup; ++j)
      if (j < cn) r[(n * C + c0 + j) * plane + k * W + x] = static_cast<scalar_t>(acc[j]);
  }
}

#define CC_DISPATCH(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, TYPE, NAME, __VA_ARGS__)

// e (N, H + W - 1, H, W) from query a and key b (N, C', H, W), on a grid of at most max_blocks.
at::Tensor launch_energy(const at::Tensor& a_in, const at::Tensor& b_in, int64_t max_blocks) {
  check_energy_args(a_in, b_in, "cc_energy");
  CC_DEVICE_GUARD(a_in.device());
  const at::Tensor a = a_in.contiguous(), b = b_in.contiguous();
  const int64_t N = a.size(0), C = a.size(1), H = a.size(2), W = a.size(3), L = num_slots(H, W);
  at::Tensor e = at::empty({N, L, H, W}, a.options());
  const unsigned int blocks = num_blocks(energy_items(N, H, W), max_blocks);
  CC_DISPATCH(a.scalar_type(), "cc_energy_cuda", [&] {
    CC_LAUNCH(energy_kernel<scalar_t>, blocks, kThreads, a.const_data_ptr<scalar_t>(),
              b.const_data_ptr<scalar_t>(), e.mutable_data_ptr<scalar_t>(), N, C, H, W);
  });
  return e;
}

// out (N, C, H, W) from attention w (N, H + W - 1, H, W) and a feature map f (N, C, H, W):
// aggregate (out = w applied to f) or, Scatter, its adjoint in f.
template <bool Scatter>
at::Tensor launch_mix(const at::Tensor& w_in, const at::Tensor& f_in, const char* op, int64_t max_blocks) {
  check_aggregate_args(w_in, f_in, op);
  CC_DEVICE_GUARD(f_in.device());
  const at::Tensor w = w_in.contiguous(), f = f_in.contiguous();
  const int64_t N = f.size(0), C = f.size(1), H = f.size(2), W = f.size(3);
  at::Tensor out = at::empty_like(f);
  const unsigned int blocks = num_blocks(mix_items(N, C, H, W), max_blocks);
  CC_DISPATCH(f.scalar_type(), "cc_mix_cuda", [&] {
    auto kernel = Scatter ? scatter_kernel<scalar_t> : aggregate_kernel<scalar_t>;
    CC_LAUNCH(kernel, blocks, kThreads, w.const_data_ptr<scalar_t>(), f.const_data_ptr<scalar_t>(),
              out.mutable_data_ptr<scalar_t>(), N, C, H, W);
  });
  return out;
}

at::Tensor launch_aggregate(const at::Tensor& attn, const at::Tensor& value, int64_t max_blocks) {
  return launch_mix<false>(attn, value, "cc_aggregate", max_blocks);
}

at::Tensor launch_scatter(const at::Tensor& attn, const at::Tensor& feature, int64_t max_blocks) {
  return launch_mix<true>(attn, feature, "cc_scatter", max_blocks);
}

}  // namespace
}  // namespace ccnet_ops
