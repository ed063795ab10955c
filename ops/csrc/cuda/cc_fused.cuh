// Fused criss-cross attention on the GPU: the maths of ../../fused.py (per pixel, one softmax over
// its row and its column, the two passes' (max, sum) merged as an online softmax merges two
// blocks; the backward recomputes the energies from the saved log-sum-exp) in kernels of ours,
// without the (N, H + W - 1, H, W) attention map. Included after cc_kernels.cuh (its launch
// macros, tiles and transposes), by the CUDA build and by the emulation, which runs these kernels'
// threads as fibers.
//
// Every pass is one kernel, line_pass_kernel, over "lines" of L pixels of a contiguous map in the
// pass's layout (N, channels, lines, L): the rows of the NCHW maps (lines = H, L = W), and the rows
// of their H/W-transposed copies (transpose_kernel) for the columns (lines = W, L = H), where the
// pixel's own slot is left out, so that it is counted once. Within a line every pixel attends to
// every other: a block owns a tile of kSpan pixels of one line (and, but for Stats, a chunk of the
// output's channels), and walks the line's other pixels kSpan at a time:
//   energies  E[i, j] = sum_c q[c, i] k[c, j]: a kSpan x kSpan tile through shared memory, kSpan
//             channels at a time; each thread then takes kPairs of them (its pixel against kPairs
//             others);
//   Stats     each thread keeps the running (max, sum) of its pairs' exponentials (an online
//             softmax, rescaled as its max grows); at the end a pixel's kGroups threads' are merged
//             in a fixed order: the column pass writes them, the row pass merges them with its own
//             into the log-sum-exp;
//   weights   final when formed, from the log-sum-exp: forward P = exp(E - lse); backward the same
//             P, and dE = P (dP - D) with dP[i, j] = sum_c dout[c, i] v[c, j], a second tile, and
//             D = sum_c dout out per pixel;
//   product   the weights times the chunk's channels of the other pixels (v, k, q or dout) in
//             shared memory, summed over the whole line without rescaling: per thread, in
//             per_thread() float32 registers of its own pixel (CUDA cores), or per warp, in a WMMA
//             accumulator fragment (tensor cores), written out once.
// The product modes own a query (forward, dq: sums over keys) or a key (dk, dv: sums over
// queries). Every load and store runs along the line (x in the NCHW maps, y in the transposed
// ones), kSpan consecutive elements per warp; no atomics: every output element has one owner
// thread (or fragment), and the order of every sum is fixed, so results are deterministic.
// Energies and dP are rounded to the inputs' dtype and the weights to the value's before they meet
// a map (the dtype contract of ops/criss_cross.py), statistics and partial sums stay in float32
// (float64).
//
// Forward (11 launches): the column then the row statistics pass (the log-sum-exp, (N, H, W)),
// then the column pass's product in float32, transposed back and added by the row pass's. The
// statistics passes compute the energies once more than a one-pass online softmax would (C'
// channels per pair, against (chunks x C') + C in a product pass), and in exchange every weight is
// final when formed: no rescaling of the products, one exponential per pair and chunk (and 1.25
// per pair in a statistics pass), where the one-pass kernel took 9.25 per pair and chunk.
// Backward (16 launches): D, then the column pass's three gradients in float32, transposed back
// and added by the row pass's. Energies are computed once per chunk of 64 output channels (32 in
// float64): the price of holding no map. fp16 and bf16 run the energy, dP and product tiles on the
// tensor cores (WMMA fragments of 16 x 16 x 16 with float32 sums, 16-bit tiles in shared memory:
// mma_tile and mma_product); float32 and float64 run them as FMA on the CUDA cores (dot_tile).
#pragma once

#include <cstdint>
#include <limits>
#include <type_traits>

