// Criss-cross attention: operator schemas and CPU kernels.
//
// Three primitives carry the whole operator and its derivatives of any order. With
// p_s(y, x) the key pixel of slot s of query pixel (y, x) (cc_index.h):
//   cc_energy(a, b)[n, s, y, x]    = sum_c a[n, c, y, x] * b[n, c, p_s(y, x)]
//   cc_aggregate(w, v)[n, c, y, x] = sum_s w[n, s, y, x] * v[n, c, p_s(y, x)]
//   cc_scatter(w, g)[n, c, p]      = sum_{(s, y, x): p_s(y, x) = p} w[n, s, y, x] * g[n, c, y, x]
// The energy of the paper is cc_energy(Q, K), its output cc_aggregate(softmax(E), V); the
// gradients are again primitives (d cc_energy: cc_aggregate and cc_scatter, and so on), so
// the backward is built from registered ops (ops/criss_cross.py).
//
// On the CPU the row slots are register-tiled kernels of ours with AVX-512 (float32, and bfloat16
// on a CPU with bf16 dot products), else BLAS GEMMs, one per image row; the column slots are
// register-tiled kernels
// whose SIMD lanes run along x, the contiguous dimension, each lane a small GEMM of its own over
// packed operands.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/bmm.h>
#include <ATen/ops/empty_like.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <string_view>
#include <limits>
#include <memory>
#include <type_traits>
#include <vector>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "cc_checks.h"
#include "cc_index.h"

namespace ccnet_ops {
namespace {

// A vector of E of Bytes bytes (GCC/Clang vector extension); E is a template parameter because
// GCC drops vector_size from a non-dependent type that a class template declares.
template <typename E, int Bytes>
struct Simd {
  typedef E V __attribute__((vector_size(Bytes)));
};

// A SIMD vector of Bytes bytes (GCC/Clang vector extension); the compiler lowers it to
// AVX-512, AVX, SSE or scalar code depending on the target.
template <typename T, int Bytes>
struct Vec {
  using Scalar = T;
  typedef T V __attribute__((vector_size(Bytes)));
  static constexpr int64_t kLanes = Bytes / sizeof(T);

  static inline V zero() { return V{}; }
  // Loads n <= kLanes elements, zero filling the rest; Full means n == kLanes. The partial
  // forms are masked loads and stores, so a tail never reads or writes past the tensor. A
  // float vector also loads bfloat16 storage (S), widened exactly, and stores to it rounded to
  // nearest even, as c10::BFloat16 rounds.
  template <bool Full, typename S>
  static inline V load(const S* p, int64_t n) {
    if constexpr (!std::is_same_v<S, T>) {
      return widen(load_bits<Full>(p, n));
    } else if constexpr (Full) {
      V v;
      std::memcpy(&v, p, sizeof(V));
      return v;
    } else {
      return load_part(p, n);
    }
  }
  template <bool Full, typename S>
  static inline void store(S* p, V v, int64_t n) {
    if constexpr (!std::is_same_v<S, T>) {
      store_bits<Full>(p, narrow(v), n);
    } else if constexpr (Full) {
      std::memcpy(p, &v, sizeof(V));
    } else {
      store_part(p, v, n);
    }
  }

