// Criss-cross attention on the GPU: the three primitives (see ../cc_attention.cpp) as strided-
// batched GEMMs on the tensor cores plus three small layout kernels, shared by two builds so that
// the code the GPU runs is the code tested:
//   cc_attention_cuda.cu           nvcc: cuBLAS GEMMs and kernel launches on the current stream;
//   emulation/cc_emulation.cpp     g++ with cuda_emulation.h: runs every thread of the same grid
//                                  one after another on the host and each GEMM plan with cuBLAS's
//                                  semantics, so a machine without a GPU checks both
//                                  (tests/test_cuda_emulation.py).
// The including file defines, before including this header,
//   CC_LAUNCH(kernel, blocks, threads, ...)   launches kernel<<<blocks, threads>>>(...);
//   CC_DEVICE_GUARD(device)                   makes `device` current for the scope;
//   run_gemm<In, Out>(plan, a, b, c)          runs a GemmPlan (cc_gemm.h) in namespace ccnet_ops.
//
// Per image n, with P = H * W, each contraction is a batch of small matrix products over views of
// the NCHW maps (no copies): the rows of an image are a batch with a stride of W elements; the
// columns are the rows of an H/W-transposed copy of the C-channel map (one transpose per call).
//   energy     rows:    e[n, i, y, x]  = sum_c a[c, y, x] b[c, y, i]      batch y: (W x C)(C x W)
//              columns: E[n, x, y, k]  = sum_c aT[c, x, y] bT[c, x, k]    batch x: (H x C)(C x H)
//                       then pack_columns gathers E into the column slots (the self pixel skipped)
//   aggregate  rows:    S[c, y, x]     = sum_i f[c, y, i] w[i, y, x]      batch y: (C x W)(W x W)
//              columns: ST[c, x, y]    = sum_k fT[c, x, k] A[x, y, k]     batch x: (C x H)(H x H)
//   scatter    rows:    S[c, y, i]     = sum_x g[c, y, x] w[i, y, x]
//              columns: ST[c, x, k]    = sum_y gT[c, x, y] A[x, y, k]
//   where A = unpack_columns(w) is the column attention as dense (H x H) matrices per image
//   column (zero on the diagonal), and combine writes out[c, y, x] = S[c, y, x] + ST[c, x, y].
// float32, float64, float16 and bfloat16. The GEMMs accumulate in float32 (float64 for float64),
// split-K reductions included (run_gemm disallows reduced-precision reductions): the energies are
// stored in the inputs' dtype by the GEMM; aggregate and scatter keep both partial sums in float32
// and round once, in combine. float32 GEMMs follow PyTorch's TF32 switch
// (torch.backends.cuda.matmul.allow_tf32, off by default: FP32 FMA). No atomics and no split
// reductions of our own: every output element has one owner, so results are deterministic on a
// given GPU model (cuBLAS's own guarantee: same architecture and SM count, PyTorch's per-stream
// workspace). cuBLAS is called once per image for each product: 4N + 5 launches forward and
// 8N + 9 backward for a batch of N.
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
#include <cmath>
#include <cstdint>
#include <tuple>

#include "../cc_checks.h"
#include "../cc_index.h"
#include "cc_gemm.h"