namespace ccnet_ops {
namespace {

constexpr int kSpan = 32;                   // pixels of a line per tile, own and other
static_assert(kSpan == kTile, "line_pass_items counts tiles with tiles_of");
constexpr int kGroups = kThreads / kSpan;   // threads per own pixel
constexpr int kPairs = kSpan / kGroups;     // pairs of an energy tile per thread
static_assert(kThreads % kSpan == 0 && kSpan % kGroups == 0, "whole tiles per block");

// Output channels per thread (in registers) and per block.
template <typename acc_t>
constexpr int per_thread() { return sizeof(acc_t) == 8 ? 4 : 8; }
template <typename acc_t>
constexpr int chunk_channels() { return per_thread<acc_t>() * kGroups; }

__device__ __forceinline__ float cc_log(float x) { return ::logf(x); }
__device__ __forceinline__ double cc_log(double x) { return ::log(x); }

// Stats: each pixel's (max, sum) of its energies in the pass (the column pass) or the log-sum-exp
// merged with the other pass's (the row pass); the other modes: a product with final weights.
enum class LineMode { Stats, Forward, GradQuery, GradKey, GradValue };

// fp16 and bf16 run their tiles on the tensor cores (WMMA: sm_80 on, and in the emulation); the
// includer supplies MmaElement<scalar_t>::type, the element type of nvcuda::wmma for the dtype.
// Device code for older GPUs leaves the WMMA calls out (mma.h has none below sm_70).
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
#define CC_FUSED_WMMA 1
#else
#define CC_FUSED_WMMA 0
#endif
template <typename scalar_t>
constexpr bool uses_tensor_cores() {
  return CC_FUSED_WMMA && sizeof(scalar_t) == 2;
}

// What a line pass reads and writes; maps are contiguous (N, channels, lines, L), per-pixel
// statistics (N, lines, L). Pointers a mode does not use are null.
template <typename scalar_t, typename index_t>
struct LineArgs {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* q = nullptr;  // (N, Cq, lines, L)
  const scalar_t* k = nullptr;
  const scalar_t* v = nullptr;  // (N, C, lines, L)
  const scalar_t* g = nullptr;  // the output's gradient, (N, C, lines, L)
  const acc_t* lse = nullptr;   // backward: the merged log-sum-exp per pixel
  const acc_t* delta = nullptr; // backward: D = sum_c dout out per pixel
  // the other pass, in this pass's layout: forward, its normalised output and (max, sum);
  // backward, its gradient (added)
  const acc_t* other = nullptr;
  const acc_t* other_max = nullptr;
  const acc_t* other_sum = nullptr;
  acc_t* partial = nullptr;      // a pass that is not the last: its result in acc_t
  acc_t* partial_max = nullptr;  // forward: its (max, sum)
  acc_t* partial_sum = nullptr;
  scalar_t* out = nullptr;       // the last pass: the result in scalar_t
  acc_t* out_lse = nullptr;      // forward: the log-sum-exp
  index_t N = 0, Cq = 0, C = 0, lines = 0, L = 0;
  bool skip_self = false;        // the column pass: a pixel is not its own key
};

template <typename scalar_t, typename acc_t>
__device__ __forceinline__ acc_t rounded(acc_t x) {
  return static_cast<acc_t>(static_cast<scalar_t>(x));
}

// The shared memory of a line pass on the CUDA cores: float32 (float64) tiles, rows padded by one
// element against bank conflicts (a warp's lanes are 32 own pixels, reading down a column).
template <typename acc_t>
struct FmaTiles {
  acc_t a[kSpan][kSpan + 1];                    // [channel][own pixel]
  acc_t b[kSpan][kSpan + 1];                    // [channel][other pixel]
  acc_t w[kSpan][kSpan + 1];                    // [own][other]: the weights
  acc_t x[chunk_channels<acc_t>()][kSpan + 1];  // [channel of the chunk][other]
};

// ... and on the tensor cores (fp16 / bf16 operands in the inputs' dtype, float32 sums), laid out
// as WMMA requires: every fragment starts 32-byte aligned, leading dimensions are multiples of 16
// bytes (the 16-bit tiles' rows of 40 elements, the float32 ones' of 36). The own pixel is the
// contiguous index of every tile a thread reads or writes alone (s, d, w, o), so that a warp's 32
// lanes, 32 own pixels, touch 32 consecutive words (16 in the 16-bit w): no bank conflicts. Rows
// of 36 floats read across would put 4 lanes on each bank.
constexpr int kWarp = 32, kFrag = 16;  // WMMA's 16 x 16 x 16 fragments
constexpr int kLd16 = kSpan + 8, kLdS = kSpan + 4, kChunk16 = 64;
static_assert(kThreads / kWarp == (kSpan / kFrag) * (kChunk16 / kFrag), "a warp per fragment of the product");
struct MmaTiles {
  alignas(32) uint16_t a[kSpan * kLd16];      // [channel][own], in the inputs' dtype
  alignas(32) uint16_t b[kSpan * kLd16];      // [channel][other]
  alignas(32) float s[kSpan * kLdS];          // [other][own]: the energies in float32
  alignas(32) float d[kSpan * kLdS];          // [other][own]: dP
  alignas(32) uint16_t w[kSpan * kLd16];      // [other][own]: the weights in the value's dtype
  alignas(32) uint16_t x[kChunk16 * kLd16];   // [channel of the chunk][other]
  alignas(32) float o[kChunk16 * kLdS];       // [channel of the chunk][own]: the product, once per item
};

// e[j] += sum_c a[c, own0 + r] b[c, oth0 + grp * kPairs + j] over `channels` channels of two maps
// of one line (channel stride `plane`), kSpan channels at a time through shared memory; pixels
// beyond the line read as zero. Every thread of the block calls it (two barriers per step).
template <typename scalar_t, typename acc_t, typename index_t>
__device__ __forceinline__ void dot_tile(const scalar_t* a, const scalar_t* b, index_t channels, index_t plane,
                                         index_t L, index_t own0, index_t oth0, FmaTiles<acc_t>& t,
                                         acc_t (&e)[kPairs]) {
  const index_t r = threadIdx.x % kSpan, grp = threadIdx.x / kSpan;
  for (index_t c0 = 0; c0 < channels; c0 += kSpan) {
    for (index_t c = grp; c < kSpan; c += kGroups) {
      const bool in = c0 + c < channels;
      t.a[c][r] = in && own0 + r < L ? static_cast<acc_t>(a[(c0 + c) * plane + own0 + r]) : acc_t(0);
      t.b[c][r] = in && oth0 + r < L ? static_cast<acc_t>(b[(c0 + c) * plane + oth0 + r]) : acc_t(0);
    }
    __syncthreads();
    for (int c = 0; c < kSpan; ++c) {
      const acc_t x = t.a[c][r];
#pragma unroll
      for (int j = 0; j < kPairs; ++j) e[j] += x * t.b[c][grp * kPairs + j];
    }
    __syncthreads();
  }
}

// The same kSpan x kSpan tile of products on the tensor cores, written to out [other][own] (kLdS)
// in float32: warps 0-3 each own a 16 x 16 fragment, summed over the channels in steps of 16.
// Every thread of the block calls it; out is complete after its last barrier.
template <typename scalar_t, typename index_t>
__device__ __forceinline__ void mma_tile(const scalar_t* a, const scalar_t* b, index_t channels, index_t plane,
                                         index_t L, index_t own0, index_t oth0, MmaTiles& t, float* out) {
#if CC_FUSED_WMMA
  namespace wmma = nvcuda::wmma;
  using T = typename MmaElement<scalar_t>::type;
  const index_t r = threadIdx.x % kSpan, grp = threadIdx.x / kSpan;
  const int warp = threadIdx.x / kWarp, fi = warp / 2 % 2 * kFrag, fj = warp % 2 * kFrag;
  scalar_t* as = reinterpret_cast<scalar_t*>(t.a);
  scalar_t* bs = reinterpret_cast<scalar_t*>(t.b);
  wmma::fragment<wmma::accumulator, kFrag, kFrag, kFrag, float> sum;
  wmma::fill_fragment(sum, 0.0f);
  for (index_t c0 = 0; c0 < channels; c0 += kSpan) {
    for (index_t c = grp; c < kSpan; c += kGroups) {
      const bool in = c0 + c < channels;
      as[c * kLd16 + r] = in && own0 + r < L ? a[(c0 + c) * plane + own0 + r] : scalar_t(0);
      bs[c * kLd16 + r] = in && oth0 + r < L ? b[(c0 + c) * plane + oth0 + r] : scalar_t(0);
    }
    __syncthreads();
    if (warp < 4) {  // A (own i, channel k) = as[k][i]: column-major; B (k, other j) = bs[k][j]: row-major
      for (int k = 0; k < kSpan; k += kFrag) {
        wmma::fragment<wmma::matrix_a, kFrag, kFrag, kFrag, T, wmma::col_major> fa;
        wmma::fragment<wmma::matrix_b, kFrag, kFrag, kFrag, T, wmma::row_major> fb;
        wmma::load_matrix_sync(fa, reinterpret_cast<const T*>(as + k * kLd16 + fi), kLd16);
        wmma::load_matrix_sync(fb, reinterpret_cast<const T*>(bs + k * kLd16 + fj), kLd16);
        wmma::mma_sync(sum, fa, fb, sum);
      }
    }
    __syncthreads();
  }
  // (own i, other j) at out[j * kLdS + i]
  if (warp < 4) wmma::store_matrix_sync(out + fj * kLdS + fi, sum, kLdS, wmma::mem_col_major);
  __syncthreads();
#endif
}

// The product of the tensor-core path: warp (fi, fc) owns rows fi of the own pixels and channels fc
// of the chunk, a 16 x 16 float32 fragment that sums over the whole line in registers (no
// rescaling: the weights are final when they are formed) and goes to shared memory once per item.
#if CC_FUSED_WMMA
using ProductFragment = nvcuda::wmma::fragment<nvcuda::wmma::accumulator, kFrag, kFrag, kFrag, float>;
#else
struct ProductFragment {};
#endif

__device__ __forceinline__ void clear_product(ProductFragment& prod) {
#if CC_FUSED_WMMA
  nvcuda::wmma::fill_fragment(prod, 0.0f);
#endif
}

// prod += the weights ws [other][own] (kLd16) times the chunk x [channel][other] (kLd16), for
// this warp's fragment. Reads ws and x only: the caller's barrier before it makes them complete.
template <typename scalar_t>
__device__ __forceinline__ void mma_product(const scalar_t* ws, const scalar_t* x, ProductFragment& prod) {
#if CC_FUSED_WMMA
  namespace wmma = nvcuda::wmma;
  using T = typename MmaElement<scalar_t>::type;
  const int warp = threadIdx.x / kWarp, fi = warp / (kChunk16 / kFrag) * kFrag, fc = warp % (kChunk16 / kFrag) * kFrag;
  // A (own, other k) = ws[k][own]: column-major; B (k, channel) = x[channel][k]: column-major
  for (int k = 0; k < kSpan; k += kFrag) {
    wmma::fragment<wmma::matrix_a, kFrag, kFrag, kFrag, T, wmma::col_major> fa;
    wmma::fragment<wmma::matrix_b, kFrag, kFrag, kFrag, T, wmma::col_major> fb;
    wmma::load_matrix_sync(fa, reinterpret_cast<const T*>(ws + k * kLd16 + fi), kLd16);
    wmma::load_matrix_sync(fb, reinterpret_cast<const T*>(x + fc * kLd16 + k), kLd16);
    wmma::mma_sync(prod, fa, fb, prod);
  }
#endif
}

// out [channel of the chunk][own] (kLdS) = this warp's fragment of the product. Every thread of the
// block calls it; out is complete after its barrier.
__device__ __forceinline__ void store_product(const ProductFragment& prod, float* out) {
#if CC_FUSED_WMMA
  namespace wmma = nvcuda::wmma;
  const int warp = threadIdx.x / kWarp, fi = warp / (kChunk16 / kFrag) * kFrag, fc = warp % (kChunk16 / kFrag) * kFrag;
  wmma::store_matrix_sync(out + fc * kLdS + fi, prod, kLdS, wmma::mem_col_major);
#endif
  __syncthreads();
}

// Blocks per SM the line passes are built for: 4 (at most 64 registers a thread, 4 x 8 warps) with
// float32 sums and 32-bit indices, where ptxas (sm_90) fits every mode without spilling; 2 (128
// registers) for float64 or 64-bit indices, which spill at 4 (float64 at 3 too);
// tests/test_kernel_resources.py holds every mode to this.
template <typename scalar_t, typename index_t>
constexpr int line_pass_min_blocks() {
  return sizeof(at::opmath_type<scalar_t>) == 4 && sizeof(index_t) == 4 ? 4 : 2;
}

// TensorCores false keeps fp16 / bf16 on the CUDA cores (the emulation compares both paths).
template <LineMode Mode, bool TensorCores, typename scalar_t, typename index_t>
__global__ void __launch_bounds__(kThreads, line_pass_min_blocks<scalar_t, index_t>())
    line_pass_kernel(const LineArgs<scalar_t, index_t> a) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int kPer = per_thread<acc_t>(), kChunk = chunk_channels<acc_t>();
  constexpr bool kStats = Mode == LineMode::Stats;
  constexpr bool kOwnQuery = kStats || Mode == LineMode::Forward || Mode == LineMode::GradQuery;
  constexpr bool kNeedsDp = Mode == LineMode::GradQuery || Mode == LineMode::GradKey;
  constexpr acc_t kNone = -std::numeric_limits<acc_t>::infinity();
  constexpr bool kMma = TensorCores && uses_tensor_cores<scalar_t>();
  static_assert(!kMma || kChunk == kChunk16, "the tensor-core tiles hold chunks of 64 channels");
  using Tiles = std::conditional_t<kMma, MmaTiles, FmaTiles<acc_t>>;
  CC_SHARED(Tiles, tiles_);
  const index_t r = threadIdx.x % kSpan, grp = threadIdx.x / kSpan;
  const index_t L = a.L, plane = a.lines * L;
  // the output's channels, and the map whose other pixels are summed into them (none for Stats)
  const index_t out_channels = Mode == LineMode::Forward || Mode == LineMode::GradValue ? a.C : a.Cq;
  const index_t chunks = kStats ? 1 : (out_channels + kChunk - 1) / kChunk, tiles = (L + kSpan - 1) / kSpan;
  CC_FOR_EACH_TILE(index_t, item, a.N * a.lines * tiles * chunks) {
    const index_t chunk = item % chunks, own0 = item / chunks % tiles * kSpan;
    const index_t line = item / (chunks * tiles) % a.lines, n = item / (chunks * tiles * a.lines);
    const index_t stats = (n * a.lines + line) * L;  // per-pixel statistics of the line
    const auto line_of = [&](const scalar_t* map, index_t channels) { return map + n * channels * plane + line * L; };
    const scalar_t* q = line_of(a.q, a.Cq);
    const scalar_t* k = line_of(a.k, a.Cq);
    const scalar_t* xs = kStats                        ? nullptr
                         : Mode == LineMode::Forward   ? line_of(a.v, a.C)
                         : Mode == LineMode::GradQuery ? k
                         : Mode == LineMode::GradKey   ? q
                                                       : line_of(a.g, a.C);
    const index_t own = own0 + r, c_first = chunk * kChunk;
    const bool own_in = own < L;
    acc_t acc[kPer];
#pragma unroll
    for (int i = 0; i < kPer; ++i) acc[i] = 0;
    ProductFragment prod;
    if constexpr (kMma && !kStats) clear_product(prod);
    acc_t run_max = kNone, run_sum = 0;  // Stats: the online softmax of this thread's pairs
    acc_t own_lse = 0, own_delta = 0;    // forward and dq: the own pixel's
    if constexpr (Mode == LineMode::Forward || Mode == LineMode::GradQuery) {
      if (own_in) own_lse = a.lse[stats + own];
      if constexpr (Mode == LineMode::GradQuery) {
        if (own_in) own_delta = a.delta[stats + own];
      }
    }
    for (index_t oth0 = 0; oth0 < L; oth0 += kSpan) {
      acc_t e[kPairs] = {}, dp[kPairs] = {};
      // dP[query, key] = sum_c dout[c, query] v[c, key]
      const scalar_t* g = kNeedsDp ? line_of(a.g, a.C) : nullptr;
      const scalar_t* v = kNeedsDp ? line_of(a.v, a.C) : nullptr;
      if constexpr (kMma) {
        mma_tile(kOwnQuery ? q : k, kOwnQuery ? k : q, a.Cq, plane, L, own0, oth0, tiles_, tiles_.s);
        if constexpr (kNeedsDp) mma_tile(kOwnQuery ? g : v, kOwnQuery ? v : g, a.C, plane, L, own0, oth0, tiles_, tiles_.d);
#pragma unroll
        for (int j = 0; j < kPairs; ++j) {  // this thread's pairs
          e[j] = tiles_.s[(grp * kPairs + j) * kLdS + r];
          if constexpr (kNeedsDp) dp[j] = tiles_.d[(grp * kPairs + j) * kLdS + r];
        }
        if constexpr (!kStats) {
          scalar_t* xs16 = reinterpret_cast<scalar_t*>(tiles_.x);
          for (index_t c = grp; c < kChunk; c += kGroups) {  // the chunk of the other pixels' channels
            const bool in = c_first + c < out_channels && oth0 + r < L;
            xs16[c * kLd16 + r] = in ? xs[(c_first + c) * plane + oth0 + r] : scalar_t(0);
          }
        }
      } else {
        dot_tile(kOwnQuery ? q : k, kOwnQuery ? k : q, a.Cq, plane, L, own0, oth0, tiles_, e);
        if constexpr (kNeedsDp) dot_tile(kOwnQuery ? g : v, kOwnQuery ? v : g, a.C, plane, L, own0, oth0, tiles_, dp);
        if constexpr (!kStats) {
          for (index_t c = grp; c < kChunk; c += kGroups) {  // the chunk of the other pixels' channels
            const bool in = c_first + c < out_channels && oth0 + r < L;
            tiles_.x[c][r] = in ? static_cast<acc_t>(xs[(c_first + c) * plane + oth0 + r]) : acc_t(0);
          }
        }
      }
      acc_t tile_max = kNone;  // Stats
#pragma unroll
      for (int j = 0; j < kPairs; ++j) {
        const index_t other = grp * kPairs + j, oth = oth0 + other;
        const bool pair = oth < L && !(a.skip_self && oth == own);
        const acc_t energy = pair ? rounded<scalar_t>(e[j]) : kNone;
        if constexpr (kStats) {
          e[j] = energy;
          tile_max = cc_max(tile_max, energy);
        } else {
          // the query's log-sum-exp (and D): the own pixel's (forward, dq), else the other's
          const acc_t lse = kOwnQuery ? own_lse : (pair ? a.lse[stats + oth] : acc_t(0));
          const acc_t p = pair ? cc_exp(energy - lse) : acc_t(0);
          acc_t w;
          if constexpr (Mode == LineMode::Forward || Mode == LineMode::GradValue) {
            w = rounded<scalar_t>(p);
          } else {
            const acc_t delta = kOwnQuery ? own_delta : (pair ? a.delta[stats + oth] : acc_t(0));
            w = rounded<scalar_t>(p * (rounded<scalar_t>(dp[j]) - delta));
          }
          if constexpr (kMma) {
            reinterpret_cast<scalar_t*>(tiles_.w)[other * kLd16 + r] = static_cast<scalar_t>(w);
          } else {
            tiles_.w[r][other] = w;
          }
        }
      }
      if constexpr (kStats) {  // the running (max, sum) over this thread's pairs so far
        const acc_t m = cc_max(run_max, tile_max);
        if (m != kNone) {  // 0 while nothing was seen
          run_sum *= cc_exp(run_max - m);
#pragma unroll
          for (int j = 0; j < kPairs; ++j) run_sum += cc_exp(e[j] - m);
          run_max = m;
        }
        // no barrier: the energy tile is written again only after the next tile's first barrier
      } else {
        __syncthreads();  // the weights and the chunk, complete
        if constexpr (kMma) {
          mma_product(reinterpret_cast<const scalar_t*>(tiles_.w), reinterpret_cast<const scalar_t*>(tiles_.x), prod);
        } else {
          for (int j = 0; j < kSpan; ++j) {
            const acc_t w = tiles_.w[r][j];
#pragma unroll
            for (int i = 0; i < kPer; ++i) acc[i] += w * tiles_.x[grp + i * kGroups][j];
          }
        }
        // no barrier here: the weights and the chunk are written again only after the next tile's
        // energies have passed a barrier (dot_tile and mma_tile take at least one step: C' >= 1,
        // checked), which every thread reaches once done reading them
      }
    }
    if constexpr (kStats) {
      // the pixel's (max, sum) from its kGroups threads', merged in group order
      using Partial = acc_t[kGroups][kSpan];
      CC_SHARED(Partial, part_max_);
      CC_SHARED(Partial, part_sum_);
      part_max_[grp][r] = run_max;
      part_sum_[grp][r] = run_sum;
      __syncthreads();
      if (grp == 0 && own_in) {
        acc_t m = kNone, s = 0;
        for (int t = 0; t < kGroups; ++t) m = cc_max(m, part_max_[t][r]);
        if (m != kNone) {
          for (int t = 0; t < kGroups; ++t) s += part_sum_[t][r] * cc_exp(part_max_[t][r] - m);
        }
        const index_t at = stats + own;
        if (a.out_lse == nullptr) {  // the column pass: its (max, sum), merged by the row pass
          a.partial_max[at] = m;
          a.partial_sum[at] = s;
        } else if (a.other_max != nullptr) {  // merged with the column pass's as two softmax blocks
          const acc_t top = cc_max(m, a.other_max[at]);
          const acc_t total = s * cc_exp(m - top) + a.other_sum[at] * cc_exp(a.other_max[at] - top);
          a.out_lse[at] = top + cc_log(total);
        } else {
          a.out_lse[at] = m + cc_log(s);
        }
      }
      // no barrier here: the next item's partial statistics are written only after its first
      // energy tile has passed a barrier, which every thread reaches once done reading these
    } else {
      if constexpr (kMma) {  // the product, from the warps' fragments
        store_product(prod, tiles_.o);
#pragma unroll
        for (int i = 0; i < kPer; ++i) acc[i] = tiles_.o[(grp + i * kGroups) * kLdS + r];
      }
      if (own_in) {
#pragma unroll
        for (int i = 0; i < kPer; ++i) {
          const index_t c = c_first + grp + i * kGroups;
          if (c >= out_channels) break;
          const index_t idx = (n * out_channels + c) * plane + line * L + own;
          acc_t value = acc[i];
          if (a.other != nullptr) value += a.other[idx];  // the column pass's
          if (a.out != nullptr) {
            a.out[idx] = static_cast<scalar_t>(value);
          } else {
            a.partial[idx] = value;
          }
        }
      }
    }
  }
}

// D[n, p] = sum_c g[n, c, p] out[n, c, p] in acc_t. A block takes kSpan pixels at a time (a warp's
// lanes, coalesced along p), its kThreads / kSpan warps each summing every (kThreads / kSpan)-th
// channel; the warps' partial sums are then added in warp order (deterministic). Grid-stride over
// tiles of pixels, the same trip count for every thread of a block (its barriers reached by all).
constexpr int kDeltaGroups = kThreads / kSpan;

inline int64_t delta_tiles(int64_t N, int64_t P) { return (N * P + kSpan - 1) / kSpan; }

template <typename scalar_t, typename index_t>
__global__ void delta_kernel(const scalar_t* __restrict__ g, const scalar_t* __restrict__ out,
                             at::opmath_type<scalar_t>* __restrict__ delta, index_t N, index_t C, index_t P) {
  using acc_t = at::opmath_type<scalar_t>;
  using Partial = acc_t[kDeltaGroups][kSpan];
  CC_SHARED(Partial, partial_);
  const index_t lane = threadIdx.x % kSpan, grp = threadIdx.x / kSpan;
  CC_FOR_EACH_TILE(index_t, tile, (N * P + kSpan - 1) / kSpan) {
    const index_t item = tile * kSpan + lane;
    acc_t sum = 0;
    if (item < N * P) {
      const index_t base = item / P * C * P + item % P;
      for (index_t c = grp; c < C; c += kDeltaGroups)
        sum += static_cast<acc_t>(g[base + c * P]) * static_cast<acc_t>(out[base + c * P]);
    }
    partial_[grp][lane] = sum;
    __syncthreads();
    if (grp == 0 && item < N * P) {
      acc_t total = partial_[0][lane];
      for (int j = 1; j < kDeltaGroups; ++j) total += partial_[j][lane];
      delta[item] = total;
    }
    __syncthreads();  // the next tile's partial sums overwrite these
  }
}

// Blocks of one line pass: a block per (image, line, tile of the line), times the chunks of output
// channels in a product pass (a Stats pass owns pixels, not channels).
inline int64_t stats_pass_items(int64_t N, int64_t lines, int64_t L) { return N * lines * tiles_of(L); }
template <typename acc_t>
inline int64_t line_pass_items(int64_t N, int64_t lines, int64_t L, int64_t out_channels) {
  return stats_pass_items(N, lines, L) * ((out_channels + chunk_channels<acc_t>() - 1) / chunk_channels<acc_t>());
}

template <typename T>
const T* const_or_null(const at::Tensor& t) {
  return t.defined() ? t.const_data_ptr<T>() : nullptr;
}
template <typename T>
T* mutable_or_null(const at::Tensor& t) {
  return t.defined() ? t.mutable_data_ptr<T>() : nullptr;
}

// The tensors of one line pass (undefined where the mode has none), in the pass's layout.
struct LineTensors {
  at::Tensor q, k, v, g, lse, delta, other, other_max, other_sum, partial, partial_max, partial_sum, out, out_lse;
  bool skip_self = false;
  bool tensor_cores = true;  // false: fp16 / bf16 on the CUDA cores (the emulation only)
};

template <LineMode Mode>
void run_line_pass(const LineTensors& t, int64_t max_blocks) {
  const int64_t N = t.q.size(0), Cq = t.q.size(1), lines = t.q.size(2), L = t.q.size(3);
  const int64_t C = t.v.size(1), out_channels = Mode == LineMode::Forward || Mode == LineMode::GradValue ? C : Cq;
  CC_DISPATCH(t.q.scalar_type(), "cc_line_pass_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const int64_t items =
        Mode == LineMode::Stats ? stats_pass_items(N, lines, L) : line_pass_items<acc_t>(N, lines, L, out_channels);
    with_index_type(N * std::max(C, Cq) * lines * L + items, [&](auto index) {
      using index_t = decltype(index);
      LineArgs<scalar_t, index_t> args;
      args.q = const_or_null<scalar_t>(t.q);
      args.k = const_or_null<scalar_t>(t.k);
      args.v = const_or_null<scalar_t>(t.v);
      args.g = const_or_null<scalar_t>(t.g);
      args.lse = const_or_null<acc_t>(t.lse);
      args.delta = const_or_null<acc_t>(t.delta);
      args.other = const_or_null<acc_t>(t.other);
      args.other_max = const_or_null<acc_t>(t.other_max);
      args.other_sum = const_or_null<acc_t>(t.other_sum);
      args.partial = mutable_or_null<acc_t>(t.partial);
      args.partial_max = mutable_or_null<acc_t>(t.partial_max);
      args.partial_sum = mutable_or_null<acc_t>(t.partial_sum);
      args.out = mutable_or_null<scalar_t>(t.out);
      args.out_lse = mutable_or_null<acc_t>(t.out_lse);
      args.N = index_t(N), args.Cq = index_t(Cq), args.C = index_t(C), args.lines = index_t(lines), args.L = index_t(L);
      args.skip_self = t.skip_self;
#if defined(CC_EMULATED)
      if (!t.tensor_cores) {
        auto kernel = line_pass_kernel<Mode, false, scalar_t, index_t>;
        CC_LAUNCH_BLOCKS(kernel, tile_blocks(items, max_blocks), kThreads, args);
        return;
      }
#endif
      TORCH_INTERNAL_ASSERT(t.tensor_cores, "cc_attention_fused: CUDA-core tiles for fp16 / bf16 are the emulation's");
      auto kernel = line_pass_kernel<Mode, true, scalar_t, index_t>;
      CC_LAUNCH_BLOCKS(kernel, tile_blocks(items, max_blocks), kThreads, args);
    });
  });
}