  // bfloat16 is the upper half of a float32: kLanes of them fill half a vector.
  using Bits = typename Simd<uint16_t, Bytes / 2>::V;
  using Words = typename Simd<uint32_t, Bytes>::V;
  template <bool Full>
  static inline Bits load_bits(const c10::BFloat16* p, int64_t n) {
    static_assert(std::is_same_v<T, float>, "bfloat16 storage widens to float vectors");
    Bits b{};
    std::memcpy(&b, p, (Full ? kLanes : n) * sizeof(uint16_t));
    return b;
  }
  template <bool Full>
  static inline void store_bits(c10::BFloat16* p, Bits b, int64_t n) {
    std::memcpy(p, &b, (Full ? kLanes : n) * sizeof(uint16_t));
  }
  // Two bf16 rows as one operand of the bf16 dot product: lane l holds (lo[l], hi[l]) in one
  // 32-bit word; a null hi reads as zeros.
  template <bool Full>
  static inline Words pair(const c10::BFloat16* lo, const c10::BFloat16* hi, int64_t n) {
    return pair(load_bits<Full>(lo, n), hi ? load_bits<Full>(hi, n) : Bits{});
  }
  static inline Words pair(Bits lo, Bits hi) {
    return __builtin_convertvector(lo, Words) | __builtin_convertvector(hi, Words) << 16;
  }
#if defined(__AVX512BF16__)
  // acc + lo(a) lo(b) + hi(a) hi(b) per lane, in float32 (vdpbf16ps).
  static inline V dot(V acc, Words a, Words b) {
    if constexpr (Bytes == 64) {
      return (V)_mm512_dpbf16_ps((__m512)acc, (__m512bh)a, (__m512bh)b);
    } else {
      return (V)_mm256_dpbf16_ps((__m256)acc, (__m256bh)a, (__m256bh)b);
    }
  }
#endif
  static inline V widen(Bits b) {
    const Words w = __builtin_convertvector(b, Words) << 16;
    V v;
    std::memcpy(&v, &w, sizeof(V));
    return v;
  }
  // c10::BFloat16's rounding: to nearest, ties to even; NaN to the quiet NaN 0x7FC0.
  static inline Bits narrow(V v) {
    Words w;
    std::memcpy(&w, &v, sizeof(V));
    const Words nan = reinterpret_cast<Words>(v != v);
    w = (w + 0x7FFFu + ((w >> 16) & 1u)) >> 16;
    w = (w & ~nan) | (Words{} + 0x7FC0u & nan);
    return __builtin_convertvector(w, Bits);
  }
  static inline V load_part(const T* p, int64_t n) {
#if defined(__AVX512F__)
    if constexpr (Bytes == 64) {
      const __mmask16 m = static_cast<__mmask16>((1u << n) - 1u);
      if constexpr (sizeof(T) == 4) return (V)_mm512_maskz_loadu_ps(m, p);
      else return (V)_mm512_maskz_loadu_pd(static_cast<__mmask8>(m), p);
    }
#endif
#if defined(__AVX512VL__)
    if constexpr (Bytes == 32) {
      const __mmask8 m = static_cast<__mmask8>((1u << n) - 1u);
      if constexpr (sizeof(T) == 4) return (V)_mm256_maskz_loadu_ps(m, p);
      else return (V)_mm256_maskz_loadu_pd(m, p);
    }
#endif
    V v = zero();
    for (int64_t l = 0; l < n; ++l) v[l] = p[l];
    return v;
  }
  static inline void store_part(T* p, V v, int64_t n) {
#if defined(__AVX512F__)
    if constexpr (Bytes == 64) {
      const __mmask16 m = static_cast<__mmask16>((1u << n) - 1u);
      if constexpr (sizeof(T) == 4) _mm512_mask_storeu_ps(p, m, (__m512)v);
      else _mm512_mask_storeu_pd(p, static_cast<__mmask8>(m), (__m512d)v);
      return;
    }
#endif
#if defined(__AVX512VL__)
    if constexpr (Bytes == 32) {
      const __mmask8 m = static_cast<__mmask8>((1u << n) - 1u);
      if constexpr (sizeof(T) == 4) _mm256_mask_storeu_ps(p, m, (__m256)v);
      else _mm256_mask_storeu_pd(p, m, (__m256d)v);
      return;
    }
#endif
    for (int64_t l = 0; l < n; ++l) p[l] = v[l];
  }
};

// AVX-512 gives 32 vector registers of 64 bytes, so tiles of 16 float lanes along x and twice
// the register tile; older targets 16 registers of 32 bytes.
#if defined(__AVX512F__)
constexpr int kVecBytes = 64;
constexpr int kWide = 2;
#else
constexpr int kVecBytes = 32;
constexpr int kWide = 1;
#endif

template <typename T>
using WideVec = Vec<T, kVecBytes>;  // the vector of a column tile
template <typename T>
using NarrowVec = Vec<T, 32>;       // the vector of a tail tile that half a wide one holds

// Whether the CPU has bf16 dot products (AVX512_BF16: twice the products of an FMA per lane).
#if defined(__AVX512BF16__)
constexpr bool kBFloat16Dot = true;
#else
constexpr bool kBFloat16Dot = false;
#endif

// A reduction step of the column kernels over storage S. In general a step takes one row of
// each operand per lane and is an FMA; for bf16 storage on a CPU with bf16 dot products it takes
// two rows, paired into one operand (Vec::pair), and is one dot product: half the steps.
template <typename S>
constexpr bool kDot = kBFloat16Dot && std::is_same_v<S, c10::BFloat16>;
template <typename VT, typename S>
using Operand = std::conditional_t<kDot<S>, typename VT::Words, typename VT::V>;

// Steps over n rows: n, or n / 2 pairs rounded up.
template <typename S>
constexpr int64_t steps(int64_t n) {
  return kDot<S> ? (n + 1) / 2 : n;
}

// The operand of step s over `rows` rows of nx lanes each, `stride` apart from base: row s, or
// rows 2s and 2s + 1 (a row past the last reads as zeros).
template <typename VT, bool Full, typename S>
inline Operand<VT, S> operand(const S* base, int64_t stride, int64_t s, int64_t rows, int64_t nx) {
  if constexpr (kDot<S>) {
    return VT::template pair<Full>(base + 2 * s * stride, 2 * s + 1 < rows ? base + (2 * s + 1) * stride : nullptr,
                                   nx);
  } else {
    return VT::template load<Full>(base + s * stride, nx);
  }
}

template <typename VT, typename S>
inline typename VT::V step(typename VT::V acc, Operand<VT, S> a, Operand<VT, S> b) {
  if constexpr (kDot<S>) {
#if defined(__AVX512BF16__)
    return VT::dot(acc, a, b);
#endif
  } else {
    return acc + a * b;
  }
}

// Calls f(VT{}, std::bool_constant<Full>{}) with the vector type for a column tile of nx lanes:
// the wide vector for a full tile; for a tail, the narrow one where it holds the tail (a wide
// tile that is mostly padding would do twice the work), else the wide one with masks.
template <typename T, typename F>
inline void dispatch_tile(int64_t nx, const F& f) {
  using Wide = WideVec<T>;
  using Narrow = NarrowVec<T>;
  if (nx == Wide::kLanes) {
    f(Wide{}, std::true_type{});
  } else if (Narrow::kLanes < Wide::kLanes && nx <= Narrow::kLanes) {
    if (nx == Narrow::kLanes) {
      f(Narrow{}, std::true_type{});
    } else {
      f(Narrow{}, std::false_type{});
    }
  } else {
    f(Wide{}, std::false_type{});
  }
}

// Per-thread scratch memory for the packed operands of one work item, kept between calls and
// never zero filled: a fresh buffer per item would cost page faults and a memset as large as the
// pack. Slot tells apart the buffers one thread holds at once. Each vector type (wide, narrow;
// float, double) has its own, which only grows: for the column energy about 3.6 KB per channel
// with AVX-512 (1.9 MB at C = 512), less for the column passes; in bf16 with dot products half
// that, plus the column weights' staging, 32 H^2 bytes (0.3 MB at H = 97); with AVX-512 the row
// energy's two packs (0.23 MB each in float32 at C = 512, W = 97, half that in bf16) and a row's
// packed weights for the aggregations (43 KB in float32 at W = 97, about 4 W^2 bytes).
template <typename V, int Slot>
V* scratch(int64_t n) {
  thread_local std::unique_ptr<V[]> buffer;
  thread_local int64_t size = 0;
  if (size < n) {
    buffer.reset(new V[n]);
    size = n;
  }
  return buffer.get();
}

// Column passes of cc_aggregate (Scatter = false) and cc_scatter (Scatter = true):
//   out[c, m, x] += sum_{t != m} in[c, t, x] * weight(m, t)[x]
// where weight links query row m to key row t (aggregate) or key row m to query row t
// (scatter); the pair t == m has no column slot and reads as zero. Every lane x is a small
// GEMM of its own. The weights of one SIMD column tile are gathered once into a packed
// (m block, t, m in block) buffer shared by all channels; the input is packed RC channels at
// a time; so the inner loop reads only contiguous, aligned memory that stays in cache.
constexpr int kMixRows = 3;  // RM: output rows per register tile

// Reads the column slots of one SIMD column tile plane by plane, in memory order, into the
// pack: entry (m / RM, t, m % RM) holds weight(m, t); the entries without a slot (t == m, and
// the rows m >= H that pad the last block) hold zero. With bf16 dot products an entry is a
// step, (m / RM, t / 2, m % RM), the weights of t and t + 1 paired (zero for t + 1 = H).
template <typename VT, bool Scatter, bool Full, typename S>
void pack_column_weights(const S* attn, Operand<VT, S>* pack, int64_t x0, int64_t nx, int64_t H, int64_t W) {
  constexpr int RM = kMixRows;
  if constexpr (kDot<S>) {
    // the same weights as bf16 lanes first, entry (m, t) at half[m * H2 + t] for t < H2, an even
    // count (a zero row t = H pads an odd H), then paired along t into the pack's (m / RM, t / 2,
    // m % RM) entries
    using Bits = typename VT::Bits;
    const int64_t H2 = (H + 1) / 2 * 2, M = (H + RM - 1) / RM * RM;
    Bits* half = scratch<Bits, 2>(M * H2);
    for (int64_t m = 0; m < M; ++m) {
      if (m < H) {
        half[m * H2 + m] = Bits{};
        if (H2 > H) half[m * H2 + H] = Bits{};
      } else {
        for (int64_t t = 0; t < H2; ++t) half[m * H2 + t] = Bits{};
      }
    }
    for (int64_t j = 0; j < H - 1; ++j)
      for (int64_t y = 0; y < H; ++y) {
        const int64_t k = column_pixel(j, y);
        const int64_t m = Scatter ? k : y, t = Scatter ? y : k;
        half[m * H2 + t] = VT::template load_bits<Full>(attn + attn_offset(W + j, y, x0, H, W), nx);
      }
    for (int64_t m = 0; m < M; ++m)
      for (int64_t s = 0; s < H2 / 2; ++s)
        pack[(m / RM * (H2 / 2) + s) * RM + m % RM] = VT::pair(half[m * H2 + 2 * s], half[m * H2 + 2 * s + 1]);
  } else {
    for (int64_t m = 0; m < H; ++m) pack[(m / RM * H + m) * RM + m % RM] = VT::zero();
    for (int64_t m = H; m < (H + RM - 1) / RM * RM; ++m)
      for (int64_t t = 0; t < H; ++t) pack[(m / RM * H + t) * RM + m % RM] = VT::zero();
    for (int64_t j = 0; j < H - 1; ++j)
      for (int64_t y = 0; y < H; ++y) {
        const int64_t k = column_pixel(j, y);  // query row y reads key row k
        const int64_t m = Scatter ? k : y, t = Scatter ? y : k;
        pack[(m / RM * H + t) * RM + m % RM] = VT::template load<Full>(attn + attn_offset(W + j, y, x0, H, W), nx);
      }
  }
}

// out = sums + the column sums, rounded once to S; sums holds the row pass's for the channels from
// sums_first on (it may be out, with sums_first 0).
template <typename VT, bool Full, typename S>
void column_mix_tile(const S* in, const Operand<VT, S>* w_pack, const typename VT::Scalar* sums, int64_t sums_first,
                     S* out, int64_t c_begin, int64_t c_end, int64_t x0, int64_t nx, int64_t H, int64_t W) {
  using V = typename VT::V;
  using O = Operand<VT, S>;
  constexpr int RC = 4 * kWide, RM = kMixRows;
  const int64_t plane = H * W, T = steps<S>(H);
  O* in_pack = scratch<O, 4>(T * RC);
  for (int64_t c0 = c_begin; c0 < c_end; c0 += RC) {
    for (int64_t t = 0; t < T; ++t)
      for (int r = 0; r < RC; ++r)
        in_pack[t * RC + r] = operand<VT, Full>(in + std::min<int64_t>(c0 + r, c_end - 1) * plane + x0, W, t, H, nx);
    const int64_t rows = std::min<int64_t>(RC, c_end - c0);
    for (int64_t m0 = 0; m0 < H; m0 += RM) {
      V acc[RC][RM] = {};
      const O* wv = w_pack + m0 * T;
      const O* iv = in_pack;
      for (int64_t t = 0; t < T; ++t, wv += RM, iv += RC)
        for (int r = 0; r < RC; ++r)
          for (int j = 0; j < RM; ++j) acc[r][j] = step<VT, S>(acc[r][j], iv[r], wv[j]);
      const int64_t cols = std::min<int64_t>(RM, H - m0);
      for (int r = 0; r < rows; ++r)
        for (int j = 0; j < cols; ++j) {
          const int64_t at = (m0 + j) * W + x0;
          VT::template store<Full>(out + (c0 + r) * plane + at,
                                   VT::template load<Full>(sums + (c0 + r - sums_first) * plane + at, nx) + acc[r][j], nx);
        }
    }
  }
}

// Column part of cc_energy for query rows [y_begin, y_end) and SIMD columns [x0, x0 + nx):
//   e[W + column_slot(k, y), y, x] = sum_c a[c, y, x] * b[c, k, x]      (k != y)
// Both operands are packed channel-major first, so the inner loop reads contiguous memory. The
// key pack of RK rows is gathered from every channel plane once per call, so the more query rows
// a call takes, the less that gathering costs each (energy_cpu chooses how many).
template <typename VT, bool Full, typename S>
void energy_column_tile(const S* a, const S* b, S* e, int64_t C, int64_t y_begin, int64_t y_end, int64_t x0,
                        int64_t nx, int64_t H, int64_t W) {
  using V = typename VT::V;
  using O = Operand<VT, S>;
  constexpr int RY = kWide == 2 ? 3 : 2, RK = kWide == 2 ? 6 : 4;
  const int64_t plane = H * W, y_blocks = (y_end - y_begin + RY - 1) / RY, CS = steps<S>(C);
  O* a_pack = scratch<O, 0>(y_blocks * CS * RY);
  O* b_pack = scratch<O, 1>(CS * RK);
  for (int64_t yb = 0; yb < y_blocks; ++yb)
    for (int64_t c = 0; c < CS; ++c)
      for (int j = 0; j < RY; ++j) {
        const int64_t y = std::min<int64_t>(y_begin + yb * RY + j, y_end - 1);
        a_pack[(yb * CS + c) * RY + j] = operand<VT, Full>(a + y * W + x0, plane, c, C, nx);
      }
  for (int64_t k0 = 0; k0 < H; k0 += RK) {
    int64_t ks[RK];
    for (int r = 0; r < RK; ++r) ks[r] = std::min<int64_t>(k0 + r, H - 1);
    for (int64_t c = 0; c < CS; ++c)
      for (int r = 0; r < RK; ++r) b_pack[c * RK + r] = operand<VT, Full>(b + ks[r] * W + x0, plane, c, C, nx);
    for (int64_t yb = 0; yb < y_blocks; ++yb) {
      V acc[RY][RK] = {};
      for (int64_t c = 0; c < CS; ++c) {
        const O* av = &a_pack[(yb * CS + c) * RY];
        const O* bv = &b_pack[c * RK];
        for (int j = 0; j < RY; ++j)
          for (int r = 0; r < RK; ++r) acc[j][r] = step<VT, S>(acc[j][r], av[j], bv[r]);
      }
      const int64_t y0 = y_begin + yb * RY;
      const int64_t rows = std::min<int64_t>(RY, y_end - y0), cols = std::min<int64_t>(RK, H - k0);
      for (int j = 0; j < rows; ++j)
        for (int r = 0; r < cols; ++r)
          if (ks[r] != y0 + j)
            VT::template store<Full>(e + column_weight_offset(ks[r], y0 + j, x0, H, W), acc[j][r], nx);
    }
  }
}

// Runs f(n, x0, nx, block) in parallel over images, `blocks` blocks and SIMD column tiles,
// tiles innermost: a thread's consecutive items then share the cache lines of their rows.
template <typename T, typename F>
void parallel_columns(int64_t N, int64_t W, int64_t blocks, const F& f) {
  constexpr int64_t VL = WideVec<T>::kLanes;
  const int64_t tiles = (W + VL - 1) / VL;
  at::parallel_for(0, N * tiles * blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t tile = item % tiles, block = (item / tiles) % blocks, n = item / (blocks * tiles);
      const int64_t x0 = tile * VL;
      f(n, x0, std::min<int64_t>(VL, W - x0), block);
    }
  });
}