namespace ccnet_ops {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = 1 << 20;  // the CUDA build's grid cap: grid-stride beyond

// Blocks of kThreads covering `items`, at most max_blocks (the emulation lowers the cap so
// that each thread runs its grid-stride loop many times).
inline unsigned int num_blocks(int64_t items, int64_t max_blocks) {
  const int64_t blocks = (items + kThreads - 1) / kThreads;
  return static_cast<unsigned int>(std::min<int64_t>(blocks, max_blocks));
}

// Work items of the layout kernels: one per element they write.
inline int64_t pack_items(int64_t N, int64_t H, int64_t W) { return N * (H - 1) * H * W; }
inline int64_t unpack_items(int64_t N, int64_t H, int64_t W) { return N * W * H * H; }

// Grid-stride loop over `items` work items, in index_t (32-bit where every offset fits).
#define CC_FOR_EACH_ITEM(index_t, item, items)                                                 \
  for (index_t item = static_cast<index_t>(blockIdx.x) * blockDim.x + threadIdx.x; item < (items); \
       item += static_cast<index_t>(gridDim.x) * blockDim.x)

// Column slots of the energy from the dense column energies E (N, W, H, H) [x, y, k]:
//   e[n, W + j, y, x] = E[n, x, y, column_pixel(j, y)]; one thread per (n, j, y, x), x fastest.
template <typename scalar_t, typename index_t>
__global__ void pack_columns_kernel(const scalar_t* __restrict__ dense, scalar_t* __restrict__ e, index_t N,
                                    index_t H, index_t W) {
  const index_t L = H + W - 1, items = N * (H - 1) * H * W;
  CC_FOR_EACH_ITEM(index_t, item, items) {
    const index_t x = item % W, y = (item / W) % H, j = (item / (W * H)) % (H - 1), n = item / (W * H * (H - 1));
    const index_t k = static_cast<index_t>(column_pixel(j, y));
    e[((n * L + W + j) * H + y) * W + x] = dense[((n * W + x) * H + y) * H + k];
  }
}

// The column slots of an attention map as dense matrices A (N, W, H, H) [x, y, k]: the weight
// of key row k for query row y in image column x, zero for k == y (the centre is a row slot).
// One thread per (n, x, y, k), k fastest.
template <typename scalar_t, typename index_t>
__global__ void unpack_columns_kernel(const scalar_t* __restrict__ w, scalar_t* __restrict__ dense, index_t N,
                                      index_t H, index_t W) {
  const index_t L = H + W - 1, items = N * W * H * H;
  CC_FOR_EACH_ITEM(index_t, item, items) {
    const index_t k = item % H, y = (item / H) % H, x = (item / (H * H)) % W, n = item / (H * H * W);
    dense[item] = k == y ? scalar_t(0)
                         : w[((n * L + W + static_cast<index_t>(column_slot(k, y))) * H + y) * W + x];
  }
}

// out[n, c, y, x] = S[n, c, y, x] + ST[n, c, x, y], summed in acc_t and rounded once; out may be S.
// Neighbouring threads cover a kTileX x kTileY patch of (x, y), so a warp's loads of ST (along y)
// and of S and stores of out (along x) each come in runs of whole 32-byte sectors rather than
// one element per sector. One thread per (n, c, y, x) of the padded map; padding threads idle.
constexpr int kTileX = 8, kTileY = 4;
inline int64_t combine_items(int64_t N, int64_t C, int64_t H, int64_t W) {
  return N * C * ((H + kTileY - 1) / kTileY * kTileY) * ((W + kTileX - 1) / kTileX * kTileX);
}

template <typename scalar_t, typename acc_t, typename index_t>
__global__ void combine_kernel(const acc_t* S, const acc_t* __restrict__ ST, scalar_t* out, index_t N, index_t C,
                               index_t H, index_t W) {
  const index_t tiles_x = (W + kTileX - 1) / kTileX, tiles_y = (H + kTileY - 1) / kTileY;
  const index_t tile_items = kTileX * kTileY, items = N * C * tiles_y * tiles_x * tile_items;
  CC_FOR_EACH_ITEM(index_t, item, items) {
    const index_t in_tile = item % tile_items, tile = item / tile_items;
    const index_t x = tile % tiles_x * kTileX + in_tile % kTileX;
    const index_t y = tile / tiles_x % tiles_y * kTileY + in_tile / kTileX;
    const index_t nc = tile / (tiles_x * tiles_y);
    if (x < W && y < H) {
      const index_t at = (nc * H + y) * W + x;
      out[at] = static_cast<scalar_t>(S[at] + ST[(nc * W + x) * H + y]);
    }
  }
}

#define CC_DISPATCH(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, TYPE, NAME, __VA_ARGS__)

// Calls f(int32_t{}) when `largest` (the largest offset any thread forms) fits in 32 bits, else
// f(int64_t{}): the layout kernels index in 32 bits wherever they can.
template <typename F>
void with_index_type(int64_t largest, F&& f) {
  if (largest < int64_t(INT32_MAX) / 2) {
    f(int32_t{});
  } else {
    f(int64_t{});
  }
}

// C[b] = A[b] B[b] for b < batch over strided views (cc_gemm.h), accumulating in float32
// (float64 for float64) and stored as out_t.
template <typename in_t, typename out_t>
void gemm(int64_t batch, int64_t M, int64_t N, int64_t K, const in_t* a, Strides sa, const in_t* b, Strides sb,
          out_t* c, Strides sc) {
  const GemmPlan plan = plan_gemm(batch, M, N, K, sa, sb, sc);
  check_plan(plan);
  if (plan.swap) std::swap(a, b);
  run_gemm<in_t, out_t>(plan, a, b, c);
}

// Layout and kernel helpers of the primitives below. Tensors are contiguous; T-suffixed ones are
// the H/W-transposed copies (N, C, W, H).
inline at::Tensor transposed(const at::Tensor& t) { return t.transpose(2, 3).contiguous(); }

// The energies of a and b (N, C, H, W): the row slots into e (N, L, H, W), the columns as dense
// (N, W, H, H) [x, y, k] matrices, both in the inputs' dtype.
template <typename scalar_t>
void energy_gemms(const at::Tensor& a, const at::Tensor& b, const at::Tensor& aT, const at::Tensor& bT,
                  at::Tensor& e, at::Tensor& dense) {
  const int64_t N = a.size(0), C = a.size(1), H = a.size(2), W = a.size(3), L = num_slots(H, W), P = H * W;
  const scalar_t* ap = a.const_data_ptr<scalar_t>();
  const scalar_t* bp = b.const_data_ptr<scalar_t>();
  scalar_t* ep = e.mutable_data_ptr<scalar_t>();
  for (int64_t n = 0; n < N; ++n) {
    // rows: e[n, i, y, x] = sum_c a[c, y, x] b[c, y, i]; per row y: (x, c) (c, i)
    gemm<scalar_t, scalar_t>(H, W, W, C, ap + n * C * P, {1, P, W}, bp + n * C * P, {P, 1, W}, ep + n * L * P,
                             {1, P, W});
    if (H > 1) {  // dense[n, x, y, k] = sum_c aT[c, x, y] bT[c, x, k]; per column x: (y, c) (c, k)
      gemm<scalar_t, scalar_t>(W, H, H, C, aT.const_data_ptr<scalar_t>() + n * C * P, {1, P, H},
                               bT.const_data_ptr<scalar_t>() + n * C * P, {P, 1, H},
                               dense.mutable_data_ptr<scalar_t>() + n * P * H, {H, 1, H * H});
    }
  }
}

// out = w applied to f (aggregate) or, Scatter, its adjoint in f, from the row slots of the slot
// map w (N, L, H, W) and its column slots as dense (N, W, H, H) matrices (zero diagonal).
template <bool Scatter>
at::Tensor mix_with(const at::Tensor& w, const at::Tensor& dense, const at::Tensor& f, const at::Tensor& fT,
                    int64_t max_blocks) {
  const int64_t N = f.size(0), C = f.size(1), H = f.size(2), W = f.size(3), L = num_slots(H, W), P = H * W;
  at::Tensor out = at::empty_like(f, at::MemoryFormat::Contiguous);
  const at::ScalarType acc_type = at::toOpMathType(f.scalar_type());
  // the two partial sums in float32 (float64): the rows straight into out when out is that dtype
  at::Tensor rows = acc_type == f.scalar_type() ? out : at::empty(f.sizes(), f.options().dtype(acc_type));
  at::Tensor cols = at::empty({N, C, W, H}, f.options().dtype(acc_type));
  CC_DISPATCH(f.scalar_type(), "cc_mix_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    acc_t* rp = rows.mutable_data_ptr<acc_t>();
    acc_t* cp = cols.mutable_data_ptr<acc_t>();
    for (int64_t n = 0; n < N; ++n) {
      const scalar_t* fn = f.const_data_ptr<scalar_t>() + n * C * P;
      const scalar_t* fTn = fT.const_data_ptr<scalar_t>() + n * C * P;
      const scalar_t* wn = w.const_data_ptr<scalar_t>() + n * L * P;
      const scalar_t* dn = dense.const_data_ptr<scalar_t>() + n * P * H;
      if (!Scatter) {
        // rows[c, y, x] = sum_i f[c, y, i] w[i, y, x]; per row y: (c, i) (i, x)
        gemm<scalar_t, acc_t>(H, C, W, W, fn, {P, 1, W}, wn, {P, 1, W}, rp + n * C * P, {P, 1, W});
        // cols[c, x, y] = sum_k fT[c, x, k] A[x, y, k]; per column x: (c, k) (k, y)
        gemm<scalar_t, acc_t>(W, C, H, H, fTn, {P, 1, H}, dn, {1, H, H * H}, cp + n * C * P, {P, 1, H});
      } else {
        // rows[c, y, i] = sum_x g[c, y, x] w[i, y, x]; per row y: (c, x) (x, i)
        gemm<scalar_t, acc_t>(H, C, W, W, fn, {P, 1, W}, wn, {1, P, W}, rp + n * C * P, {P, 1, W});
        // cols[c, x, k] = sum_y gT[c, x, y] A[x, y, k]; per column x: (c, y) (y, k)
        gemm<scalar_t, acc_t>(W, C, H, H, fTn, {P, 1, H}, dn, {H, 1, H * H}, cp + n * C * P, {P, 1, H});
      }
    }
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    with_index_type(combine_items(N, C, H, W), [&](auto index) {  // the padded count bounds every offset
      using index_t = decltype(index);
      auto kernel = combine_kernel<scalar_t, acc_t, index_t>;
      CC_LAUNCH(kernel, num_blocks(combine_items(N, C, H, W), max_blocks), kThreads, rp, cp, op, index_t(N),
                index_t(C), index_t(H), index_t(W));
    });
  });
  return out;
}

