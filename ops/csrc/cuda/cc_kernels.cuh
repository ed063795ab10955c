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
//   CC_LAUNCH_BLOCKS(kernel, blocks, threads, ...)   the same, for kernels with shared memory and
//                                             __syncthreads (the emulation runs a block's threads
//                                             as fibers);
//   CC_DEVICE_GUARD(device)                   makes `device` current for the scope;
//   run_gemm<In, Out>(plan, a, b, c)          runs a GemmPlan (cc_gemm.h) in namespace ccnet_ops.
//
// Per image n, with P = H * W, each contraction is a batch of small matrix products over views of
// the NCHW maps (no copies): the rows of an image are a batch with a stride of W elements; the
// columns are the rows of an H/W-transposed copy of the C-channel map (one transpose per call, a
// kernel of ours: transpose_kernel).
//   energy     rows:    e[n, i, y, x]  = sum_c a[c, y, x] b[c, y, i]      batch y: (W x C)(C x W)
//              columns: E[n, x, y, k]  = sum_c aT[c, x, y] bT[c, x, k]    batch x: (H x C)(C x H)
//                       then move_columns (pack) moves E into the column slots (the self pixel skipped)
//   aggregate  rows:    S[c, y, x]     = sum_i f[c, y, i] w[i, y, x]      batch y: (C x W)(W x W)
//              columns: ST[c, x, y]    = sum_k fT[c, x, k] A[x, y, k]     batch x: (C x H)(H x H)
//   scatter    rows:    S[c, y, i]     = sum_x g[c, y, x] w[i, y, x]
//              columns: ST[c, x, k]    = sum_y gT[c, x, y] A[x, y, k]
//   where A = move_columns (unpack) of w is the column attention as dense (H x H) matrices per image
//   column (zero on the diagonal), and combine writes out[c, y, x] = S[c, y, x] + ST[c, x, y].
// The layout kernels that move data between the x-contiguous slot map and the k-contiguous dense
// matrices (move_columns_kernel: pack and unpack) and the transposes go through 32 x 32 tiles in
// shared memory, so that a warp reads and writes runs of up to 32 consecutive elements along each
// layout's contiguous side (x in the NCHW maps and the slot map, y in the transposed maps, k in the
// dense matrices; fewer where a tile is cut by the map's edge); the softmax and its backward run on
// the slot map alone, one thread per pixel with x fastest; combine reads the transposed half in runs
// of 4 along y (its 8 x 4 tiles).
// float32, float64, float16 and bfloat16. The GEMMs accumulate in float32 (float64 for float64),
// split-K reductions included (run_gemm disallows reduced-precision reductions): the energies are
// stored in the inputs' dtype by the GEMM; aggregate and scatter keep both partial sums in float32
// and round once, in combine. float32 GEMMs follow PyTorch's TF32 switch
// (torch.backends.cuda.matmul.allow_tf32, off by default: FP32 FMA). No atomics and no split
// reductions of our own: every output element has one owner, so results are deterministic on a
// given GPU model (cuBLAS's own guarantee: same architecture and SM count, PyTorch's per-stream
// workspace). cuBLAS is called once per image for each product: 4N + 7 launches forward and
// 8N + 11 backward for a batch of N.
#pragma once

#if !defined(CC_LAUNCH) || !defined(CC_LAUNCH_BLOCKS) || !defined(CC_DEVICE_GUARD)
#error "define CC_LAUNCH, CC_LAUNCH_BLOCKS and CC_DEVICE_GUARD before including cc_kernels.cuh"
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

// A variable in shared memory; the emulation fills it with NaN at the start of every block.
#ifndef CC_SHARED
#define CC_SHARED(type, name) __shared__ type name
#endif

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

// Grid-stride loop over `items` work items, in index_t (32-bit where every offset fits).
#define CC_FOR_EACH_ITEM(index_t, item, items)                                                 \
  for (index_t item = static_cast<index_t>(blockIdx.x) * blockDim.x + threadIdx.x; item < (items); \
       item += static_cast<index_t>(gridDim.x) * blockDim.x)