// The row slots are plain GEMMs, one per image row y, on strided views (no copies):
//   energy:    e[n, i, y, x] = sum_c b[n, c, y, i] * a[n, c, y, x]    E_y = B_y^T A_y
//   aggregate: o[n, c, y, x] = sum_i v[n, c, y, i] * w[n, i, y, x]    O_y = V_y W_y
//   scatter:   o[n, c, y, i] = sum_x g[n, c, y, x] * w[n, i, y, x]    O_y = G_y W_y^T
// Every matrix is row-major with leading dimension H * W. They run on the BLAS that PyTorch
// links (MKL, OpenBLAS), one sequential GEMM per row in parallel over rows, bfloat16 operands
// with float32 sums through MKL's gemm_bf16bf16f32; where PyTorch exports no such BLAS, or
// CCNET_OPS_CPU_BLAS=0 asks for it, ATen's bmm runs them (bfloat16 into float32 on widened
// copies), and a product stored in bfloat16 always runs there (oneDNN's bfloat16 GEMM).
// (With AVX-512, float32 row slots run on kernels of ours instead, and so do bf16 ones on a CPU
// with bf16 dot products: rowk.)
extern "C" {
void sgemm_(const char*, const char*, const int*, const int*, const int*, const float*, const float*,
            const int*, const float*, const int*, const float*, float*, const int*) __attribute__((weak));
void dgemm_(const char*, const char*, const int*, const int*, const int*, const double*,
            const double*, const int*, const double*, const int*, const double*, double*,
            const int*) __attribute__((weak));
void gemm_bf16bf16f32_(const char*, const char*, const int*, const int*, const int*, const float*,
                       const uint16_t*, const int*, const uint16_t*, const int*, const float*, float*,
                       const int*) __attribute__((weak));
}