// The column slots of w as dense (N, W, H, H) matrices.
at::Tensor unpack(const at::Tensor& w, int64_t H, int64_t W, int64_t max_blocks) {
  const int64_t N = w.size(0), L = num_slots(H, W), P = H * W;
  at::Tensor dense = at::empty({N, W, H, H}, w.options());
  CC_DISPATCH(w.scalar_type(), "cc_unpack_cuda", [&] {
    with_index_type(N * L * P + N * P * H, [&](auto index) {
      using index_t = decltype(index);
      auto kernel = unpack_columns_kernel<scalar_t, index_t>;
      CC_LAUNCH(kernel, num_blocks(unpack_items(N, H, W), max_blocks), kThreads, w.const_data_ptr<scalar_t>(),
                dense.mutable_data_ptr<scalar_t>(), index_t(N), index_t(H), index_t(W));
    });
  });
  return dense;
}

// e (N, H + W - 1, H, W) from query a and key b (N, C', H, W); max_blocks caps the layout kernel's grid.
at::Tensor launch_energy(const at::Tensor& a_in, const at::Tensor& b_in, int64_t max_blocks) {
  check_energy_args(a_in, b_in, "cc_energy");
  CC_DEVICE_GUARD(a_in.device());
  const at::Tensor a = a_in.contiguous(), b = b_in.contiguous();
  const int64_t N = a.size(0), H = a.size(2), W = a.size(3), L = num_slots(H, W), P = H * W;
  at::Tensor e = at::empty({N, L, H, W}, a.options());
  const bool columns = H > 1;
  at::Tensor aT = columns ? transposed(a) : a, bT = columns ? transposed(b) : b;
  at::Tensor dense = at::empty({N, W, H, columns ? H : 0}, a.options());
  CC_DISPATCH(a.scalar_type(), "cc_energy_cuda", [&] {
    energy_gemms<scalar_t>(a, b, aT, bT, e, dense);
    if (columns) {
      with_index_type(N * L * P + N * P * H, [&](auto index) {
        using index_t = decltype(index);
        auto kernel = pack_columns_kernel<scalar_t, index_t>;
        CC_LAUNCH(kernel, num_blocks(pack_items(N, H, W), max_blocks), kThreads, dense.const_data_ptr<scalar_t>(),
                  e.mutable_data_ptr<scalar_t>(), index_t(N), index_t(H), index_t(W));
      });
    }
  });
  return e;
}