// (N, H, W) statistics seen as one-channel maps, to transpose with the C-channel ones.
at::Tensor transposed_stats(const at::Tensor& s, int64_t max_blocks) {
  return transposed(s.unsqueeze(1), max_blocks).squeeze(1);
}

// (out, log-sum-exp (N, H, W) in float32 / float64) from query, key (N, C', H, W) and value
// (N, C, H, W), without the attention map.
// tensor_cores false (the emulation only) keeps fp16 / bf16 on the CUDA cores.
std::tuple<at::Tensor, at::Tensor> launch_fused_attention(const at::Tensor& q_in, const at::Tensor& k_in,
                                                          const at::Tensor& v_in, int64_t max_blocks,
                                                          bool tensor_cores = true) {
  check_attention_args(q_in, k_in, v_in, "cc_attention_fused");
  CC_DEVICE_GUARD(q_in.device());
  const at::Tensor q = q_in.contiguous(), k = k_in.contiguous(), v = v_in.contiguous();
  const int64_t N = v.size(0), C = v.size(1), H = v.size(2), W = v.size(3);
  const auto acc = v.options().dtype(at::toOpMathType(v.scalar_type()));
  at::Tensor out = at::empty_like(v, at::MemoryFormat::Contiguous), lse = at::empty({N, H, W}, acc);
  // the statistics: the column pass's (max, sum) on the transposed maps, transposed back and merged
  // by the row pass into the log-sum-exp
  LineTensors rows{q, k, v}, cols;
  rows.tensor_cores = tensor_cores;
  if (H > 1) {
    cols = {transposed(q, max_blocks), transposed(k, max_blocks), transposed(v, max_blocks)};
    cols.skip_self = true, cols.tensor_cores = tensor_cores;
    cols.partial_max = at::empty({N, W, H}, acc);
    cols.partial_sum = at::empty({N, W, H}, acc);
    run_line_pass<LineMode::Stats>(cols, max_blocks);
    rows.other_max = transposed_stats(cols.partial_max, max_blocks);
    rows.other_sum = transposed_stats(cols.partial_sum, max_blocks);
    cols.partial_max = cols.partial_sum = at::Tensor();
  }
  rows.out_lse = lse;
  run_line_pass<LineMode::Stats>(rows, max_blocks);
  rows.other_max = rows.other_sum = rows.out_lse = at::Tensor();
  // the output: each pass's product with the final weights exp(E - lse), the column pass's in
  // float32 transposed back and added by the row pass
  rows.lse = lse;
  if (H > 1) {
    cols.lse = transposed_stats(lse, max_blocks);
    cols.partial = at::empty({N, C, W, H}, acc);
    run_line_pass<LineMode::Forward>(cols, max_blocks);
    rows.other = transposed(cols.partial, max_blocks);
    cols = LineTensors();  // the transposed maps and the column pass's own result freed
  }
  rows.out = out;
  run_line_pass<LineMode::Forward>(rows, max_blocks);
  return {out, lse};
}