// Row-major out (m x n) = op(lhs) (m x k) * op(rhs) (k x n), every leading dimension ld; BLAS
// is column-major, so it computes out^T = op(rhs)^T op(lhs)^T.
template <typename T, typename Out>
void blas_gemm(bool t_lhs, bool t_rhs, int m, int n, int k, const T* lhs, const T* rhs, Out* out, int ld) {
  const char ta = t_rhs ? 'T' : 'N', tb = t_lhs ? 'T' : 'N';
  const Out one = 1, zero = 0;
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    gemm_bf16bf16f32_(&ta, &tb, &n, &m, &k, &one, reinterpret_cast<const uint16_t*>(rhs), &ld,
                      reinterpret_cast<const uint16_t*>(lhs), &ld, &zero, out, &ld);
  } else if constexpr (std::is_same_v<T, float>) {
    sgemm_(&ta, &tb, &n, &m, &k, &one, rhs, &ld, lhs, &ld, &zero, out, &ld);
  } else {
    dgemm_(&ta, &tb, &n, &m, &k, &one, rhs, &ld, lhs, &ld, &zero, out, &ld);
  }
}

// Whether the row slots may run on the BLAS or on kernels of ours: CCNET_OPS_CPU_BLAS=0 routes
// them through ATen's bmm.
bool blas_allowed() {
  const char* env = std::getenv("CCNET_OPS_CPU_BLAS");
  return !(env && std::string_view(env) == "0");
}

// Whether the BLAS that PyTorch exports has a GEMM from `in` operands to an `out` product.
bool have_blas_gemm(at::ScalarType in, at::ScalarType out) {
  if (in == at::kFloat && out == at::kFloat) return sgemm_ != nullptr;
  if (in == at::kDouble && out == at::kDouble) return dgemm_ != nullptr;
  if (in == at::kBFloat16 && out == at::kFloat) return gemm_bf16bf16f32_ != nullptr;
  return false;
}

// out_y = op(lhs_y) op(rhs_y) for every image and row y, where out, lhs and rhs are (N, *, H, W)
// tensors (possibly narrowed along dim 1) whose dims 2 and 3 are contiguous, and the matrices
// of row y are their (dim 1, dim 3) slices at row y, transposed as asked. lhs and rhs share a
// dtype; out has it too, or is float32 for bfloat16 operands.
void row_gemms(const at::Tensor& out, const at::Tensor& lhs, bool t_lhs, const at::Tensor& rhs,
               bool t_rhs) {
  const int64_t N = out.size(0), H = out.size(2), W = out.size(3);
  const int64_t m = t_lhs ? lhs.size(3) : lhs.size(1), k = t_lhs ? lhs.size(1) : lhs.size(3);
  const int64_t n = t_rhs ? rhs.size(1) : rhs.size(3);
  const bool blas = blas_allowed() && have_blas_gemm(lhs.scalar_type(), out.scalar_type()) &&
                    std::max({m, n, k, H * W}) <= std::numeric_limits<int>::max();
  if (!blas && lhs.scalar_type() != out.scalar_type()) {
    row_gemms(out, lhs.to(out.scalar_type()), t_lhs, rhs.to(out.scalar_type()), t_rhs);
    return;
  }
  if (!blas) {
    const auto view = [](const at::Tensor& t, bool trans) {  // (N, H, rows, cols) per image row
      const at::Tensor r = t.transpose(1, 2);
      return trans ? r.transpose(2, 3) : r;
    };
    const at::Tensor l = view(lhs, t_lhs), r = view(rhs, t_rhs);
    for (int64_t i = 0; i < N; ++i) {
      at::Tensor o = out[i].transpose(0, 1);
      at::bmm_out(o, l[i], r[i]);
    }
    return;
  }
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, lhs.scalar_type(), "cc_row_gemms", [&] {
    using out_t = at::opmath_type<scalar_t>;
    const scalar_t *pl = lhs.const_data_ptr<scalar_t>(), *pr = rhs.const_data_ptr<scalar_t>();
    out_t* po = out.mutable_data_ptr<out_t>();
    const int64_t sl = lhs.stride(0), sr = rhs.stride(0), so = out.stride(0);
    at::parallel_for(0, N * H, 1, [&](int64_t begin, int64_t end) {
      for (int64_t item = begin; item < end; ++item) {
        const int64_t i = item / H, y = item % H;
        blas_gemm<scalar_t, out_t>(t_lhs, t_rhs, m, n, k, pl + i * sl + y * W, pr + i * sr + y * W,
                                   po + i * so + y * W, H * W);
      }
    });
  });
}

constexpr int64_t kChannelBlock = 32;  // channels per parallel work item of the column passes
// The column energy's work items: at most kMaxEnergyRows query rows each (measured with C = 512 on
// 2 threads: cc_energy took 18.2 ms at 12 rows an item, 13.2 ms at 49), and about kItemsPerThread
// items a thread where the rows allow, so that many cores still share the work (unmeasured there).
constexpr int64_t kMaxEnergyRows = 49;
constexpr int64_t kItemsPerThread = 4;