// out (N, C, H, W) from attention w (N, H + W - 1, H, W) and a feature map f (N, C, H, W):
// aggregate (out = w applied to f) or, Scatter, its adjoint in f. max_blocks caps the layout
// kernels' grids.
template <bool Scatter>
at::Tensor launch_mix(const at::Tensor& w_in, const at::Tensor& f_in, const char* op, int64_t max_blocks) {
  check_aggregate_args(w_in, f_in, op);
  CC_DEVICE_GUARD(f_in.device());
  const at::Tensor w = w_in.contiguous(), f = f_in.contiguous();
  const int64_t H = f.size(2), W = f.size(3);
  return mix_with<Scatter>(w, unpack(w, H, W, max_blocks), f, transposed(f), max_blocks);
}

at::Tensor launch_aggregate(const at::Tensor& attn, const at::Tensor& value, int64_t max_blocks) {
  return launch_mix<false>(attn, value, "cc_aggregate", max_blocks);
}

at::Tensor launch_scatter(const at::Tensor& attn, const at::Tensor& feature, int64_t max_blocks) {
  return launch_mix<true>(attn, feature, "cc_scatter", max_blocks);
}

// --- the whole attention in one op each way (CUDA): fewer launches, no Python in between -----

__device__ __forceinline__ float cc_exp(float x) { return ::expf(x); }
__device__ __forceinline__ double cc_exp(double x) { return ::exp(x); }
template <typename T>
__device__ __forceinline__ T cc_max(T a, T b) { return a < b ? b : a; }