// The tiled layout kernels: a block moves one kTile x kTile tile at a time through shared memory,
// reading kTile consecutive elements of one layout per warp and writing kTile consecutive
// elements of the other (kThreads / kTile rows of the tile at once). Grid-stride over tiles, the
// same trip count for every thread of a block (its barriers are reached by all).
constexpr int kTile = 32;
constexpr int kTileRows = kThreads / kTile;
static_assert(kThreads % kTile == 0, "a block covers whole rows of a tile");

inline int64_t tiles_of(int64_t n) { return (n + kTile - 1) / kTile; }
// Tiles of the layout kernels: the transposes (planes of H x W), and pack / unpack (per image and
// row y, x against k).
inline int64_t transpose_tiles(int64_t planes, int64_t H, int64_t W) { return planes * tiles_of(H) * tiles_of(W); }
inline int64_t column_tiles(int64_t N, int64_t H, int64_t W) { return N * H * tiles_of(H) * tiles_of(W); }

// One block per tile, at most max_blocks.
inline unsigned int tile_blocks(int64_t tiles, int64_t max_blocks) {
  return static_cast<unsigned int>(std::min<int64_t>(std::max<int64_t>(tiles, 1), max_blocks));
}

#define CC_FOR_EACH_TILE(index_t, tile, tiles) \
  for (index_t tile = static_cast<index_t>(blockIdx.x); tile < (tiles); tile += static_cast<index_t>(gridDim.x))

// A tile of scalar_t in shared memory, rows padded by one element against bank conflicts; the
// storage is declared as double (8-byte aligned, trivially constructible for every dtype).
template <typename scalar_t>
struct TileStorage {
  static constexpr int kStride = kTile + 1;
  static constexpr int kWords = (kTile * kStride * int(sizeof(scalar_t)) + 7) / 8;
};

// out[p, x, y] = in[p, y, x] for `planes` planes of H x W (the NCHW map with H and W swapped).
template <typename scalar_t, typename index_t>
__global__ void transpose_kernel(const scalar_t* __restrict__ in, scalar_t* __restrict__ out, index_t planes,
                                 index_t H, index_t W) {
  using T = TileStorage<scalar_t>;
  using Storage = double[T::kWords];
  CC_SHARED(Storage, storage);
  scalar_t* tile = reinterpret_cast<scalar_t*>(storage);
  const index_t lane = threadIdx.x % kTile, row = threadIdx.x / kTile;
  const index_t tiles_x = (W + kTile - 1) / kTile, tiles_y = (H + kTile - 1) / kTile;
  CC_FOR_EACH_TILE(index_t, t, planes * tiles_y * tiles_x) {
    const index_t x0 = t % tiles_x * kTile, y0 = t / tiles_x % tiles_y * kTile, p = t / (tiles_x * tiles_y);
    for (index_t r = row; r < kTile; r += kTileRows) {  // along x
      const index_t y = y0 + r, x = x0 + lane;
      if (y < H && x < W) tile[r * T::kStride + lane] = in[(p * H + y) * W + x];
    }
    __syncthreads();
    for (index_t r = row; r < kTile; r += kTileRows) {  // along y
      const index_t x = x0 + r, y = y0 + lane;
      if (y < H && x < W) out[(p * W + x) * H + y] = tile[lane * T::kStride + r];
    }
    __syncthreads();
  }
}