// Every sum accumulates in float32 (float64 for float64) and is rounded once, as on the GPU
// (vdpbf16ps, below, treats subnormal inputs and results as zero).
// bfloat16 runs natively, without widened copies. Where the CPU has bf16 dot products
// (AVX512_BF16; a loop of independent ones ran at 186 GFLOP/s on one core of an AMD EPYC, FMAs
// at 104) the column kernels run on them, and so do the row slots (rowk, below: packed per row,
// no copies of the operands as ATen's bmm makes). Elsewhere the column kernels widen bf16 in
// registers and run float32 FMAs, and the row slots run on MKL's bf16 GEMM into float32 (the
// energies' then rounded). float16 runs the float32 kernels on widened copies and rounds the
// result, a pass over memory each way.

bool widened(const at::Tensor& t) { return t.scalar_type() == at::kHalf; }

// Whether the row slots of t's dtype run on the kernels of ours below (rowk) rather than on
// row_gemms: float32 on a CPU with AVX-512, bfloat16 on one with bf16 dot products, unless
// CCNET_OPS_CPU_BLAS=0 routes them through ATen's bmm.
#if defined(__AVX512F__)
constexpr bool kFloatRows = true;
#else
constexpr bool kFloatRows = false;
#endif
bool own_rows(const at::Tensor& t) {
  const bool kind = (kFloatRows && t.scalar_type() == at::kFloat) ||
                    (kBFloat16Dot && t.scalar_type() == at::kBFloat16);
  return kind && blas_allowed();
}