// Softmax over the slots of every pixel, in acc_t, stored in scalar_t (the dtype contract of
// ops/criss_cross.py). On entry the row slots of attn hold the row energies and dense the column
// energies; on exit attn holds every slot's weight and dense the column weights, zero on the
// diagonal (ready for mix_with). One thread per pixel (n, y, x), x fastest.
template <typename scalar_t, typename index_t>
__global__ void softmax_kernel(scalar_t* __restrict__ attn, scalar_t* __restrict__ dense, index_t N, index_t H,
                               index_t W) {
  using acc_t = at::opmath_type<scalar_t>;
  const index_t L = H + W - 1, P = H * W, items = N * P;
  CC_FOR_EACH_ITEM(index_t, item, items) {
    const index_t x = item % W, y = item / W % H, n = item / P;
    scalar_t* a = attn + n * L * P + y * W + x;  // slot s at a[s * P]
    scalar_t* d = dense + ((n * W + x) * H + y) * H;  // key row k at d[k]
    acc_t top = static_cast<acc_t>(a[0]);
    for (index_t i = 1; i < W; ++i) top = cc_max(top, static_cast<acc_t>(a[i * P]));
    for (index_t k = 0; k < H; ++k)
      if (k != y) top = cc_max(top, static_cast<acc_t>(d[k]));
    acc_t sum = 0;
    for (index_t i = 0; i < W; ++i) sum += cc_exp(static_cast<acc_t>(a[i * P]) - top);
    for (index_t k = 0; k < H; ++k)
      if (k != y) sum += cc_exp(static_cast<acc_t>(d[k]) - top);
    const acc_t inv = acc_t(1) / sum;
    for (index_t i = 0; i < W; ++i) a[i * P] = static_cast<scalar_t>(cc_exp(static_cast<acc_t>(a[i * P]) - top) * inv);
    for (index_t k = 0; k < H; ++k) {
      if (k == y) {
        d[k] = scalar_t(0);
      } else {
        const scalar_t weight = static_cast<scalar_t>(cc_exp(static_cast<acc_t>(d[k]) - top) * inv);
        d[k] = weight;
        a[(W + static_cast<index_t>(column_slot(k, y))) * P] = weight;
      }
    }
  }
}

// The softmax's backward, dE = A (dA - sum_s A_s dA_s) per pixel in acc_t, from the weights A
// (slot map attn) and dA: on entry the row slots of grad hold dA's rows and dense its columns
// (N, W, H, H); on exit they hold dE's, the diagonal of dense zero (ready for mix_with).
template <typename scalar_t, typename index_t>
__global__ void softmax_backward_kernel(const scalar_t* __restrict__ attn, scalar_t* __restrict__ grad,
                                        scalar_t* __restrict__ dense, index_t N, index_t H, index_t W) {
  using acc_t = at::opmath_type<scalar_t>;
  const index_t L = H + W - 1, P = H * W, items = N * P;
  CC_FOR_EACH_ITEM(index_t, item, items) {
    const index_t x = item % W, y = item / W % H, n = item / P;
    const scalar_t* a = attn + n * L * P + y * W + x;
    scalar_t* g = grad + n * L * P + y * W + x;
    scalar_t* d = dense + ((n * W + x) * H + y) * H;
    acc_t dot = 0;
    for (index_t i = 0; i < W; ++i) dot += static_cast<acc_t>(a[i * P]) * static_cast<acc_t>(g[i * P]);
    for (index_t k = 0; k < H; ++k)
      if (k != y) dot += static_cast<acc_t>(a[(W + static_cast<index_t>(column_slot(k, y))) * P]) *
                         static_cast<acc_t>(d[k]);
    for (index_t i = 0; i < W; ++i)
      g[i * P] = static_cast<scalar_t>(static_cast<acc_t>(a[i * P]) * (static_cast<acc_t>(g[i * P]) - dot));
    for (index_t k = 0; k < H; ++k) {
      d[k] = k == y ? scalar_t(0)
                    : static_cast<scalar_t>(static_cast<acc_t>(a[(W + static_cast<index_t>(column_slot(k, y))) * P]) *
                                            (static_cast<acc_t>(d[k]) - dot));
    }
  }
}