// (dq, dk, dv) from the output's gradient, the inputs, and the output and log-sum-exp of
// launch_fused_attention.
std::tuple<at::Tensor, at::Tensor, at::Tensor> launch_fused_attention_backward(
    const at::Tensor& g_in, const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
    const at::Tensor& out_in, const at::Tensor& lse_in, int64_t max_blocks, bool tensor_cores = true) {
  const char* op = "cc_attention_fused_backward";
  check_attention_args(q_in, k_in, v_in, op);
  check_same_kind(g_in, "grad", v_in, "value", op);
  check_same_kind(out_in, "out", v_in, "value", op);
  TORCH_CHECK_VALUE(g_in.sizes() == v_in.sizes() && out_in.sizes() == v_in.sizes(), op, ": grad ", g_in.sizes(),
                    " and out ", out_in.sizes(), " must have the shape of value ", v_in.sizes());
  const int64_t N = v_in.size(0), C = v_in.size(1), H = v_in.size(2), W = v_in.size(3);
  const at::ScalarType acc_type = at::toOpMathType(v_in.scalar_type());
  const auto acc = v_in.options().dtype(acc_type);
  TORCH_CHECK_VALUE(lse_in.device() == v_in.device() && lse_in.scalar_type() == acc_type &&
                        lse_in.sizes() == at::IntArrayRef({N, H, W}),
                    op, ": lse must be (N, H, W) = (", N, ", ", H, ", ", W, ") in ", acc_type, " on ",
                    v_in.device(), ", got ", lse_in.sizes(), " in ", lse_in.scalar_type(), " on ", lse_in.device());
  CC_DEVICE_GUARD(q_in.device());
  const at::Tensor g = g_in.contiguous(), q = q_in.contiguous(), k = k_in.contiguous(), v = v_in.contiguous();
  const at::Tensor out = out_in.contiguous(), lse = lse_in.contiguous();
  at::Tensor delta = at::empty({N, H, W}, acc);
  CC_DISPATCH(v.scalar_type(), "cc_delta_cuda", [&] {
    with_index_type(N * C * H * W, [&](auto index) {
      using index_t = decltype(index);
      auto kernel = delta_kernel<scalar_t, index_t>;
      CC_LAUNCH_BLOCKS(kernel, tile_blocks(delta_tiles(N, H * W), max_blocks), kThreads, g.const_data_ptr<scalar_t>(),
                       out.const_data_ptr<scalar_t>(), delta.mutable_data_ptr<at::opmath_type<scalar_t>>(),
                       index_t(N), index_t(C), index_t(H * W));
    });
  });
  at::Tensor dq = at::empty_like(q, at::MemoryFormat::Contiguous), dk = at::empty_like(k, at::MemoryFormat::Contiguous);
  at::Tensor dv = at::empty_like(v, at::MemoryFormat::Contiguous);
  LineTensors rows{q, k, v, g, lse, delta}, cols;
  if (H > 1) {
    cols = {transposed(q, max_blocks), transposed(k, max_blocks), transposed(v, max_blocks), transposed(g, max_blocks),
            transposed_stats(lse, max_blocks), transposed_stats(delta, max_blocks)};
    cols.skip_self = true;
  }
  rows.tensor_cores = cols.tensor_cores = tensor_cores;
  // one gradient at a time, its column pass then its row pass, so that one float32 column result
  // (and its transpose) is held at a time
  const auto gradient = [&](auto mode, at::Tensor& result) {
    constexpr LineMode kMode = decltype(mode)::value;
    rows.other = at::Tensor();
    if (H > 1) {
      cols.partial = at::empty({N, result.size(1), W, H}, acc);
      run_line_pass<kMode>(cols, max_blocks);
      rows.other = transposed(cols.partial, max_blocks);
      cols.partial = at::Tensor();
    }
    rows.out = result;
    run_line_pass<kMode>(rows, max_blocks);
  };
  gradient(std::integral_constant<LineMode, LineMode::GradQuery>{}, dq);
  gradient(std::integral_constant<LineMode, LineMode::GradKey>{}, dk);
  gradient(std::integral_constant<LineMode, LineMode::GradValue>{}, dv);
  return {dq, dk, dv};
}

}  // namespace
}  // namespace ccnet_ops