#if defined(__AVX512F__)
// The row slots on AVX-512, into float32 sums: float32 on FMAs, bfloat16 on the CPU's bf16 dot
// products (vdpbf16ps: 16 float32 lanes, each adding two bf16 products). On the AMD EPYC these
// kernels were tuned on, MKL's sgemm took about a third of cc_aggregate at the paper's shape, a
// quarter of its own time packing operands and zeroing the output, and ran its AVX2 kernel (no
// zmm register in it); MKL's bf16 GEMM ran at the float32 rate there. On Intel CPUs, where MKL
// has AVX-512 kernels, the comparison is unmeasured.
// Per image n and row y, the aggregations are (C x W) (W x W) products whose left operand is the
// feature's row, f[c, y, j] for j along the row:
//   aggregate: out[c, y, x] = sum_i f[c, y, i] w[i, y, x]    lanes along x, steps along i
//   scatter:   out[c, y, i] = sum_x f[c, y, x] w[i, y, x]    lanes along i, steps along x
// and the energy is a (W x C) (C x W) product, lanes along x and steps along c. A step of the
// left operand is one element (float32) or two neighbours in memory (bf16), one 32-bit word to
// broadcast; the right operand is packed once per row into (step, tile) vectors of 16 lanes,
// zero past the row's end, so a tile's spare lanes and an odd W's last bf16 pair add nothing
// (that pair's left word is read as one element, never past the row).
namespace rowk {

constexpr int kLanes = 16;
constexpr int kRows = 6;   // product rows (channels, or the energy's i) per register tile
constexpr int kTiles = 4;  // lane tiles per register tile

inline __mmask16 lanes_mask(int64_t n) { return static_cast<__mmask16>((1u << std::min<int64_t>(n, kLanes)) - 1u); }

// float32: a step is one row, one FMA per lane.
struct F32 {
  using Storage = float;
  using Word = float;
  static constexpr int64_t steps(int64_t n) { return n; }
  static inline Word word_at(const float* row, int64_t s, int64_t) { return row[s]; }
  static inline __m512 step(__m512 acc, Word a, __m512i b) {
    return _mm512_fmadd_ps(_mm512_set1_ps(a), _mm512_castsi512_ps(b), acc);
  }
  // pack[s * tiles + t], lane l: row s at column 16 t + l, for `count` rows of `lanes` columns,
  // `stride` apart from base; zero past the last column.
  static void pack(const float* base, int64_t stride, int64_t count, int64_t lanes, __m512i* pack) {
    const int64_t tiles = (lanes + kLanes - 1) / kLanes;
    for (int64_t s = 0; s < count; ++s)
      for (int64_t t = 0; t < tiles; ++t)
        pack[s * tiles + t] = _mm512_castps_si512(
            _mm512_maskz_loadu_ps(lanes_mask(lanes - t * kLanes), base + s * stride + t * kLanes));
  }
  // pack[x * tiles + t], lane l: w[i, y, x] for i = 16 t + l, zero where i passes W.
  static void pack_transposed(const float* wy, int64_t P, int64_t W, __m512i* pack) {
    const int64_t tiles = (W + kLanes - 1) / kLanes;
    auto* words = reinterpret_cast<float*>(pack);
    std::memset(pack, 0, W * tiles * sizeof(__m512i));
    for (int64_t i = 0; i < W; ++i)
      for (int64_t x = 0; x < W; ++x) words[(x * tiles + i / kLanes) * kLanes + i % kLanes] = wy[i * P + x];
  }
};

#if defined(__AVX512BF16__)
// bfloat16: a step is two rows, paired into 32-bit words, one dot product per lane.
struct Bf16 {
  using Storage = uint16_t;
  using Word = uint32_t;
  static constexpr int64_t steps(int64_t n) { return (n + 1) / 2; }
  // the pair (row[2s], row[2s + 1]), the second zero past W
  static inline Word word_at(const uint16_t* row, int64_t s, int64_t W) {
    const int64_t j = 2 * s;
    return j + 1 < W ? uint32_t(row[j]) | uint32_t(row[j + 1]) << 16 : uint32_t(row[j]);
  }
  static inline __m512 step(__m512 acc, Word a, __m512i b) {
    return _mm512_dpbf16_ps(acc, (__m512bh)_mm512_set1_epi32(static_cast<int>(a)), (__m512bh)b);
  }
  // pack[p * tiles + t], lane l: (row 2p, row 2p + 1) at column 16 t + l, for `count` rows of
  // `lanes` columns, `stride` apart from base; zero past the last row or column.
  static void pack(const uint16_t* base, int64_t stride, int64_t count, int64_t lanes, __m512i* pack) {
    const int64_t pairs = (count + 1) / 2, tiles = (lanes + kLanes - 1) / kLanes;
    using VT = Vec<float, 64>;
    const auto* rows = reinterpret_cast<const c10::BFloat16*>(base);
    for (int64_t p = 0; p < pairs; ++p)
      for (int64_t t = 0; t < tiles; ++t) {
        const int64_t nx = std::min<int64_t>(kLanes, lanes - t * kLanes);
        const c10::BFloat16* lo = rows + 2 * p * stride + t * kLanes;
        const c10::BFloat16* hi = 2 * p + 1 < count ? lo + stride : nullptr;
        const typename VT::Words words = nx == kLanes ? VT::pair<true>(lo, hi, nx) : VT::pair<false>(lo, hi, nx);
        std::memcpy(&pack[p * tiles + t], &words, sizeof(words));
      }
  }
  // pack[p * tiles + t], lane l: (w[i, y, 2p], w[i, y, 2p + 1]) for i = 16 t + l, zero where i
  // or 2p + 1 passes W.
  static void pack_transposed(const uint16_t* wy, int64_t P, int64_t W, __m512i* pack) {
    const int64_t pairs = (W + 1) / 2, tiles = (W + kLanes - 1) / kLanes;
    auto* words = reinterpret_cast<uint32_t*>(pack);
    std::memset(pack, 0, pairs * tiles * sizeof(__m512i));
    for (int64_t i = 0; i < W; ++i)
      for (int64_t p = 0; p < pairs; ++p) words[(p * tiles + i / kLanes) * kLanes + i % kLanes] = word_at(wy + i * P, p, W);
  }
};
#endif

// Rows r < rows of a product, lanes 16 (t0 + j) + l for j < NT and below `lanes`: the sum over
// steps p of word(r, p) (broadcast) times pack[p * tiles + t0 + j], stored at out + r * out_stride
// in float32, or rounded once to bf16 (Out = c10::BFloat16). word(r, p) must be valid for every
// r < kRows (callers repeat their last row).
template <typename K, int NT, typename Out, typename WordOf>
void row_tile(const WordOf& word, int64_t rows, int64_t steps, const __m512i* pack, int64_t tiles, int64_t t0,
              int64_t lanes, Out* out, int64_t out_stride) {
  __m512 acc[kRows][NT];
  for (int r = 0; r < kRows; ++r)
    for (int j = 0; j < NT; ++j) acc[r][j] = _mm512_setzero_ps();
  for (int64_t p = 0; p < steps; ++p) {
    __m512i b[NT];
    for (int j = 0; j < NT; ++j) b[j] = pack[p * tiles + t0 + j];
    for (int r = 0; r < kRows; ++r) {
      const typename K::Word a = word(r, p);
      for (int j = 0; j < NT; ++j) acc[r][j] = K::step(acc[r][j], a, b[j]);
    }
  }
  for (int r = 0; r < rows; ++r)
    for (int j = 0; j < NT; ++j) {
      const int64_t x0 = (t0 + j) * kLanes;
      const __mmask16 m = lanes_mask(lanes - x0);
      if constexpr (std::is_same_v<Out, float>) {
        _mm512_mask_storeu_ps(out + r * out_stride + x0, m, acc[r][j]);
      } else {
        const auto bits = Vec<float, 64>::narrow((Vec<float, 64>::V)acc[r][j]);
        _mm256_mask_storeu_epi16(out + r * out_stride + x0, m, (__m256i)bits);
      }
    }
}

// row_tile over every row block and tile group of a (rows x lanes) product.
template <typename K, typename Out, typename WordOf>
void row_product(const WordOf& word, int64_t rows, int64_t steps, const __m512i* pack, int64_t lanes, Out* out,
                 int64_t out_stride) {
  const int64_t tiles = (lanes + kLanes - 1) / kLanes;
  for (int64_t r0 = 0; r0 < rows; r0 += kRows) {
    const int64_t n = std::min<int64_t>(kRows, rows - r0);
    const auto block = [&](int r, int64_t p) { return word(r0 + std::min<int64_t>(r, n - 1), p); };
    Out* o = out + r0 * out_stride;
    for (int64_t t0 = 0; t0 < tiles; t0 += kTiles) {
      switch (std::min<int64_t>(kTiles, tiles - t0)) {
        case 4: row_tile<K, 4>(block, n, steps, pack, tiles, t0, lanes, o, out_stride); break;
        case 3: row_tile<K, 3>(block, n, steps, pack, tiles, t0, lanes, o, out_stride); break;
        case 2: row_tile<K, 2>(block, n, steps, pack, tiles, t0, lanes, o, out_stride); break;
        default: row_tile<K, 1>(block, n, steps, pack, tiles, t0, lanes, o, out_stride); break;
      }
    }
  }
}

template <typename K, typename S>
const typename K::Storage* storage(const at::Tensor& t) {
  return reinterpret_cast<const typename K::Storage*>(t.const_data_ptr<S>());
}

// The row slots of cc_energy: e[n, i, y, x] = sum_c b[n, c, y, i] a[n, c, y, x], per image and
// row a (W x C) (C x W) product over channels (pairs of them in bf16): both operands packed per
// row, lanes along x for a, words along i for b.
template <typename K, typename S>
void row_energy(const at::Tensor& a, const at::Tensor& b, const at::Tensor& e) {
  const int64_t N = a.size(0), C = a.size(1), H = a.size(2), W = a.size(3), P = H * W, L = num_slots(H, W);
  const int64_t steps = K::steps(C), tiles = (W + kLanes - 1) / kLanes;
  const auto* pa = storage<K, S>(a);
  const auto* pb = storage<K, S>(b);
  S* pe = e.mutable_data_ptr<S>();
  at::parallel_for(0, N * H, 1, [&](int64_t begin, int64_t end) {
    __m512i* a_pack = scratch<__m512i, 6>(steps * tiles);
    __m512i* b_pack = scratch<__m512i, 7>(steps * tiles);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t n = item / H, y = item % H;
      K::pack(pa + n * C * P + y * W, P, C, W, a_pack);
      K::pack(pb + n * C * P + y * W, P, C, W, b_pack);
      // word (i, p) at p * tiles * 16 + i
      const auto* words = reinterpret_cast<const typename K::Word*>(b_pack);
      row_product<K>([&](int64_t i, int64_t p) { return words[p * tiles * kLanes + i]; }, W, steps, a_pack, W,
                     pe + n * L * P + y * W, P);
    }
  });
}

// Vectors of a row's packed weights: steps along the reduction x tiles of 16 lanes.
template <typename K>
constexpr int64_t row_block(int64_t W) {
  return K::steps(W) * ((W + kLanes - 1) / kLanes);
}

// The packed weights of row `item` (image item / H, row item % H) of w: its rows i (aggregate)
// or, Scatter, its transpose.
template <typename K, bool Scatter>
void pack_row(const typename K::Storage* pw, int64_t item, int64_t H, int64_t W, __m512i* pack) {
  const int64_t P = H * W, L = num_slots(H, W);
  const auto* wy = pw + item / H * L * P + item % H * W;
  if constexpr (Scatter) {
    K::pack_transposed(wy, P, W, pack);
  } else {
    K::pack(wy, P, W, W, pack);
  }
}