inline void check_attention_args(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const char* op) {
  check_energy_args(q, k, op);
  check_feature(v, op, "value");
  check_same_kind(q, "query", v, "value", op);
  TORCH_CHECK_VALUE(v.size(0) == q.size(0) && v.size(2) == q.size(2) && v.size(3) == q.size(3), op,
                    ": value ", v.sizes(), " must match query ", q.sizes(), " in N, H and W");
}

// (out, attention) from query, key (N, C', H, W) and value (N, C, H, W): energies, softmax and
// aggregation in 9 launches; the attention map (N, H + W - 1, H, W) is kept for the backward.
std::tuple<at::Tensor, at::Tensor> launch_attention(const at::Tensor& q_in, const at::Tensor& k_in,
                                                    const at::Tensor& v_in, int64_t max_blocks) {
  check_attention_args(q_in, k_in, v_in, "cc_attention");
  CC_DEVICE_GUARD(q_in.device());
  const at::Tensor q = q_in.contiguous(), k = k_in.contiguous(), v = v_in.contiguous();
  const int64_t N = q.size(0), H = q.size(2), W = q.size(3), L = num_slots(H, W);
  at::Tensor attn = at::empty({N, L, H, W}, q.options());
  at::Tensor dense = at::empty({N, W, H, H}, q.options());
  CC_DISPATCH(q.scalar_type(), "cc_attention_cuda", [&] {
    energy_gemms<scalar_t>(q, k, transposed(q), transposed(k), attn, dense);
    with_index_type(N * L * H * W + N * W * H * H, [&](auto index) {
      using index_t = decltype(index);
      auto kernel = softmax_kernel<scalar_t, index_t>;
      CC_LAUNCH(kernel, num_blocks(N * H * W, max_blocks), kThreads, attn.mutable_data_ptr<scalar_t>(),
                dense.mutable_data_ptr<scalar_t>(), index_t(N), index_t(H), index_t(W));
    });
  });
  return {mix_with<false>(attn, dense, v, transposed(v), max_blocks), attn};
}

// (dq, dk, dv) from the output's gradient, the inputs and the attention map of launch_attention.
std::tuple<at::Tensor, at::Tensor, at::Tensor> launch_attention_backward(
    const at::Tensor& g_in, const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
    const at::Tensor& attn_in, int64_t max_blocks) {
  check_attention_args(q_in, k_in, v_in, "cc_attention_backward");
  check_aggregate_args(attn_in, v_in, "cc_attention_backward");
  check_same_kind(g_in, "grad", v_in, "value", "cc_attention_backward");
  TORCH_CHECK_VALUE(g_in.sizes() == v_in.sizes(), "cc_attention_backward: grad ", g_in.sizes(),
                    " must have the shape of value ", v_in.sizes());
  CC_DEVICE_GUARD(q_in.device());
  const at::Tensor g = g_in.contiguous(), q = q_in.contiguous(), k = k_in.contiguous(), v = v_in.contiguous();
  const at::Tensor attn = attn_in.contiguous();
  const int64_t N = q.size(0), H = q.size(2), W = q.size(3), L = num_slots(H, W);
  const at::Tensor gT = transposed(g);
  at::Tensor dv = mix_with<true>(attn, unpack(attn, H, W, max_blocks), g, gT, max_blocks);
  at::Tensor grad = at::empty({N, L, H, W}, q.options());
  at::Tensor dense = at::empty({N, W, H, H}, q.options());
  CC_DISPATCH(q.scalar_type(), "cc_attention_backward_cuda", [&] {
    energy_gemms<scalar_t>(g, v, gT, transposed(v), grad, dense);
    with_index_type(N * L * H * W + N * W * H * H, [&](auto index) {
      using index_t = decltype(index);
      auto kernel = softmax_backward_kernel<scalar_t, index_t>;
      CC_LAUNCH(kernel, num_blocks(N * H * W, max_blocks), kThreads, attn.const_data_ptr<scalar_t>(),
                grad.mutable_data_ptr<scalar_t>(), dense.mutable_data_ptr<scalar_t>(), index_t(N), index_t(H),
                index_t(W));
    });
  });
  at::Tensor dq = mix_with<false>(grad, dense, k, transposed(k), max_blocks);
  at::Tensor dk = mix_with<true>(grad, dense, q, transposed(q), max_blocks);
  return {dq, dk, dv};
}

}  // namespace
}  // namespace ccnet_ops