// The column slots between the slot map e (N, L, H, W), x contiguous, and dense matrices
// (N, W, H, H) [x, y, k], k contiguous, per tile of (x, k) at one image n and row y:
//   pack (Unpack = false):  e[n, W + column_slot(k, y), y, x] = dense[n, x, y, k]   (k != y)
//   unpack (Unpack = true): dense[n, x, y, k] = e[n, W + column_slot(k, y), y, x], zero for k == y
// (the weight of key row k for query row y in image column x; the centre is a row slot). The
// source is read along its contiguous side and the destination written along its own.
template <bool Unpack, typename scalar_t, typename index_t>
__global__ void move_columns_kernel(const scalar_t* __restrict__ src, scalar_t* __restrict__ dst, index_t N,
                                    index_t H, index_t W) {
  using T = TileStorage<scalar_t>;
  using Storage = double[T::kWords];
  CC_SHARED(Storage, storage);
  scalar_t* tile = reinterpret_cast<scalar_t*>(storage);
  const index_t L = H + W - 1, lane = threadIdx.x % kTile, row = threadIdx.x / kTile;
  const index_t tiles_x = (W + kTile - 1) / kTile, tiles_k = (H + kTile - 1) / kTile;
  CC_FOR_EACH_TILE(index_t, t, N * H * tiles_k * tiles_x) {
    const index_t x0 = t % tiles_x * kTile, k0 = t / tiles_x % tiles_k * kTile;
    const index_t y = t / (tiles_x * tiles_k) % H, n = t / (tiles_x * tiles_k * H);
    const auto dense_at = [&](index_t x, index_t k) { return ((n * W + x) * H + y) * H + k; };
    const auto slot_at = [&](index_t x, index_t k) {
      return ((n * L + W + static_cast<index_t>(column_slot(k, y))) * H + y) * W + x;
    };
    // tile row r, lane l: (x, k) = (x0 + r, k0 + l) along k, or (x0 + l, k0 + r) along x
    for (index_t r = row; r < kTile; r += kTileRows) {  // read: dense along k, or the slots along x
      const index_t x = x0 + (Unpack ? lane : r), k = k0 + (Unpack ? r : lane);
      if (x < W && k < H) {
        if constexpr (Unpack) {
          tile[r * T::kStride + lane] = k == y ? scalar_t(0) : src[slot_at(x, k)];
        } else {
          tile[r * T::kStride + lane] = src[dense_at(x, k)];
        }
      }
    }
    __syncthreads();
    for (index_t r = row; r < kTile; r += kTileRows) {  // write: the slots along x, or dense along k
      const index_t x = x0 + (Unpack ? r : lane), k = k0 + (Unpack ? lane : r);
      if (x < W && k < H) {
        if constexpr (Unpack) {
          dst[dense_at(x, k)] = tile[lane * T::kStride + r];
        } else if (k != y) {
          dst[slot_at(x, k)] = tile[lane * T::kStride + r];
        }
      }
    }
    __syncthreads();
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
// the H/W-transposed copies (N, C, W, H), made by transpose_kernel.
at::Tensor transposed(const at::Tensor& t, int64_t max_blocks) {
  TORCH_INTERNAL_ASSERT(t.is_contiguous() && t.dim() == 4);
  const int64_t planes = t.size(0) * t.size(1), H = t.size(2), W = t.size(3);
  at::Tensor out = at::empty({t.size(0), t.size(1), W, H}, t.options());
  if (t.numel() == 0) return out;
  CC_DISPATCH(t.scalar_type(), "cc_transpose_cuda", [&] {
    with_index_type(t.numel(), [&](auto index) {
      using index_t = decltype(index);
      auto kernel = transpose_kernel<scalar_t, index_t>;
      CC_LAUNCH_BLOCKS(kernel, tile_blocks(transpose_tiles(planes, H, W), max_blocks), kThreads,
                       t.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(), index_t(planes), index_t(H),
                       index_t(W));
    });
  });
  return out;
}

// Moves the dense column matrices (N, W, H, H) into the column slots of the slot map e, or back
// (Unpack: dense from e, zero on the diagonal; for a single row, dense is that diagonal alone).
template <bool Unpack>
void move_columns(const at::Tensor& e, const at::Tensor& dense, int64_t max_blocks) {
  const int64_t N = e.size(0), H = e.size(2), W = e.size(3), L = num_slots(H, W), P = H * W;
  if (!Unpack && H == 1) return;  // a single row has no column slots to fill
  CC_DISPATCH(e.scalar_type(), Unpack ? "cc_unpack_cuda" : "cc_pack_cuda", [&] {
    with_index_type(N * L * P + N * P * H, [&](auto index) {
      using index_t = decltype(index);
      const unsigned int blocks = tile_blocks(column_tiles(N, H, W), max_blocks);
      auto kernel = move_columns_kernel<Unpack, scalar_t, index_t>;
      const at::Tensor& src = Unpack ? e : dense;
      const at::Tensor& dst = Unpack ? dense : e;
      CC_LAUNCH_BLOCKS(kernel, blocks, kThreads, src.const_data_ptr<scalar_t>(), dst.mutable_data_ptr<scalar_t>(),
                       index_t(N), index_t(H), index_t(W));
    });
  });
}

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
  at::Tensor dense = at::empty({w.size(0), W, H, H}, w.options());
  move_columns<true>(w, dense, max_blocks);
  return dense;
}

// e (N, H + W - 1, H, W) from query a and key b (N, C', H, W); max_blocks caps the layout kernel's grid.
at::Tensor launch_energy(const at::Tensor& a_in, const at::Tensor& b_in, int64_t max_blocks) {
  check_energy_args(a_in, b_in, "cc_energy");
  CC_DEVICE_GUARD(a_in.device());
  const at::Tensor a = a_in.contiguous(), b = b_in.contiguous();
  const int64_t N = a.size(0), H = a.size(2), W = a.size(3), L = num_slots(H, W);
  at::Tensor e = at::empty({N, L, H, W}, a.options());
  const bool columns = H > 1;
  at::Tensor aT = columns ? transposed(a, max_blocks) : a, bT = columns ? transposed(b, max_blocks) : b;
  at::Tensor dense = at::empty({N, W, H, columns ? H : 0}, a.options());
  CC_DISPATCH(a.scalar_type(), "cc_energy_cuda", [&] { energy_gemms<scalar_t>(a, b, aT, bT, e, dense); });
  move_columns<false>(e, dense, max_blocks);
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
  return mix_with<Scatter>(w, unpack(w, H, W, max_blocks), f, transposed(f, max_blocks), max_blocks);
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

// Softmax over the H + W - 1 slots of every pixel of the slot map, in acc_t, stored in scalar_t
// (the dtype contract of ops/criss_cross.py): energies in, weights out. One thread per pixel
// (n, y, x), x fastest, so a warp's accesses to each slot are 32 consecutive elements.
template <typename scalar_t, typename index_t>
__global__ void softmax_kernel(scalar_t* __restrict__ attn, index_t N, index_t H, index_t W) {
  using acc_t = at::opmath_type<scalar_t>;
  const index_t L = H + W - 1, P = H * W, items = N * P;
  CC_FOR_EACH_ITEM(index_t, item, items) {
    scalar_t* a = attn + item / P * L * P + item % P;  // slot s at a[s * P]
    acc_t top = static_cast<acc_t>(a[0]);
    for (index_t s = 1; s < L; ++s) top = cc_max(top, static_cast<acc_t>(a[s * P]));
    acc_t sum = 0;
    for (index_t s = 0; s < L; ++s) sum += cc_exp(static_cast<acc_t>(a[s * P]) - top);
    const acc_t inv = acc_t(1) / sum;
    for (index_t s = 0; s < L; ++s) a[s * P] = static_cast<scalar_t>(cc_exp(static_cast<acc_t>(a[s * P]) - top) * inv);
  }
}

// The softmax's backward over the slot map, dE = A (dA - sum_s A_s dA_s) per pixel in acc_t, from
// the weights A (attn) and dA (grad, overwritten with dE). One thread per pixel, x fastest.
template <typename scalar_t, typename index_t>
__global__ void softmax_backward_kernel(const scalar_t* __restrict__ attn, scalar_t* __restrict__ grad, index_t N,
                                        index_t H, index_t W) {
  using acc_t = at::opmath_type<scalar_t>;
  const index_t L = H + W - 1, P = H * W, items = N * P;
  CC_FOR_EACH_ITEM(index_t, item, items) {
    const index_t at = item / P * L * P + item % P;
    const scalar_t* a = attn + at;
    scalar_t* g = grad + at;
    acc_t dot = 0;
    for (index_t s = 0; s < L; ++s) dot += static_cast<acc_t>(a[s * P]) * static_cast<acc_t>(g[s * P]);
    for (index_t s = 0; s < L; ++s)
      g[s * P] = static_cast<scalar_t>(static_cast<acc_t>(a[s * P]) * (static_cast<acc_t>(g[s * P]) - dot));
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
// aggregation in 4N + 7 launches (11 for one image); the attention map (N, H + W - 1, H, W) is kept for the backward.
std::tuple<at::Tensor, at::Tensor> launch_attention(const at::Tensor& q_in, const at::Tensor& k_in,
                                                    const at::Tensor& v_in, int64_t max_blocks) {
  check_attention_args(q_in, k_in, v_in, "cc_attention");
  CC_DEVICE_GUARD(q_in.device());
  const at::Tensor q = q_in.contiguous(), k = k_in.contiguous(), v = v_in.contiguous();
  const int64_t N = q.size(0), H = q.size(2), W = q.size(3), L = num_slots(H, W);
  at::Tensor attn = at::empty({N, L, H, W}, q.options());
  at::Tensor dense = at::empty({N, W, H, H}, q.options());
  CC_DISPATCH(q.scalar_type(), "cc_attention_cuda", [&] {
    energy_gemms<scalar_t>(q, k, transposed(q, max_blocks), transposed(k, max_blocks), attn, dense);
    move_columns<false>(attn, dense, max_blocks);  // the column energies into their slots
    with_index_type(N * L * H * W, [&](auto index) {
      using index_t = decltype(index);
      auto kernel = softmax_kernel<scalar_t, index_t>;
      CC_LAUNCH(kernel, num_blocks(N * H * W, max_blocks), kThreads, attn.mutable_data_ptr<scalar_t>(), index_t(N),
                index_t(H), index_t(W));
    });
    move_columns<true>(attn, dense, max_blocks);  // the column weights as dense matrices
  });
  return {mix_with<false>(attn, dense, v, transposed(v, max_blocks), max_blocks), attn};
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
  const at::Tensor gT = transposed(g, max_blocks);
  at::Tensor dv = mix_with<true>(attn, unpack(attn, H, W, max_blocks), g, gT, max_blocks);
  at::Tensor grad = at::empty({N, L, H, W}, q.options());
  at::Tensor dense = at::empty({N, W, H, H}, q.options());
  CC_DISPATCH(q.scalar_type(), "cc_attention_backward_cuda", [&] {
    energy_gemms<scalar_t>(g, v, gT, transposed(v, max_blocks), grad, dense);
    move_columns<false>(grad, dense, max_blocks);  // dA's columns into their slots
    with_index_type(N * L * H * W, [&](auto index) {
      using index_t = decltype(index);
      auto kernel = softmax_backward_kernel<scalar_t, index_t>;
      CC_LAUNCH(kernel, num_blocks(N * H * W, max_blocks), kThreads, attn.const_data_ptr<scalar_t>(),
                grad.mutable_data_ptr<scalar_t>(), index_t(N), index_t(H), index_t(W));
    });
    move_columns<true>(grad, dense, max_blocks);  // dE's columns as dense matrices
  });
  at::Tensor dq = mix_with<false>(grad, dense, k, transposed(k, max_blocks), max_blocks);
  at::Tensor dk = mix_with<true>(grad, dense, q, transposed(q, max_blocks), max_blocks);
  return {dq, dk, dv};
}

}  // namespace
}  // namespace ccnet_ops