// The packed weights of every image and row, (N, H) blocks of row_block vectors: for a row pass
// in chunks of channels, which reads each row's weights once per chunk.
template <typename K, typename S, bool Scatter>
std::unique_ptr<__m512i[]> pack_rows(const at::Tensor& w, int64_t N, int64_t H, int64_t W) {
  const int64_t block = row_block<K>(W);
  std::unique_ptr<__m512i[]> packs(new __m512i[N * H * block]);
  const auto* pw = storage<K, S>(w);
  at::parallel_for(0, N * H, 1, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) pack_row<K, Scatter>(pw, item, H, W, &packs[item * block]);
  });
  return packs;
}

// sums (N, *, H, W) float32, its channel 0 = channel c_begin: the row pass of the weights w on the
// channels [c_begin, c_end) of f (N, C, H, W). packs: every row's packed weights (pack_rows), or
// null for a pass over all channels at once, which packs each row as it comes into a buffer of
// its thread (a row's weights, not the map's row part, in memory).
template <typename K, typename S, bool Scatter>
void row_mix(const __m512i* packs, const at::Tensor& w, const at::Tensor& f, int64_t c_begin, int64_t c_end,
             const at::Tensor& sums) {
  const int64_t N = f.size(0), C = f.size(1), H = f.size(2), W = f.size(3), P = H * W;
  const int64_t steps = K::steps(W), block = row_block<K>(W);
  const auto* pf = storage<K, S>(f);
  const auto* pw = storage<K, S>(w);
  float* ps = sums.mutable_data_ptr<float>();
  const int64_t sums_image = sums.stride(0);  // sums may be a narrowed chunk of a larger buffer
  at::parallel_for(0, N * H, 1, [&](int64_t begin, int64_t end) {
    __m512i* own = packs ? nullptr : scratch<__m512i, 8>(block);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t n = item / H, y = item % H;
      if (!packs) pack_row<K, Scatter>(pw, item, H, W, own);
      const __m512i* pack = packs ? packs + item * block : own;
      const auto* fy = pf + (n * C + c_begin) * P + y * W;  // channel c's row at fy + c * P
      row_product<K>([&](int64_t c, int64_t p) { return K::word_at(fy + c * P, p, W); }, c_end - c_begin, steps,
                     pack, W, ps + n * sums_image + y * W, P);
    }
  });
}

// Calls f(K{}, S{}) with the kernels' kind K for t's storage S; own_rows(t) must hold.
template <typename F>
void with_kind(const at::Tensor& t, const F& f) {
#if defined(__AVX512BF16__)
  if (t.scalar_type() == at::kBFloat16) return f(Bf16{}, c10::BFloat16{});
#endif
  TORCH_INTERNAL_ASSERT(t.scalar_type() == at::kFloat, "rowk: no row kernels for ", t.scalar_type());
  f(F32{}, float{});
}

}  // namespace rowk
#endif

at::Tensor energy_cpu(const at::Tensor& a_in, const at::Tensor& b_in) {
  check_energy_args(a_in, b_in, "cc_energy");
  if (widened(a_in)) return energy_cpu(a_in.to(at::kFloat), b_in.to(at::kFloat)).to(a_in.scalar_type());
  const at::Tensor a = a_in.contiguous(), b = b_in.contiguous();
  const int64_t N = a.size(0), C = a.size(1), H = a.size(2), W = a.size(3), L = num_slots(H, W);
  at::Tensor e = at::empty({N, L, H, W}, a.options());
  const at::Tensor rows = e.narrow(1, 0, W);
  if (own_rows(a)) {
#if defined(__AVX512F__)
    rowk::with_kind(a, [&](auto kind, auto storage) {
      rowk::row_energy<decltype(kind), decltype(storage)>(a, b, e);
    });
#else
    TORCH_INTERNAL_ASSERT(false, "cc_energy: no row kernels of ours in this build");
#endif
  } else if (a.scalar_type() == at::kBFloat16 && !kBFloat16Dot) {
    const at::Tensor sums = at::empty(rows.sizes(), a.options().dtype(at::kFloat));
    row_gemms(sums, b, /*t_lhs=*/true, a, /*t_rhs=*/false);
    rows.copy_(sums);
  } else {
    row_gemms(rows, b, /*t_lhs=*/true, a, /*t_rhs=*/false);
  }
  if (H == 1) return e;  // a single row has no column slots
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, a.scalar_type(), "cc_energy_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t *pa = a.const_data_ptr<scalar_t>(), *pb = b.const_data_ptr<scalar_t>();
    scalar_t* pe = e.mutable_data_ptr<scalar_t>();
    const int64_t feat = C * H * W, map = L * H * W;
    // Query rows per work item: at most kMaxEnergyRows (fewer items gather the key packs fewer
    // times), fewer where that leaves under kItemsPerThread items a thread; blocks of H / blocks
    // rows, give or take one.
    const int64_t tiles = (W + WideVec<acc_t>::kLanes - 1) / WideVec<acc_t>::kLanes;
    const int64_t wanted = (kItemsPerThread * at::get_num_threads() + N * tiles - 1) / (N * tiles);
    const int64_t blocks = std::max((H + kMaxEnergyRows - 1) / kMaxEnergyRows, std::min(H, wanted));
    parallel_columns<acc_t>(N, W, blocks, [&](int64_t n, int64_t x0, int64_t nx, int64_t block) {
      const int64_t y0 = block * H / blocks, y1 = (block + 1) * H / blocks;
      dispatch_tile<acc_t>(nx, [&](auto vt, auto full) {
        energy_column_tile<decltype(vt), decltype(full)::value>(pa + n * feat, pb + n * feat, pe + n * map, C, y0,
                                                                y1, x0, nx, H, W);
      });
    });
  });
  return e;
}

// cc_aggregate (Scatter = false) and cc_scatter (Scatter = true) share checks, shapes and the
// column pass; they differ in the row pass.
constexpr int64_t kSumsBytes = 16 << 20;

// Channels per chunk of a separate float32 row-sum buffer: whole channel blocks within
// kSumsBytes, or more where the column pass would leave fewer than kItemsPerThread items a
// thread; at most C.
inline int64_t sums_chunk(int64_t N, int64_t C, int64_t P, int64_t tiles) {
  const int64_t fit = kSumsBytes / (N * P * int64_t(sizeof(float))) / kChannelBlock;
  const int64_t busy = (kItemsPerThread * at::get_num_threads() + N * tiles - 1) / (N * tiles);
  return std::min(C, std::max<int64_t>({1, fit, busy}) * kChannelBlock);
}

template <bool Scatter>
at::Tensor mix_cpu(const at::Tensor& w_in, const at::Tensor& f_in, const char* op) {
  check_aggregate_args(w_in, f_in, op);
  if (widened(f_in)) return mix_cpu<Scatter>(w_in.to(at::kFloat), f_in.to(at::kFloat), op).to(f_in.scalar_type());
  const at::Tensor w = w_in.contiguous(), f = f_in.contiguous();
  const int64_t N = f.size(0), C = f.size(1), H = f.size(2), W = f.size(3), L = num_slots(H, W);
  at::Tensor out = at::empty_like(f);
  // The row pass's sums in float32 (float64): straight into out when out is that dtype; for bf16
  // into a buffer of `chunk` channels at a time, each chunk's column pass right after its row
  // pass. A buffer within kSumsBytes (sums_chunk) stays below glibc's largest mmap threshold (32 MiB), so
  // it comes back from the heap call after call rather than as fresh pages: cc_aggregate in bf16
  // at the paper's shape with N = 2 took 24.4 ms with a whole-size buffer, and 13.2 ms when the
  // allocator was told to keep memory (measured while tuning).
  const at::ScalarType acc_type = at::toOpMathType(f.scalar_type());
  const bool separate = acc_type != f.scalar_type();
  const int64_t chunk = separate ? sums_chunk(N, C, H * W, (W + WideVec<float>::kLanes - 1) / WideVec<float>::kLanes) : C;
  const at::Tensor sums = separate ? at::empty({N, chunk, H, W}, f.options().dtype(acc_type)) : out;
  const bool rows_ours = own_rows(f);
#if defined(__AVX512F__)
  // every row's packed weights where the row pass runs in chunks (else each row packed as it comes)
  std::unique_ptr<__m512i[]> row_packs;
  if (rows_ours && chunk < C) {
    rowk::with_kind(f, [&](auto kind, auto storage) {
      row_packs = rowk::pack_rows<decltype(kind), decltype(storage), Scatter>(w, N, H, W);
    });
  }
#endif
  const auto row_pass = [&](int64_t c0, int64_t c1) {
    const at::Tensor part = sums.narrow(1, separate ? 0 : c0, c1 - c0);
    if (rows_ours) {
#if defined(__AVX512F__)
      return rowk::with_kind(f, [&](auto kind, auto storage) {
        rowk::row_mix<decltype(kind), decltype(storage), Scatter>(row_packs.get(), w, f, c0, c1, part);
      });
#else
      TORCH_INTERNAL_ASSERT(false, "cc_mix: no row kernels of ours in this build");
#endif
    }
    row_gemms(part, f.narrow(1, c0, c1 - c0), /*t_lhs=*/false, w.narrow(1, 0, W), /*t_rhs=*/Scatter);
  };
  if (H == 1) {  // a single row has no column slots
    for (int64_t c0 = 0; c0 < C; c0 += chunk) {
      const int64_t c1 = std::min(C, c0 + chunk);
      row_pass(c0, c1);
      if (separate) out.narrow(1, c0, c1 - c0).copy_(sums.narrow(1, 0, c1 - c0));
    }
    return out;
  }
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, f.scalar_type(), "cc_mix_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t *pw = w.const_data_ptr<scalar_t>(), *pf = f.const_data_ptr<scalar_t>();
    const acc_t* ps = sums.const_data_ptr<acc_t>();
    scalar_t* po = out.mutable_data_ptr<scalar_t>();
    const int64_t feat = C * H * W, map = L * H * W, sums_image = sums.size(1) * H * W;
    using Wide = WideVec<acc_t>;
    const int64_t tiles = (W + Wide::kLanes - 1) / Wide::kLanes;
    const int64_t tile_pack = (H + kMixRows - 1) / kMixRows * kMixRows * H;  // vectors
    // one wide pack per tile, about the size of the map's column part, so allocated per call
    // (not zero filled: the packing writes every entry); a tail tile of narrow vectors uses the
    // first half of its own
    const std::unique_ptr<typename Wide::V[]> packs(new typename Wide::V[N * tiles * tile_pack]);
    typename Wide::V* w_pack = packs.get();
    const auto pack_of = [&](auto vt, int64_t n, int64_t x0) {  // (paired operands: fewer, of the same size)
      return reinterpret_cast<Operand<decltype(vt), scalar_t>*>(&w_pack[(n * tiles + x0 / Wide::kLanes) * tile_pack]);
    };
    parallel_columns<acc_t>(N, W, 1, [&](int64_t n, int64_t x0, int64_t nx, int64_t) {
      dispatch_tile<acc_t>(nx, [&](auto vt, auto full) {
        pack_column_weights<decltype(vt), Scatter, decltype(full)::value>(pw + n * map, pack_of(vt, n, x0), x0,
                                                                         nx, H, W);
      });
    });
    for (int64_t first = 0; first < C; first += chunk) {
      const int64_t last = std::min(C, first + chunk), sums_first = separate ? first : 0;
      row_pass(first, last);
      parallel_columns<acc_t>(N, W, (last - first + kChannelBlock - 1) / kChannelBlock,
                              [&](int64_t n, int64_t x0, int64_t nx, int64_t block) {
        const int64_t c0 = first + block * kChannelBlock, c1 = std::min(last, c0 + kChannelBlock);
        dispatch_tile<acc_t>(nx, [&](auto vt, auto full) {
          column_mix_tile<decltype(vt), decltype(full)::value>(pf + n * feat, pack_of(vt, n, x0), ps + n * sums_image,
                                                               sums_first, po + n * feat, c0, c1, x0, nx, H, W);
        });
      });
    }
  });
  return out;
}

at::Tensor aggregate_cpu(const at::Tensor& attn, const at::Tensor& value) {
  return mix_cpu<false>(attn, value, "cc_aggregate");
}

at::Tensor scatter_cpu(const at::Tensor& attn, const at::Tensor& feature) {
  return mix_cpu<true>(attn, feature, "cc_scatter");
}

}  // namespace

TORCH_LIBRARY(ccnet_ops, m) {
  m.def("cc_energy(Tensor query, Tensor key) -> Tensor");
  m.def("cc_aggregate(Tensor attn, Tensor value) -> Tensor");
  m.def("cc_scatter(Tensor attn, Tensor feature) -> Tensor");
  // the whole attention each way, CUDA only (cuda/cc_kernels.cuh): (out, attention map) and
  // (dq, dk, dv) from the output's gradient, the inputs and that map
  m.def("cc_attention(Tensor query, Tensor key, Tensor value) -> (Tensor, Tensor)");
  m.def("cc_attention_backward(Tensor grad, Tensor query, Tensor key, Tensor value, Tensor attn) -> "
        "(Tensor, Tensor, Tensor)");
  // the fused mode, CUDA only (cuda/cc_fused.cuh): (out, log-sum-exp (N, H, W) in float32 / float64),
  // no attention map; and (dq, dk, dv) from the output's gradient, the inputs, out and the log-sum-exp
  m.def("cc_attention_fused(Tensor query, Tensor key, Tensor value) -> (Tensor, Tensor)");
  m.def("cc_attention_fused_backward(Tensor grad, Tensor query, Tensor key, Tensor value, Tensor out, "
        "Tensor lse) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(ccnet_ops, CPU, m) {
  m.impl("cc_energy", &energy_cpu);
  m.impl("cc_aggregate", &aggregate_cpu);
  m.impl("cc_scatter", &scatter_cpu);
}

}  // namespace ccnet_ops
